"""The engine actor and the handle other actors use to talk to it.

The actor owns its backend (synthetic or vLLM). Nobody else touches the
backend: they call typed methods on an :class:`EngineRef`, which posts the call
to the actor's mailbox. The actor runs each call in a task of its own, inside
its own scope, so a slow health check never holds up a request and nothing
outlives the engine.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
import trio

from supervisor.tree import ActorContext, ActorRegistry, TaskStatus

from ..errors import EngineDead, RequestFailed
from .base import EngineBackend, EngineInfo, EngineRequest, LoraAdapter, StepOutput, Stream

__all__ = ["EngineActor", "EngineMailbox", "EngineRef", "EngineStream"]

_log = structlog.get_logger("actors.engine")
T = TypeVar("T")

# how long a request that ends early waits for the engine to confirm its abort
ABORT_TIMEOUT = 2.0


@dataclass
class _Call:
    what: str  # for errors and logs
    run: Callable[[EngineBackend], Awaitable[Any]]
    reply: trio.MemorySendChannel[tuple[bool, Any]]


@dataclass
class EngineMailbox:
    """What the engine actor and its handles share: the mailbox, and what the
    engine said about itself. Owned above both, so either may restart."""

    send: trio.MemorySendChannel[_Call]
    receive: trio.MemoryReceiveChannel[_Call]
    info: EngineInfo | None = None
    alive: bool = False
    death: BaseException | None = None
    ready: trio.Event = field(default_factory=trio.Event)

    @classmethod
    def open(cls, size: float = math.inf) -> EngineMailbox:
        send, receive = trio.open_memory_channel[_Call](size)
        return cls(send, receive)


class EngineStream:
    """The outputs of one request. Raises the engine's error instead of ending
    quietly; knows whether it saw the last output (for abort on early exit)."""

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
        if item.final:
            self.finished = True
        return item


class EngineRef:
    """A typed handle on the engine actor. Safe to hold across restarts of the
    holder; calls made after the engine died raise :class:`EngineDead`."""

    def __init__(self, path: str, registry: ActorRegistry, mailbox: EngineMailbox | None = None) -> None:
        self.path = path
        self._registry = registry
        self.mailbox = mailbox or EngineMailbox.open()

    # -- what the engine said about itself -----------------------------------------
    @property
    def info(self) -> EngineInfo | None:
        return self.mailbox.info

    @property
    def alive(self) -> bool:
        return self.mailbox.alive

    async def wait_ready(self) -> EngineInfo:
        await self.mailbox.ready.wait()
        if self.mailbox.info is None:
            raise EngineDead("engine never became ready")
        return self.mailbox.info

    # -- requests --------------------------------------------------------------------
    @asynccontextmanager
    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineStream]:
        """``async with engine.generate(req) as stream: async for out in stream``.
        Leaving early, or being cancelled at any point (even while the engine is
        still taking the request), aborts the request in the engine."""
        reply = self._post("submit", lambda backend: backend.submit(request))
        try:
            recv: Stream = await self._answer(reply, "submit")
        except trio.Cancelled:
            # The engine may be starting the request right now: wait for its answer
            # and abort what it started, or it would run to max_tokens for nobody.
            with trio.CancelScope(shield=True), trio.move_on_after(ABORT_TIMEOUT):
                try:
                    started: Stream = await self._answer(reply, "submit")
                except (EngineDead, RequestFailed):
                    pass
                else:
                    started.close()
                    await self._abort_quietly(request.request_id)
            raise
        stream = EngineStream(request.request_id, recv)
        try:
            yield stream
        finally:
            recv.close()
            if not stream.finished:
                with trio.CancelScope(shield=True), trio.move_on_after(ABORT_TIMEOUT):
                    await self._abort_quietly(request.request_id)

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await self.abort(request_id)
        except (EngineDead, RequestFailed):
            pass

    async def abort(self, request_id: str) -> None:
        await self._ask("abort", lambda backend: backend.abort(request_id))
        # the engine's side of it (the request's own id is in the log context); the pipeline
        # logs request.aborted with the reason
        _log.info("engine.aborted", engine_id=request_id, message=f"Aborted Request ID: {request_id}")

    # -- control ---------------------------------------------------------------------
    async def check_health(self) -> None:
        await self._ask("check_health", lambda backend: backend.check_health())

    async def reset_prefix_cache(self) -> None:
        await self._ask("reset_prefix_cache", lambda backend: backend.reset_prefix_cache())

    async def sleep(self, level: int) -> None:
        await self._ask("sleep", lambda backend: backend.sleep(level))

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await self._ask("wake_up", lambda backend: backend.wake_up(tags))

    async def add_lora(self, adapter: LoraAdapter) -> None:
        await self._ask("add_lora", lambda backend: backend.add_lora(adapter))

    async def remove_lora(self, lora_id: int) -> None:
        await self._ask("remove_lora", lambda backend: backend.remove_lora(lora_id))

    async def encode(self, images: list[Any]) -> Any:
        """Images (PIL) -> embeddings [n_images, tokens, hidden] (an encode worker's engine)."""
        return await self._ask("encode", lambda backend: backend.encode(images))

    def declare_dead(self, error: BaseException) -> None:
        """Crash the engine actor with ``error`` (the health monitor's verdict).
        The engine is significant: its supervisor escalates."""
        self.mailbox.death = error
        if not self._registry.kill(self.path, error):
            _log.warning("engine.declare_dead_ignored", reason=str(error), engine=self.path)

    # -- plumbing --------------------------------------------------------------------
    async def _ask(self, what: str, run: Callable[[EngineBackend], Awaitable[T]]) -> T:
        result: T = await self._answer(self._post(what, run), what)
        return result

    def _post(self, what: str, run: Callable[[EngineBackend], Awaitable[Any]]
              ) -> trio.MemoryReceiveChannel[tuple[bool, Any]]:
        box = self.mailbox
        if box.death is not None and not box.alive:
            raise EngineDead(f"engine is dead: {box.death}")
        reply_send, reply_recv = trio.open_memory_channel[tuple[bool, Any]](1)
        try:
            box.send.send_nowait(_Call(what, run, reply_send))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise EngineDead(f"engine is not running ({what})") from None
        return reply_recv

    @staticmethod
    async def _answer(reply: trio.MemoryReceiveChannel[tuple[bool, Any]], what: str) -> Any:
        try:
            ok, value = await reply.receive()
        except trio.EndOfChannel:
            raise EngineDead(f"engine stopped before answering {what}") from None
        if ok:
            return value
        raise value


class EngineActor:
    """``ChildSpec("engine", EngineActor(backend, ref).run, significant=True)``."""

    def __init__(self, backend: EngineBackend, ref: EngineRef,
                 on_ready: Callable[[EngineInfo], None] | None = None) -> None:
        self.backend = backend
        self.mailbox = ref.mailbox
        self._on_ready = on_ready

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        box = self.mailbox
        try:
            async with trio.open_nursery() as nursery:
                info: EngineInfo = await nursery.start(self.backend.run)
                box.info = info
                box.alive = True
                box.ready.set()
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
            box.alive = False
            if box.death is None:
                box.death = EngineDead("engine stopped")
            if not box.ready.is_set():
                box.ready.set()  # waiters learn it never became ready (info is None)
            self._fail_pending()

    async def _serve(self, nursery: trio.Nursery) -> None:
        async for call in self.mailbox.receive:
            nursery.start_soon(self._run_call, call)

    async def _run_call(self, call: _Call) -> None:
        try:
            result = await call.run(self.backend)
        except Exception as exc:
            call.reply.send_nowait((False, exc))
        else:
            call.reply.send_nowait((True, result))

    def _fail_pending(self) -> None:
        while True:
            try:
                call = self.mailbox.receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            call.reply.send_nowait((False, EngineDead(f"engine stopped before answering {call.what}")))


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
