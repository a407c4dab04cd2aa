"""The system server: liveness, readiness, the debug tree and (opt-in) chaos.

It is an actor like the others: killed, it comes back on the same port (the
socket belongs to the process, see :class:`supervisor.http.BoundSocket`).
Other actors add routes through :class:`SystemRoutes` (metrics, engine
control, LoRA) without knowing about each other.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from supervisor.http import BoundSocket, serve_asgi
from supervisor.signals import Lifecycle
from supervisor.tree import ActorContext, ActorRegistry, TaskStatus

from .handlers import Handler
from .protocol import RequestError

__all__ = ["ReadinessCheck", "SystemRoutes", "SystemServer"]

# name -> (ok, detail); every check must pass for /ready
ReadinessCheck = Callable[[], tuple[bool, str]]
Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass
class SystemRoutes:
    """Routes and readiness checks other parts of the tree contribute."""

    routes: list[BaseRoute] = field(default_factory=list)
    checks: dict[str, ReadinessCheck] = field(default_factory=dict)

    def add(self, path: str, endpoint: Endpoint, methods: list[str]) -> None:
        self.routes.append(Route(path, endpoint, methods=methods))

    def add_handler(self, path: str, handler: Handler, methods: list[str],
                    payload_from_path: str | None = None) -> None:
        """Expose a request-plane handler on the system port: the JSON body is
        the payload (plus ``payload_from_path`` from the URL), the last item
        the handler emits is the answer, a RequestError is a 4xx/5xx."""

        async def endpoint(request: Request) -> Response:
            raw = await request.body()
            try:
                payload: Any = json.loads(raw) if raw.strip() else {}
            except ValueError as exc:
                return JSONResponse({"status": "error", "message": f"body is not JSON: {exc}"}, status_code=400)
            if payload_from_path is not None:
                if not isinstance(payload, dict):
                    payload = {}
                payload[payload_from_path] = request.path_params[payload_from_path]
            items: list[Any] = []

            async def emit(item: Any) -> None:
                items.append(item)

            try:
                await handler(payload, emit, f"system-{uuid.uuid4().hex[:12]}")
            except RequestError as exc:
                status = {"not_found": 404, "invalid_request": 400, "resource_exhausted": 429}.get(exc.code, 500)
                return JSONResponse({"status": "error", "code": exc.code, "message": exc.message}, status_code=status)
            return JSONResponse(items[-1] if items else {"status": "ok"})

        self.add(path, endpoint, methods)


class SystemServer:
    def __init__(
        self,
        bound: BoundSocket,
        registry: ActorRegistry,
        lifecycle: Lifecycle,
        extra: SystemRoutes | None = None,
        *,
        enable_chaos: bool = False,
    ) -> None:
        self.bound = bound
        self.registry = registry
        self.lifecycle = lifecycle
        self.extra = extra or SystemRoutes()
        self.enable_chaos = enable_chaos

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        detail: dict[str, Any] = {"phase": self.lifecycle.phase.value}
        ok = self.lifecycle.accepting
        not_ready = [c["path"] for c in self.registry.snapshot() if c["state"] != "running"]
        if not_ready or not self.registry.all_ready():
            ok = False
            detail["actors_not_ready"] = not_ready
        for name, check in self.extra.checks.items():
            passed, why = check()
            if not passed:
                ok = False
                detail[name] = why
        detail["status"] = "ready" if ok else "not ready"
        return ok, detail

    def app(self) -> Starlette:
        async def live(_: Request) -> Response:
            return JSONResponse({"status": "live"})

        async def ready(_: Request) -> Response:
            ok, detail = self.readiness()
            return JSONResponse(detail, status_code=200 if ok else 503)

        async def tree(_: Request) -> Response:
            return JSONResponse(self.registry.snapshot())

        async def kill(request: Request) -> Response:
            path = request.path_params["path"]
            if self.registry.get(path) is None:
                known = [c["path"] for c in self.registry.snapshot()]
                return JSONResponse({"error": f"no actor at {path!r}", "actors": known}, status_code=404)
            if not self.registry.kill(path):
                return JSONResponse({"error": f"actor {path!r} is not running"}, status_code=409)
            return JSONResponse({"status": "killed", "path": path})

        routes: list[BaseRoute] = [
            Route("/live", live, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/health", ready, methods=["GET"]),
            Route("/debug/tree", tree, methods=["GET"]),
        ]
        if self.enable_chaos:
            routes.append(Route("/debug/actors/{path:path}/kill", kill, methods=["POST"]))
        routes.extend(self.extra.routes)
        return Starlette(routes=routes)

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_asgi, self.app(), self.bound)
            ctx.log.info("system.listening", host=self.bound.host, port=self.bound.port,
                         chaos=self.enable_chaos)
            task_status.started()
