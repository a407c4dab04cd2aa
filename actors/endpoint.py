"""The endpoint server: the request plane (TCP or NATS) and registration.

It is a small supervisor of its own::

    endpoint (Supervisor, one_for_one)
    ├── connections   runs one task per connection and per request
    ├── listener      accepts connections and hands them to ``connections``
    └── registrar     registers the instance once serving; keeps the lease

With ``request_plane="nats"`` the first two are the NATS plane's ``requests``
and ``listener`` (:mod:`actors.nats_plane`). Both planes run each request
through the worker's request pipeline (:mod:`actors.request_plane`), which
knows nothing of the transport: it gets a ``send_frame`` callback and the
request's control. Drain and abort on shutdown belong to the pipeline.

Killing the listener does not cut streams in flight: they live under
``connections``. The listening socket, the in-flight table and the
registration state are owned above the actors, so restarts keep them.
"""

from __future__ import annotations

import functools
import math
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from supervisor.http import BoundSocket
from supervisor.planes.discovery import Discovery, InstanceRecord
from supervisor.signals import Lifecycle
from supervisor.tree import ActorContext, ChildSpec, Restart, Strategy, Supervisor, TaskStatus

from .engine.actor import EngineRef
from .errors import ErrorCode, FrameError, RequestError
from .handlers import Handlers
from .http_plane import HttpRequestPlane
from .nats_plane import NatsRequestPlane, request_subject
from .pipeline import AbortReason, RequestControl, RequestPipeline
from .protocol import Frame, FrameReader, Request, encode_frame
from .request_plane import SendFrame, error_frame, route_client_frame, serve_request

__all__ = ["EndpointServer", "Registration"]

_log = structlog.get_logger("actors.endpoint")

READ_SIZE = 65536
PARTIAL_FRAME_TIMEOUT = 30.0  # a frame started must be finished within this
SEND_QUEUE = 256
REQUEST_PLANES = ("tcp", "nats", "http")

@dataclass
class Registration:
    """What the registrar registered; read by /ready and the shutdown hooks."""

    record: InstanceRecord | None = None
    registered: bool = False
    asleep: bool = False  # deregistered on purpose (sleep): stay out of discovery
    ttl: float = 10.0


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
        pipeline: RequestPipeline,
        *,
        discovery: Discovery,
        namespace: str,
        component: str,
        endpoint: str,
        engine: EngineRef,
        registration: Registration,
        advertise_host: str | None = None,
        instance_id: str | None = None,
        request_plane: str = "tcp",
        nats_servers: Sequence[str] = (),
        runtime_extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.handlers = handlers
        self.bound = bound
        self.lifecycle = lifecycle
        self.pipeline = pipeline
        self.discovery = discovery
        self.namespace = namespace
        self.component = component
        self.endpoint = endpoint
        self.engine = engine
        self.registration = registration
        self.advertise_host = advertise_host or (bound.host if bound is not None else "")
        self.instance_id = instance_id or uuid.uuid4().hex[:16]
        self.runtime_extra = runtime_extra
        if request_plane not in REQUEST_PLANES:
            raise ValueError(f"request plane {request_plane!r}: expected one of {', '.join(REQUEST_PLANES)}")
        if request_plane in ("tcp", "http") and bound is None:
            raise ValueError(f"the {request_plane} request plane needs a bound socket")
        self.request_plane = request_plane
        self.nats: NatsRequestPlane | None = None
        self.http: HttpRequestPlane | None = None
        if request_plane == "http":
            assert bound is not None
            self.http = HttpRequestPlane(bound, self.serve_request)
        if request_plane == "nats":
            subject = request_subject(namespace, component, endpoint, self.instance_id)
            self.nats = NatsRequestPlane(nats_servers, subject, self.serve_request)
        self._accepted_send, self._accepted_recv = trio.open_memory_channel[trio.SocketStream](math.inf)
        lifecycle.on_deregister("endpoint", self._deregister)

    def spec(self) -> ChildSpec:
        plane = self.nats.children() if self.nats is not None else self.http.children() if self.http else [
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
                        control.cancel(AbortReason.CLIENT_DISCONNECTED)
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
                await self._send_error(conn, "", RequestError(
                    ErrorCode.TIMEOUT, f"incomplete frame for {PARTIAL_FRAME_TIMEOUT}s", migratable=False))
                return
            if not data:
                return
            try:
                frames = reader.feed(data)
            except FrameError as exc:
                # we cannot find the next frame boundary: say why and hang up
                _log.warning("request_plane.bad_frame", error=str(exc))
                await self._send_error(conn, "", RequestError(ErrorCode.INVALID_FRAME, str(exc)))
                return
            for frame in frames:
                self._dispatch(conn, frame, nursery)

    def _dispatch(self, conn: _Conn, frame: Frame, nursery: trio.Nursery) -> None:
        route_client_frame(
            frame, conn.requests,
            start=lambda req, control: nursery.start_soon(self._run_request, conn, req, control),
            refuse=lambda rid, error: nursery.start_soon(self._send_error, conn, rid, error),
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

    async def _send_error(self, conn: _Conn, request_id: str, error: RequestError) -> None:
        await self._send(conn, error_frame(request_id, error))

    # -- one request -----------------------------------------------------------
    async def _run_request(self, conn: _Conn, req: Request, control: RequestControl) -> None:
        try:
            await self.serve_request(req, functools.partial(self._send, conn), control)
        finally:
            conn.requests.pop(req.id, None)

    async def serve_request(self, request: Request, send_frame: SendFrame, control: RequestControl) -> None:
        """One request from either plane, through the worker's pipeline."""
        await serve_request(self.pipeline, self.handlers, request, send_frame, control)

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
            if self.runtime_extra is not None:
                runtime.update(self.runtime_extra())
        return InstanceRecord(
            namespace=self.namespace,
            component=self.component,
            endpoint=self.endpoint,
            instance_id=self.instance_id,
            transport=self.request_plane,
            address=self._address(),
            model=model,
            runtime_config=runtime,
            pid=os.getpid(),
        )

    def _address(self) -> str:
        if self.nats is not None:
            return self.nats.subject
        host = f"[{self.advertise_host}]" if ":" in self.advertise_host else self.advertise_host
        if self.http is not None:
            return f"http://{host}:{self.bound_port}"
        return f"{host}:{self.bound_port}"

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
