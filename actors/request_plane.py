"""What the TCP and NATS request planes share: routing a client's frames, and
running one request through the pipeline with its answer as frames.

A transport only moves frames. For each ``request`` frame it calls
:func:`serve_request` with a ``send_frame`` callback; the request's items go
out as numbered ``data`` frames, a ``heartbeat`` goes out whenever nothing else
did for :data:`~actors.protocol.HEARTBEAT_INTERVAL`, and it ends with one
``end`` (how many items, the last finish reason) or ``error`` frame.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .errors import ErrorCode, RequestError
from .handlers import Handlers
from .pipeline import AbortReason, RequestControl, RequestPipeline, Status, Ticket
from .protocol import HEARTBEAT_INTERVAL, Cancel, Data, End, Error, Frame, Heartbeat, Request

__all__ = ["SendFrame", "error_frame", "route_client_frame", "serve_request"]

SendFrame = Callable[[Frame], Awaitable[None]]


def error_frame(request_id: str, error: RequestError) -> Error:
    return Error(request_id, error.code.value, error.message, error.migratable)


@dataclass
class _Sent:
    count: int = 0  # data frames
    finish_reason: str | None = None  # of the last item that had one
    last: float = 0.0  # trio clock: when anything last went out


async def serve_request(pipeline: RequestPipeline, handlers: Handlers, request: Request, send_frame: SendFrame,
                        control: RequestControl, *, heartbeat: float = HEARTBEAT_INTERVAL) -> None:
    """Run one request from a request plane and answer it through ``send_frame``."""
    try:
        handler = handlers.lookup(request.endpoint)
    except RequestError as exc:
        await send_frame(error_frame(request.id, exc))
        return
    sent = _Sent(last=trio.current_time())

    async def work(ticket: Ticket) -> None:
        async def emit(item: Any) -> None:
            await send_frame(Data(request.id, item, sent.count))
            sent.count += 1
            sent.last = trio.current_time()
            if isinstance(item, dict) and item.get("finish_reason") is not None:
                sent.finish_reason = str(item["finish_reason"])

        await handler(request.payload, emit, ticket.key)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_heartbeats, send_frame, request.id, sent, heartbeat)
        outcome = await pipeline.run(request.endpoint, _trace_id(request), work, control=control,
                                     generates=handlers.generates(request.endpoint))
        nursery.cancel_scope.cancel()
    if outcome.error is not None:
        await send_frame(error_frame(request.id, outcome.error))
    elif outcome.status is Status.OK:
        await send_frame(End(request.id, sent.count, sent.finish_reason))


def _trace_id(request: Request) -> str:
    """The request's id end to end, for its log lines: the one a frontend passes on (its
    client's) in the payload's ``request_id``, else the frame's own."""
    trace = request.payload.get("request_id") if isinstance(request.payload, dict) else None
    return trace if isinstance(trace, str) and trace else request.id


async def _heartbeats(send_frame: SendFrame, request_id: str, sent: _Sent, interval: float) -> None:
    """While the request runs: a heartbeat whenever nothing went out for ``interval``."""
    while True:
        await trio.sleep_until(sent.last + interval)
        if trio.current_time() >= sent.last + interval:
            sent.last = trio.current_time()
            await send_frame(Heartbeat(request_id))


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
