"""The engine actor and the handle other actors use to talk to it.

The actor owns its backend (synthetic or vLLM). Nobody else touches the
backend: they send messages through an :class:`EngineRef`. Each message is
handled in its own task, so a slow health check never holds up a request.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from supervisor.errors import EngineDead
from supervisor.tree import ActorContext, ActorRegistry, TaskStatus

from .base import EngineBackend, EngineInfo, EngineRequest, RequestFailed, StepOutput, Stream

__all__ = ["EngineActor", "EngineRef", "EngineStream"]

_log = structlog.get_logger("actors.engine")


@dataclass
class _Call:
    op: str
    args: tuple[Any, ...]
    reply: trio.MemorySendChannel[tuple[bool, Any]]


@dataclass
class _EngineState:
    """Shared between the actor and its handles: what the engine said about itself."""

    info: EngineInfo | None = None
    alive: bool = False
    death: BaseException | None = None
    ready: trio.Event = field(default_factory=trio.Event)


class EngineStream:
    """The outputs of one request. Raises the engine's error instead of ending
    quietly; knows whether it saw the last item (for abort on early exit)."""

    def __init__(self, request_id: str, recv: Stream) -> None:
        self.request_id = request_id
        self._recv = recv
        self.finished = False
        self._error: BaseException | None = None  # met by next_ready, raised by the next __anext__

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self._error is not None:
            error, self._error = self._error, None
            self.finished = True
            raise error
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._recv.receive()
        except trio.EndOfChannel:
            self.finished = True
            raise StopAsyncIteration from None
        return self._take(item)

    def next_ready(self) -> StepOutput | None:
        """The next output if the engine has already produced it, else None (never waits;
        an error waiting in the stream is raised by the next ``__anext__``). Lets a consumer
        that fell behind send what piled up in one write."""
        if self.finished or self._error is not None:
            return None
        try:
            item = self._recv.receive_nowait()
        except trio.WouldBlock:
            return None
        except trio.EndOfChannel:
            self.finished = True
            return None
        if isinstance(item, BaseException):
            self._error = item
            return None
        return self._take(item)

    def _take(self, item: StepOutput | BaseException) -> StepOutput:
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finish_reason is not None:
            self.finished = True
        return item


class EngineRef:
    """A typed handle on the engine actor. Safe to hold across restarts of the
    holder; calls made after the engine died raise :class:`EngineDead`."""

    def __init__(self, path: str, registry: ActorRegistry, mailbox_size: float = math.inf) -> None:
        self.path = path
        self._registry = registry
        self._send, self._recv = trio.open_memory_channel[_Call](mailbox_size)
        self._state = _EngineState()

    # -- what callers see ---------------------------------------------------
    @property
    def info(self) -> EngineInfo | None:
        return self._state.info

    @property
    def alive(self) -> bool:
        return self._state.alive

    async def wait_ready(self) -> EngineInfo:
        await self._state.ready.wait()
        if self._state.info is None:
            raise EngineDead("engine never became ready")
        return self._state.info

    @asynccontextmanager
    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineStream]:
        """``async with engine.generate(req) as stream: async for out in stream``.
        Leaving the block before the last output aborts the request in the engine."""
        recv: Stream = await self._call("submit", request)
        stream = EngineStream(request.request_id, recv)
        try:
            yield stream
        finally:
            recv.close()
            if not stream.finished:
                with trio.CancelScope(shield=True):
                    try:
                        with trio.move_on_after(2.0):
                            await self.abort(request.request_id)
                    except EngineDead:
                        pass

    async def abort(self, request_id: str) -> None:
        await self._call("abort", request_id)
        # the engine's side of it; the endpoint logs request.aborted with the reason
        _log.info("engine.aborted", request_id=request_id, message=f"Aborted Request ID: {request_id}")

    async def check_health(self) -> None:
        await self._call("check_health")

    async def reset_prefix_cache(self) -> None:
        await self._call("reset_prefix_cache")

    async def call(self, op: str, *args: Any) -> Any:
        """Any other backend operation by name (sleep, wake_up, LoRA ...)."""
        return await self._call(op, *args)

    def declare_dead(self, error: BaseException) -> None:
        """Crash the engine actor with ``error`` (the health monitor's verdict).
        The engine is significant: its supervisor escalates."""
        self._state.death = error
        if not self._registry.kill(self.path, error):
            _log.warning("engine.declare_dead_ignored", reason=str(error), engine=self.path)

    # -- plumbing ------------------------------------------------------------
    async def _call(self, op: str, *args: Any) -> Any:
        if self._state.death is not None and not self._state.alive:
            raise EngineDead(f"engine is dead: {self._state.death}")
        reply_send, reply_recv = trio.open_memory_channel[tuple[bool, Any]](1)
        try:
            self._send.send_nowait(_Call(op, args, reply_send))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise EngineDead(f"engine is not running ({op})") from None
        try:
            ok, value = await reply_recv.receive()
        except trio.EndOfChannel:
            raise EngineDead(f"engine stopped before answering {op}") from None
        if ok:
            return value
        raise value


class EngineActor:
    """``ChildSpec("engine", EngineActor(backend, ref).run, significant=True)``."""

    ALLOWED = frozenset(
        {"submit", "abort", "check_health", "reset_prefix_cache", "sleep", "wake_up",
         "add_lora", "remove_lora", "list_loras", "is_sleeping", "stats"}
    )

    def __init__(self, backend: EngineBackend, ref: EngineRef,
                 on_ready: Callable[[EngineInfo], None] | None = None) -> None:
        self.backend = backend
        self.ref = ref
        self._on_ready = on_ready

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        state = self.ref._state
        try:
            async with trio.open_nursery() as nursery:
                info: EngineInfo = await nursery.start(self.backend.run)
                state.info = info
                state.alive = True
                state.ready.set()
                if self._on_ready is not None:
                    self._on_ready(info)
                ctx.log.info("engine.ready", backend=self.backend.name, model=info.model,
                             total_kv_blocks=info.total_kv_blocks, load_time_s=info.load_time_s)
                nursery.start_soon(self._serve, nursery)
                task_status.started()
        except BaseExceptionGroup as group:
            dead = group.subgroup(EngineDead)
            if dead is not None:
                raise _first(dead) from None
            raise
        finally:
            state.alive = False
            if state.death is None:
                state.death = EngineDead("engine stopped")
            self._fail_pending()

    async def _serve(self, nursery: trio.Nursery) -> None:
        async for call in self.ref._recv:
            if call.op not in self.ALLOWED or not hasattr(self.backend, call.op):
                call.reply.send_nowait((False, RequestFailed(f"engine backend {self.backend.name!r} "
                                                              f"does not support {call.op!r}")))
                continue
            nursery.start_soon(self._answer, call, getattr(self.backend, call.op))

    @staticmethod
    async def _answer(call: _Call, method: Callable[..., Awaitable[Any]]) -> None:
        try:
            result = await method(*call.args)
        except Exception as exc:
            call.reply.send_nowait((False, exc))
        else:
            call.reply.send_nowait((True, result))

    def _fail_pending(self) -> None:
        while True:
            try:
                call = self.ref._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            call.reply.send_nowait((False, EngineDead(f"engine stopped before answering {call.op}")))


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
