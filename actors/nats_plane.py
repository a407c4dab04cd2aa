"""The NATS request plane (``--request-plane nats``), worker side.

Subject naming: each worker instance subscribes to one subject,

    {namespace}.{component}.{endpoint}-{instance_id}

where ``endpoint`` is the endpoint it registers (``generate``); the instance
record's ``address`` is that subject and its ``transport`` is ``nats``. Every
endpoint of the worker (``generate``, ``clear_kv_blocks``, ...) is served on
it: the msgpack :class:`~actors.protocol.Request` frame names the endpoint,
exactly as on the TCP plane. A message body is one msgpack frame (no length
prefix):

- ``request {id, endpoint, payload}`` published to the subject with a reply
  inbox; the worker streams ``data`` frames to that inbox and ends with one
  ``end`` or ``error`` frame;
- ``cancel {id}`` published to the same subject (no reply needed) cancels the
  request with that id. Both go through the one subscription, so a cancel
  never overtakes its request.

A client that publishes to a subject nobody serves gets NATS's "no responders"
status on its inbox at once. NATS has no connection between a client and a
worker, so the worker asks after the client instead: every
``CLIENT_PROBE_INTERVAL`` seconds of a request, a NATS request with the header
``Dyn-Probe: <request id>`` goes to the client's reply inbox. Our client answers
it; a live client that does not answer only makes the probe time out, which
changes nothing. Only NATS's "no responders" (nobody subscribes to the inbox
any more: the client died without sending ``cancel``) aborts the request, as a
client disconnect, and only when it persists: ``CLIENT_GONE_PROBES`` answers in
a row, none within ``RECONNECT_GRACE`` seconds of the worker's own reconnect.
Right after nats-server restarts, a live client has not yet subscribed again
and its inbox answers "no responders" for a moment.

Actors, under the endpoint supervisor::

    requests   runs one task per request (the in-flight streams live here)
    listener   opens the NATS connection (when there is none) and owns the
               subscription; hands messages to ``requests``

Replies go out on the connection, which outlives a killed listener: the
listener that comes back subscribes again on it, and the streams in flight
never see a gap. The connection is closed when the supervisor stops the
listener (shutdown), or replaced when nats-py gives up reconnecting; replies
wait for the next one.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
import trio
import trio_asyncio

from supervisor.planes.servers import close_nats, connect_nats
from supervisor.tree import ActorContext, ChildSpec, Restart, TaskStatus

from .errors import ErrorCode, FrameError, RequestError
from .pipeline import AbortReason, RequestControl
from .protocol import PROBE_HEADER, Data, Frame, Request, decode_body, encode_body
from .request_plane import SendFrame, error_frame, route_client_frame

__all__ = ["CLIENT_PROBE_INTERVAL", "NatsRequestPlane", "ServeRequest", "request_subject"]

# how often a running request asks whether its client still listens, and how long an answer may take
CLIENT_PROBE_INTERVAL = 2.0
CLIENT_GONE_PROBES = 3  # "no responders" this many times in a row: the client is gone
RECONNECT_GRACE = 5.0  # seconds after our reconnect in which "no responders" proves nothing

ServeRequest = Callable[[Request, SendFrame, RequestControl], Awaitable[None]]

_log = structlog.get_logger("actors.nats_plane")


def request_subject(namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    return f"{namespace}.{component}.{endpoint}-{instance_id}"


class NatsRequestPlane:
    """State owned above the actors (so restarts keep it) and the two actors."""

    def __init__(self, servers: Sequence[str], subject: str, serve: ServeRequest) -> None:
        self.servers = list(servers)
        self.subject = subject
        self.serve = serve
        self.requests: dict[str, RequestControl] = {}
        self._incoming_send, self._incoming_recv = trio.open_memory_channel[Any](math.inf)
        self._nc: Any = None  # the connection, shared by the listener's generations
        self._closed = trio.Event()  # set when nats-py closes it (reconnects exhausted, or ours)
        self._connected = trio.Event()  # set while replies can go out on self._nc
        self._reconnected_at = -math.inf  # time.monotonic() of the last reconnect

    def children(self) -> list[ChildSpec]:
        return [
            ChildSpec("requests", self._requests, Restart.PERMANENT, shutdown=2.0),
            ChildSpec("listener", self._listener, Restart.PERMANENT, shutdown=2.0),
        ]

    # -- listener --------------------------------------------------------------
    async def _listener(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        nc = self._nc
        if nc is None or nc.is_closed:
            self._closed = trio.Event()
            nc = await connect_nats(self.servers, name=f"worker {self.subject}", closed=self._closed,
                                    on_reconnect=self._note_reconnect)
            self._nc = nc
        closed = self._closed
        sub: Any = None
        try:
            async def on_message(msg: Any) -> None:  # runs in asyncio, same thread
                self._incoming_send.send_nowait(msg)

            sub = await trio_asyncio.aio_as_trio(nc.subscribe)(self.subject, cb=on_message)
            await trio_asyncio.aio_as_trio(nc.flush)()  # subscribed on the server before we register
            self._connected.set()
            ctx.log.info("request_plane.listening", transport="nats", subject=self.subject,
                         servers=self.servers)
            task_status.started()
            await closed.wait()
            raise ConnectionError(f"the connection to NATS at {', '.join(self.servers)} was closed "
                                  "(reconnect attempts exhausted)")
        finally:
            with ctx.cleanup_scope():
                if ctx.stopping or nc.is_closed:  # shutdown, or a dead connection: the next listener opens one
                    if self._nc is nc:
                        self._nc = None
                        self._connected = trio.Event()
                    await close_nats(nc)
                elif sub is not None:  # killed: only the subscription goes; replies keep the connection
                    with trio.move_on_after(2.0):
                        try:
                            await trio_asyncio.aio_as_trio(sub.unsubscribe)()
                        except Exception as exc:  # the connection is failing: its close follows
                            _log.debug("request_plane.unsubscribe_failed", error=repr(exc), transport="nats")

    def _note_reconnect(self) -> None:
        self._reconnected_at = time.monotonic()

    async def _publish(self, subject: str, frame: Frame) -> None:
        """Publish one reply frame; waits through a listener restart."""
        import nats.errors

        body = encode_body(frame)
        while True:
            nc = self._nc
            if nc is None:
                await self._connected.wait()
                continue
            if nc.is_closed:  # the listener is about to notice and reconnect
                await trio.sleep(0.01)
                continue
            try:
                await trio_asyncio.aio_as_trio(nc.publish)(subject, body)
                return
            except nats.errors.MaxPayloadError:
                message = (f"a {type(frame).__name__.lower()} frame of {len(body)} bytes exceeds the NATS "
                           "server's max_payload")
                if isinstance(frame, Data):
                    raise RequestError(ErrorCode.INTERNAL, message) from None  # ends this request with that error
                _log.warning("request_plane.frame_dropped", error=message, transport="nats")
                return
            except nats.errors.ConnectionClosedError:
                await trio.sleep(0.01)

    async def _reply_error(self, reply: str | None, request_id: str, error: RequestError) -> None:
        if reply:
            await self._publish(reply, error_frame(request_id, error))

    # -- requests --------------------------------------------------------------
    async def _requests(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for msg in self._incoming_recv:
                self._dispatch(msg, nursery)

    def _dispatch(self, msg: Any, nursery: trio.Nursery) -> None:
        reply: str | None = msg.reply or None
        try:
            frame = decode_body(msg.data)
        except FrameError as exc:
            _log.warning("request_plane.bad_frame", error=str(exc), transport="nats")
            nursery.start_soon(self._reply_error, reply, "", RequestError(ErrorCode.INVALID_FRAME, str(exc)))
            return
        if isinstance(frame, Request) and reply is None:
            _log.warning("request_plane.no_reply_subject", request_id=frame.id, transport="nats")
            return
        route_client_frame(
            frame, self.requests,
            start=lambda req, control: nursery.start_soon(self._run, req, reply or "", control, nursery),
            refuse=lambda rid, error: nursery.start_soon(self._reply_error, reply, rid, error),
            where="this worker",
        )

    async def _run(self, req: Request, reply: str, control: RequestControl, nursery: trio.Nursery) -> None:
        watch = trio.CancelScope()
        nursery.start_soon(self._watch_client, reply, req.id, control, watch)
        try:
            await self.serve(req, functools.partial(self._publish, reply), control)
        finally:
            watch.cancel()
            self.requests.pop(req.id, None)

    async def _watch_client(self, reply: str, request_id: str, control: RequestControl,
                            scope: trio.CancelScope) -> None:
        """Abort the request once nobody listens on its reply inbox (see the module's doc)."""
        import nats.errors

        with scope:
            misses = 0
            while True:
                await trio.sleep(CLIENT_PROBE_INTERVAL)
                nc = self._nc
                if (nc is None or nc.is_closed or not nc.is_connected
                        or time.monotonic() - self._reconnected_at < RECONNECT_GRACE):
                    misses = 0  # reconnecting, or just reconnected: the client may be reconnecting too
                    continue
                try:
                    await trio_asyncio.aio_as_trio(nc.request)(reply, b"", timeout=CLIENT_PROBE_INTERVAL,
                                                               headers={PROBE_HEADER: request_id})
                except nats.errors.NoRespondersError:
                    misses += 1
                    if misses < CLIENT_GONE_PROBES:
                        continue
                    _log.info("request.client_gone", request_id=request_id, transport="nats", inbox=reply,
                              probes=misses)
                    control.cancel(AbortReason.CLIENT_DISCONNECTED)
                    return
                except Exception:  # no answer in time, or the connection is changing: the client may live
                    continue
                misses = 0
