"""The HTTP request plane (``--request-plane http``), worker side: Dynamo's third
request plane, for networks where only HTTP gets through.

- ``POST /rpc``: the body is one msgpack ``request`` frame (no length prefix); the
  answer is a streamed (chunked) body of the TCP plane's length-prefixed frames:
  ``data`` per item, ``heartbeat`` when idle, one ``end`` or ``error``.
- ``POST /cancel``: the body is a ``cancel`` frame; the request with that id is
  cancelled (its stream ends with a ``cancelled`` error frame). Hanging up the
  ``/rpc`` response aborts the request as a disconnect.

The instance record's ``address`` is ``http://host:port`` and its ``transport``
``http``. Requests run through the worker's pipeline like those of any plane.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from supervisor.http import BoundSocket, serve_asgi
from supervisor.tree import ActorContext, ChildSpec, Restart, TaskStatus

from .errors import ErrorCode, FrameError, RequestError
from .pipeline import AbortReason, RequestControl
from .protocol import MAX_FRAME, Cancel, Frame, Request, decode_body, encode_frame
from .request_plane import SendFrame, error_frame

__all__ = ["FRAMES_CONTENT_TYPE", "HttpRequestPlane"]

FRAMES_CONTENT_TYPE = b"application/x-dyn-frames"
ServeRequest = Callable[[Request, SendFrame, RequestControl], Awaitable[None]]


class HttpRequestPlane:
    def __init__(self, bound: BoundSocket, serve: ServeRequest) -> None:
        self.bound = bound
        self.serve = serve
        self.running: dict[str, RequestControl] = {}

    def children(self) -> list[ChildSpec]:
        return [ChildSpec("listener", self._listener, Restart.PERMANENT, shutdown=2.0)]

    @property
    def address_port(self) -> int:
        return self.bound.port

    async def _listener(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        app = Starlette(routes=[Route("/rpc", _Raw(self._rpc), methods=["POST"]),
                                Route("/cancel", _Raw(self._cancel), methods=["POST"])])
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_asgi, app, self.bound)
            ctx.log.info("request_plane.listening", host=self.bound.host, port=self.bound.port, transport="http")
            task_status.started()

    async def _rpc(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            frame = decode_body(await _body(receive))
        except FrameError as exc:
            await _answer(send, 400, encode_frame(error_frame("", RequestError(ErrorCode.INVALID_FRAME, str(exc)))))
            return
        if not isinstance(frame, Request):
            error = RequestError(ErrorCode.INVALID_FRAME, f"/rpc takes a request frame, not "
                                 f"{type(frame).__name__.lower()}")
            await _answer(send, 400, encode_frame(error_frame(getattr(frame, "id", ""), error)))
            return
        if frame.id in self.running:
            error = RequestError(ErrorCode.INVALID_REQUEST, f"request id {frame.id!r} is already in flight here")
            await _answer(send, 409, encode_frame(error_frame(frame.id, error)))
            return
        control = self.running[frame.id] = RequestControl()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", FRAMES_CONTENT_TYPE), (b"cache-control", b"no-cache")]})

        async def send_frame(out: Frame) -> None:
            await send({"type": "http.response.body", "body": encode_frame(out), "more_body": True})

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            control.cancel(AbortReason.CLIENT_DISCONNECTED)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_disconnect)
                await self.serve(frame, send_frame, control)
                nursery.cancel_scope.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client is gone; the pipeline already treated it as a disconnect
        finally:
            self.running.pop(frame.id, None)

    async def _cancel(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            frame = decode_body(await _body(receive))
        except FrameError as exc:
            await _answer(send, 400, str(exc).encode())
            return
        found = self.running.get(frame.id) if isinstance(frame, Cancel) else None
        if found is not None:
            found.cancel(AbortReason.CLIENT_CANCELLED)
        await _answer(send, 204 if found is not None else 404, b"")


class _Raw:
    def __init__(self, fn: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.fn = fn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.fn(scope, receive, send)


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Any = await receive()
        if message["type"] == "http.disconnect":
            raise FrameError("the client went away before its request arrived")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FRAME:
            raise FrameError(f"a request of more than {MAX_FRAME} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", FRAMES_CONTENT_TYPE)]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
