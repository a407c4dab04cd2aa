"""The endpoint server: the request plane (TCP or NATS), registration, drain.

It is a small supervisor of its own::

    endpoint (Supervisor, one_for_one)
    ├── connections   runs one task per connection and per request
    ├── listener      accepts connections and hands them to ``connections``
    └── registrar     registers the instance once serving; keeps the lease

With ``request_plane="nats"`` the first two are the NATS plane's ``requests``
and ``listener`` (:mod:`actors.nats_plane`). Both planes run each request
through :meth:`EndpointServer.serve_request`, which knows nothing of the
transport: it gets a ``send_frame`` callback and the request's control.

Killing the listener does not cut streams in flight: they live under
``connections``. The listening socket, the in-flight table and the
registration state are owned above the actors, so restarts keep them.
"""

from __future__ import annotations

import functools
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import trio

from supervisor.errors import EngineDead
from supervisor.http import BoundSocket
from supervisor.planes.discovery import Discovery, InstanceRecord
from supervisor.signals import Lifecycle
from supervisor.tree import ActorContext, ChildSpec, Restart, Strategy, Supervisor, TaskStatus

from .engine.actor import EngineRef
from .handlers import Handlers, Inflight, RequestControl, route_client_frame
from .nats_plane import NatsRequestPlane, request_subject
from .protocol import (
    Data,
    End,
    Error,
    Frame,
    FrameError,
    FrameReader,
    Request,
    RequestError,
    encode_frame,
)

__all__ = ["EndpointServer", "Registration", "RequestObserver"]

_log = structlog.get_logger("actors.endpoint")

READ_SIZE = 65536
PARTIAL_FRAME_TIMEOUT = 30.0  # a frame started must be finished within this
SEND_QUEUE = 256
REQUEST_PLANES = ("tcp", "nats")

SendFrame = Callable[[Frame], Awaitable[None]]


@dataclass
class Registration:
    """What the registrar registered; read by /ready and the shutdown hooks."""

    record: InstanceRecord | None = None
    registered: bool = False
    asleep: bool = False  # deregistered on purpose (sleep): stay out of discovery
    ttl: float = 10.0


class RequestObserver(Protocol):
    """Told when a request to a known endpoint starts and how it ended
    (``status``: ok, error with its ``code``, or cancelled). Owned above the
    server (metrics), so restarts never reset what it counted."""

    def started(self, endpoint: str) -> None: ...

    def finished(self, endpoint: str, status: str, seconds: float, code: str | None = None) -> None: ...


@dataclass
class _Conn:
    stream: trio.SocketStream
    send: trio.MemorySendChannel[bytes]
    requests: dict[str, RequestControl] = field(default_factory=dict)
    backlog: int = 0  # frames handed to the writer task and not yet written


class EndpointServer:
    """Build with the shared state, then use :meth:`spec` as a child of the root."""

    def __init__(
        self,
        handlers: Handlers,
        bound: BoundSocket | None,
        lifecycle: Lifecycle,
        inflight: Inflight,
        *,
        discovery: Discovery,
        namespace: str,
        component: str,
        endpoint: str,
        engine: EngineRef,
        registration: Registration,
        advertise_host: str | None = None,
        observer: RequestObserver | None = None,
        instance_id: str | None = None,
        request_plane: str = "tcp",
        nats_servers: Sequence[str] = (),
    ) -> None:
        self.handlers = handlers
        self.bound = bound
        self.lifecycle = lifecycle
        self.inflight = inflight
        self.discovery = discovery
        self.namespace = namespace
        self.component = component
        self.endpoint = endpoint
        self.engine = engine
        self.registration = registration
        self.advertise_host = advertise_host or (bound.host if bound is not None else "")
        self.observer = observer
        self.instance_id = instance_id or uuid.uuid4().hex[:16]
        if request_plane not in REQUEST_PLANES:
            raise ValueError(f"request plane {request_plane!r}: expected one of {', '.join(REQUEST_PLANES)}")
        if request_plane == "tcp" and bound is None:
            raise ValueError("the TCP request plane needs a bound socket")
        self.request_plane = request_plane
        self.nats: NatsRequestPlane | None = None
        if request_plane == "nats":
            subject = request_subject(namespace, component, endpoint, self.instance_id)
            self.nats = NatsRequestPlane(nats_servers, subject, self.serve_request)
        self._accepted_send, self._accepted_recv = trio.open_memory_channel[trio.SocketStream](math.inf)
        lifecycle.on_deregister("endpoint", self._deregister)
        lifecycle.on_drain("endpoint", self._drain)
        lifecycle.on_abort("endpoint", self._abort_inflight)

    def spec(self) -> ChildSpec:
        plane = self.nats.children() if self.nats is not None else [
            ChildSpec("connections", self._connections, Restart.PERMANENT, shutdown=2.0),
            ChildSpec("listener", self._listener, Restart.PERMANENT, shutdown="brutal"),
        ]
        sup = Supervisor(
            [*plane, ChildSpec("registrar", self._registrar, Restart.PERMANENT, shutdown=2.0)],
            Strategy.ONE_FOR_ONE,
            intensity=20,
            period=1.0,
        )
        return ChildSpec("endpoint", sup.run, Restart.PERMANENT, shutdown="infinity")

    # -- listener --------------------------------------------------------------
    async def _listener(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        assert self.bound is not None
        sock = trio.socket.from_stdlib_socket(self.bound.dup())
        listener = trio.SocketListener(sock)
        async with listener:
            ctx.log.info("request_plane.listening", host=self.bound.host, port=self.bound.port, transport="tcp")
            task_status.started()
            while True:
                stream = await listener.accept()
                self._accepted_send.send_nowait(stream)

    # -- connections -----------------------------------------------------------
    async def _connections(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for stream in self._accepted_recv:
                nursery.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        send, recv = trio.open_memory_channel[bytes](SEND_QUEUE)
        conn = _Conn(stream, send)
        reader = FrameReader()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn, recv)
                try:
                    await self._read_loop(conn, reader, nursery)
                finally:
                    for control in list(conn.requests.values()):
                        control.cancel("client disconnected")
                    await send.aclose()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            # the client went away (a reset arrives wrapped in the nursery's group): this
            # connection ends, the other connections and their streams carry on
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_loop(self, conn: _Conn, reader: FrameReader, nursery: trio.Nursery) -> None:
        while True:
            timeout = PARTIAL_FRAME_TIMEOUT if reader.pending else math.inf
            with trio.move_on_after(timeout) as scope:
                data = await conn.stream.receive_some(READ_SIZE)
            if scope.cancelled_caught:
                _log.warning("request_plane.slow_client", pending_bytes=reader.pending)
                await self._send_error(conn, "", "timeout", f"incomplete frame for {PARTIAL_FRAME_TIMEOUT}s")
                return
            if not data:
                return
            try:
                frames = reader.feed(data)
            except FrameError as exc:
                # we cannot find the next frame boundary: say why and hang up
                _log.warning("request_plane.bad_frame", error=str(exc))
                await self._send_error(conn, "", "invalid_frame", str(exc))
                return
            for frame in frames:
                self._dispatch(conn, frame, nursery)

    def _dispatch(self, conn: _Conn, frame: Frame, nursery: trio.Nursery) -> None:
        route_client_frame(
            frame, conn.requests,
            start=lambda req, control: nursery.start_soon(self._run_request, conn, req, control),
            refuse=lambda rid, code, msg: nursery.start_soon(self._send_error, conn, rid, code, msg),
            where="this connection",
        )

    async def _writer(self, conn: _Conn, recv: trio.MemoryReceiveChannel[bytes]) -> None:
        async with recv:
            async for data in recv:
                await conn.stream.send_all(data)
                conn.backlog -= 1

    async def _send(self, conn: _Conn, frame: Frame) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # as the channel's send did: a cancelled task sends nothing
        data = encode_frame(frame)
        if conn.backlog == 0:
            # Fast path (one token of one stream, usually): nothing is queued or being written,
            # so write straight to the non-blocking socket from this task. Going through the
            # writer task cost three task switches per frame, most of the per-token cost
            # (bench/RESULTS.md, speed of light). Whatever the socket does not take now (full,
            # or broken: the writer then fails as before) goes to the writer, in order.
            try:
                sent = os.write(conn.stream.socket.fileno(), data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        conn.backlog += 1
        try:
            await conn.send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except BaseException:
            conn.backlog -= 1  # not queued (cancelled while the queue was full)
            raise

    async def _send_error(self, conn: _Conn, request_id: str, code: str, message: str,
                          migratable: bool = False) -> None:
        await self._send(conn, Error(request_id, code, message, migratable))

    # -- one request -----------------------------------------------------------
    async def _run_request(self, conn: _Conn, req: Request, control: RequestControl) -> None:
        try:
            await self.serve_request(req.endpoint, req.payload, req.id, functools.partial(self._send, conn),
                                     control)
        finally:
            conn.requests.pop(req.id, None)

    async def serve_request(self, endpoint_name: str, payload: Any, request_id: str, send_frame: SendFrame,
                            control: RequestControl) -> None:
        """Run one request, whatever plane carried it, and answer through ``send_frame``:
        ``data`` per item, then ``end`` or one ``error``. Refuses new work while
        shutting down (migratable), names the endpoints on an unknown one, keeps
        the in-flight table, and turns cancellation into the right error:
        ``control.cancel(reason)`` with "client cancelled" (error ``cancelled``),
        "client disconnected" (nothing sent: nobody listens) or anything else
        (``shutting_down``, migratable). The caller runs it in a task of its own."""
        req = Request(request_id, endpoint_name, payload)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        observed: float | None = None  # when the observer was told it started
        outcome: tuple[str, str | None] = ("cancelled", None)  # unless it gets to its end
        try:
            if not self.lifecycle.accepting:
                await send_frame(Error(request_id, "shutting_down",
                                       "worker is shutting down; retry on another instance", True))
                return
            handler = self.handlers.endpoints.get(req.endpoint)
            if handler is None:
                known = ", ".join(sorted(self.handlers.endpoints))
                await send_frame(Error(request_id, "not_found",
                                       f"unknown endpoint {req.endpoint!r}; this worker serves: {known}"))
                return
            self.inflight.add(request_id, control)
            _log.info("request.started", endpoint=req.endpoint)
            if self.observer is not None:
                self.observer.started(req.endpoint)
                observed = time.monotonic()
            error: Error | None = None
            with control.scope:
                try:
                    async def emit(item: Any) -> None:
                        await send_frame(Data(request_id, item))

                    await handler(req.payload, emit, request_id)
                except RequestError as exc:
                    error = exc.to_frame(request_id)
                except EngineDead as exc:
                    error = Error(request_id, "engine_dead", str(exc), True)
                except Exception as exc:
                    _log.exception("request.failed", endpoint=req.endpoint)
                    error = Error(request_id, "internal", f"{type(exc).__name__}: {exc}", False)
            if control.scope.cancelled_caught:
                reason = control.reason or "cancelled"
                _log.info("request.aborted", reason=reason, message=f"Aborted Request ID: {request_id}")
                if reason != "client disconnected":
                    error = Error(request_id, "cancelled" if reason == "client cancelled" else "shutting_down",
                                  f"request {reason}", reason != "client cancelled")
            if control.scope.cancelled_caught:
                outcome = ("cancelled", None)
            elif error is not None:
                outcome = ("error", error.code)
            else:
                outcome = ("ok", None)
            if error is not None:
                _log.info("request.finished", status="error", code=error.code)
                await send_frame(error)
            else:
                _log.info("request.finished", status="ok")
                await send_frame(End(request_id))
        finally:
            self.inflight.remove(request_id)
            if observed is not None and self.observer is not None:
                self.observer.finished(req.endpoint, outcome[0], time.monotonic() - observed, outcome[1])

    # -- registration ----------------------------------------------------------
    @property
    def bound_port(self) -> int:
        return self.bound.port if self.bound is not None else 0

    def record(self) -> InstanceRecord:
        info = self.engine.info
        runtime: dict[str, Any] = {}
        model = ""
        if info is not None:
            model = info.model
            runtime = {
                "total_kv_blocks": info.total_kv_blocks,
                "max_num_seqs": info.max_num_seqs,
                "max_num_batched_tokens": info.max_num_batched_tokens,
                "block_size": info.block_size,
                "context_length": info.max_model_len,
                "data_parallel_start_rank": 0,
                "data_parallel_size": 1,
                "lora_adapters": self.handlers.loras.names(),
            }
        return InstanceRecord(
            namespace=self.namespace,
            component=self.component,
            endpoint=self.endpoint,
            instance_id=self.instance_id,
            transport=self.request_plane,
            address=self.nats.subject if self.nats is not None else f"{self.advertise_host}:{self.bound_port}",
            model=model,
            runtime_config=runtime,
            pid=os.getpid(),
        )

    async def _registrar(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        await self.engine.wait_ready()
        reg = self.registration
        if not self.lifecycle.accepting or reg.asleep:
            task_status.started()
            await trio.sleep_forever()
        reg.record = self.record()
        await self.discovery.register(reg.record, reg.ttl)
        reg.registered = True
        ctx.log.info("endpoint.registered", key=reg.record.key, address=reg.record.address,
                     discovery=self.discovery.name)
        task_status.started()
        try:
            while True:
                await trio.sleep(reg.ttl / 3)
                if reg.registered and reg.record is not None:
                    await self.discovery.refresh(reg.record, reg.ttl)
        finally:
            with ctx.cleanup_scope():
                try:
                    await self._deregister()
                finally:
                    await self.discovery.aclose()  # its connection; the next registrar opens another

    async def suspend(self) -> None:
        """Sleep: leave discovery; the registrar will not come back on its own."""
        self.registration.asleep = True
        await self._deregister()

    async def resume(self) -> None:
        """Wake up: register again (raises if discovery refuses; then still asleep)."""
        reg = self.registration
        reg.record = self.record()
        await self.discovery.register(reg.record, reg.ttl)
        reg.registered = True
        reg.asleep = False
        _log.info("endpoint.registered", key=reg.record.key, address=reg.record.address,
                  discovery=self.discovery.name)

    async def announce(self) -> None:
        """Re-publish the record (LoRA adapters changed)."""
        reg = self.registration
        if reg.registered:
            reg.record = self.record()
            await self.discovery.register(reg.record, reg.ttl)

    async def _deregister(self) -> None:
        reg = self.registration
        if reg.registered and reg.record is not None:
            reg.registered = False
            await self.discovery.deregister(reg.record)
            _log.info("endpoint.deregistered", key=reg.record.key)

    # -- shutdown hooks --------------------------------------------------------
    async def _drain(self, deadline: float) -> None:
        if self.inflight.requests:
            _log.info("endpoint.draining", inflight=len(self.inflight.requests))
        await self.inflight.wait_empty()

    async def _abort_inflight(self) -> None:
        left = list(self.inflight.requests.values())
        if left:
            _log.warning("endpoint.aborting", inflight=len(left))
        for control in left:
            control.cancel("aborted by shutdown")
        with trio.move_on_after(2.0):
            await self.inflight.wait_empty()
