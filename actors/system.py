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

from .errors import ErrorCode, RequestError
from .handlers import Handler
from .pipeline import RequestPipeline, Ticket

__all__ = ["ReadinessCheck", "SystemRoutes", "SystemServer"]

# name -> (ok, detail); every check must pass for /ready
ReadinessCheck = Callable[[], tuple[bool, str]]
Endpoint = Callable[[Request], Awaitable[Response]]
MAX_BODY = 1024 * 1024  # bytes; the system routes take small JSON bodies


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The body, refused as soon as it grows past ``limit``."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(ErrorCode.PAYLOAD_TOO_LARGE, f"the request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class SystemRoutes:
    """Routes and readiness checks other parts of the tree contribute. Handlers
    exposed here run through ``pipeline`` (logs, metrics, drain) like requests."""

    routes: list[BaseRoute] = field(default_factory=list)
    checks: dict[str, ReadinessCheck] = field(default_factory=dict)
    # name -> what /ready and /health add under that name, whatever the verdict
    details: dict[str, Callable[[], Any]] = field(default_factory=dict)
    pipeline: RequestPipeline | None = None

    def add(self, path: str, endpoint: Endpoint, methods: list[str]) -> None:
        self.routes.append(Route(path, endpoint, methods=methods))

    def add_handler(self, path: str, handler: Handler, methods: list[str],
                    payload_from_path: str | None = None) -> None:
        """Expose a request-plane handler on the system port: the JSON body is
        the payload (plus ``payload_from_path`` from the URL), the last item
        the handler emits is the answer, a RequestError is a 4xx/5xx."""

        async def endpoint(request: Request) -> Response:
            try:
                raw = await read_body(request)
            except RequestError as exc:
                return _error(exc)
            try:
                payload: Any = json.loads(raw) if raw.strip() else {}
            except ValueError as exc:
                return JSONResponse({"status": "error", "code": ErrorCode.INVALID_REQUEST.value,
                                     "message": f"body is not JSON: {exc}"}, status_code=400)
            if payload_from_path is not None:
                if not isinstance(payload, dict):
                    payload = {}
                payload[payload_from_path] = request.path_params[payload_from_path]
            items: list[Any] = []

            async def emit(item: Any) -> None:
                items.append(item)

            request_id = f"system-{uuid.uuid4().hex[:12]}"
            if self.pipeline is None:
                try:
                    await handler(payload, emit, request_id)
                except RequestError as exc:
                    return _error(exc)
            else:
                async def work(ticket: Ticket) -> None:
                    await handler(payload, emit, ticket.key)

                outcome = await self.pipeline.run(path.strip("/").split("/{")[0].replace("/", "_"), request_id,
                                                  work, generates=False)
                if outcome.error is not None:
                    return _error(outcome.error)
            return JSONResponse(items[-1] if items else {"status": "ok"})

        self.add(path, endpoint, methods)


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse({"status": "error", "code": exc.code.value, "message": exc.message},
                        status_code=exc.code.http_status)


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
        for name, describe in self.extra.details.items():
            detail[name] = describe()
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
