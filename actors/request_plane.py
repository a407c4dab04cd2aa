"""What the TCP and NATS request planes share: routing a client's frames, and
running one request through the pipeline with its answer as frames.

A transport only moves frames. For each ``request`` frame it calls
:func:`serve_request` with a ``send_frame`` callback; the request's items go
out as ``data`` frames and it ends with one ``end`` or ``error`` frame.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .errors import ErrorCode, RequestError
from .handlers import Handlers
from .pipeline import AbortReason, RequestControl, RequestPipeline, Status, Ticket
from .protocol import Cancel, Data, End, Error, Frame, Request

__all__ = ["SendFrame", "error_frame", "route_client_frame", "serve_request"]

SendFrame = Callable[[Frame], Awaitable[None]]


def error_frame(request_id: str, error: RequestError) -> Error:
    return Error(request_id, error.code.value, error.message, error.migratable)


async def serve_request(pipeline: RequestPipeline, handlers: Handlers, request: Request, send_frame: SendFrame,
                        control: RequestControl) -> None:
    """Run one request from a request plane and answer it through ``send_frame``."""
    try:
        handler = handlers.lookup(request.endpoint)
    except RequestError as exc:
        await send_frame(error_frame(request.id, exc))
        return

    async def work(ticket: Ticket) -> None:
        async def emit(item: Any) -> None:
            await send_frame(Data(request.id, item))

        await handler(request.payload, emit, ticket.key)

    outcome = await pipeline.run(request.endpoint, request.id, work, control=control,
                                 generates=handlers.generates(request.endpoint))
    if outcome.error is not None:
        await send_frame(error_frame(request.id, outcome.error))
    elif outcome.status is Status.OK:
        await send_frame(End(request.id))


def route_client_frame(
    frame: Frame,
    running: dict[str, RequestControl],
    start: Callable[[Request, RequestControl], None],
    refuse: Callable[[str, RequestError], None],
    where: str,
) -> None:
    """What a worker does with a frame from a client, on any plane: start a
    request (``start``), cancel a running one, or ``refuse(id, error)``."""
    if isinstance(frame, Request):
        if frame.id in running:
            refuse(frame.id, RequestError(ErrorCode.INVALID_REQUEST,
                                          f"request id {frame.id!r} is already in flight on {where}"))
            return
        control = RequestControl()
        running[frame.id] = control
        start(frame, control)
    elif isinstance(frame, Cancel):
        found = running.get(frame.id)
        if found is not None:
            found.cancel(AbortReason.CLIENT_CANCELLED)
    else:
        refuse(getattr(frame, "id", ""), RequestError(
            ErrorCode.INVALID_FRAME, f"a client may send request or cancel frames, not {type(frame).__name__.lower()}"))
