"""A generic supervisor tree on trio. It knows nothing of LLMs.

A *child* is an async function ``factory(ctx, task_status=...)`` that calls
``task_status.started()`` once it is ready to serve and then runs until it is
cancelled (or returns, or raises). A :class:`Supervisor` starts its children in
order, each one ready before the next starts, watches them, restarts them
according to their :class:`Restart` type and the supervisor's
:class:`Strategy`, and stops them in reverse start order.

Children run in their own *shielded* cancel scopes: cancelling a supervisor does
not cancel its whole subtree at once, it makes the supervisor stop its children
one by one, last started first, so that (say) the endpoint server is gone before
the engine it talks to is shut down.

Too many restarts (more than ``intensity`` within ``period`` seconds) make the
supervisor give up: it stops every child and raises :class:`Escalation` to its
parent, which treats it like any other child failure. The same happens when a
*significant* child (the engine) ends.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog
import trio

from .errors import ActorKilled, Escalation, StartFailed

__all__ = [
    "ActorCell",
    "ActorContext",
    "ActorRegistry",
    "Backoff",
    "ChildSpec",
    "Restart",
    "Strategy",
    "Supervisor",
]


class Restart(enum.Enum):
    """When a child that ended is started again."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after a failure, not after a normal return
    TEMPORARY = "temporary"  # never


class Strategy(enum.Enum):
    """Which children are restarted when one fails."""

    ONE_FOR_ONE = "one_for_one"  # just that one
    ONE_FOR_ALL = "one_for_all"  # all of them
    REST_FOR_ONE = "rest_for_one"  # that one and every child started after it


Shutdown = float | Literal["infinity", "brutal"]


@dataclass(frozen=True)
class Backoff:
    """Delay before a restart. The first restart within a period is immediate;
    later ones wait ``base * 2**(k-2)`` seconds (capped) times a jitter factor."""

    base: float = 0.02
    cap: float = 2.0
    jitter: float = 0.5

    def delay(self, recent_restarts: int, rng: random.Random) -> float:
        if recent_restarts <= 1:
            return 0.0
        raw = min(self.cap, self.base * 2 ** (recent_restarts - 2))
        return float(raw * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter))


# What ``nursery.start`` hands a child; children may report any value.
TaskStatus = trio.TaskStatus[Any]


class ActorFactory(Protocol):
    def __call__(self, ctx: ActorContext, *, task_status: TaskStatus = ...) -> Awaitable[None]: ...


@dataclass(frozen=True)
class ChildSpec:
    """How a supervisor runs one child.

    ``shutdown`` bounds the child's cleanup once it is told to stop: a number of
    seconds, ``"infinity"`` (wait as long as it takes: for supervisors) or
    ``"brutal"`` (no cleanup window at all). Children get the window through
    :meth:`ActorContext.cleanup_scope`.
    """

    name: str
    factory: ActorFactory
    restart: Restart = Restart.PERMANENT
    shutdown: Shutdown = 5.0
    significant: bool = False
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"child name must be non-empty and contain no '/': {self.name!r}")
        if isinstance(self.shutdown, str) and self.shutdown not in ("infinity", "brutal"):
            raise ValueError(f"shutdown must be seconds, 'infinity' or 'brutal', not {self.shutdown!r}")


class ActorState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"  # ready
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"  # ended with an error and will not come back from here


@dataclass(eq=False)
class ActorCell:
    """The supervisor's record of one child. Other code reads it through snapshots."""

    path: str
    spec: ChildSpec
    state: ActorState = ActorState.STOPPED
    restarts: int = 0
    generation: int = 0
    started_at: float | None = None
    last_error: str | None = None
    scope: trio.CancelScope | None = None
    done: trio.Event = field(default_factory=trio.Event)
    stop_deadline: float = math.inf
    kill_error: BaseException | None = None
    stopping: bool = False
    stop_reason: str | None = None
    recent_failures: deque[float] = field(default_factory=deque)  # for backoff
    supervisor: Supervisor | None = None  # set when this child is itself a supervisor

    def snapshot(self) -> dict[str, Any]:
        uptime = (time.monotonic() - self.started_at) if self.started_at and self.state is ActorState.RUNNING else 0.0
        return {
            "path": self.path,
            "state": self.state.value,
            "restarts": self.restarts,
            "uptime_s": round(uptime, 3),
            "last_error": self.last_error,
            "significant": self.spec.significant,
            "restart": self.spec.restart.value,
        }


class ActorRegistry:
    """Every live actor of one tree, by path. Used for ``kill(path)``, the debug
    tree view and the readiness check. Owned by the process, not by any actor."""

    def __init__(self) -> None:
        self._cells: dict[str, ActorCell] = {}
        self._listeners: list[Callable[[str, ActorCell], None]] = []

    def add(self, cell: ActorCell) -> None:
        self._cells[cell.path] = cell

    def remove(self, cell: ActorCell) -> None:
        if self._cells.get(cell.path) is cell:
            del self._cells[cell.path]

    def get(self, path: str) -> ActorCell | None:
        return self._cells.get(path.strip("/"))

    def __iter__(self) -> Iterator[ActorCell]:
        return iter(list(self._cells.values()))

    def snapshot(self) -> list[dict[str, Any]]:
        return [c.snapshot() for c in sorted(self._cells.values(), key=lambda c: c.path)]

    def all_ready(self) -> bool:
        cells = list(self._cells.values())
        return bool(cells) and all(c.state is ActorState.RUNNING for c in cells)

    def subscribe(self, listener: Callable[[str, ActorCell], None]) -> None:
        """``listener(event, cell)`` on every lifecycle event (metrics hook in here)."""
        self._listeners.append(listener)

    def notify(self, event: str, cell: ActorCell) -> None:
        for listener in self._listeners:
            listener(event, cell)

    def kill(self, path: str, error: BaseException | None = None) -> bool:
        """Crash the actor at ``path`` on purpose, as if it had raised ``error``
        (default :class:`ActorKilled`). Its supervisor then restarts it or not
        according to its spec. Returns False when no such actor is running."""
        cell = self.get(path)
        if cell is None or cell.scope is None or cell.done.is_set():
            return False
        cell.kill_error = error if error is not None else ActorKilled(f"{cell.path} killed on request")
        cell.scope.cancel(reason=f"kill: {cell.kill_error}")
        return True


@dataclass
class ActorContext:
    """What an actor gets from its supervisor."""

    path: str
    registry: ActorRegistry
    log: structlog.stdlib.BoundLogger
    _cell: ActorCell | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def child_path(self, name: str) -> str:
        return f"{self.path}/{name}"

    @property
    def stopping(self) -> bool:
        """True while the supervisor stops this actor on purpose (shutdown, a
        sibling's restart), False when it crashed or was killed."""
        return self._cell is not None and self._cell.stopping

    def cleanup_scope(self) -> trio.CancelScope:
        """A shielded scope for cleanup after cancellation, bounded by the
        child's ``shutdown`` setting. Use it in ``finally`` blocks."""
        deadline = self._cell.stop_deadline if self._cell is not None else math.inf
        if deadline == math.inf and self._cell is not None and self._cell.spec.shutdown != "infinity":
            # not being stopped by the supervisor (e.g. crashed): still bounded
            shutdown = self._cell.spec.shutdown
            deadline = trio.current_time() + (0.0 if shutdown == "brutal" else float(shutdown))
        return trio.CancelScope(shield=True, deadline=deadline)

    def bind(self) -> None:
        """Bind ``actor`` into structlog's context for this task and its children."""
        structlog.contextvars.bind_contextvars(actor=self.path)


_log = structlog.get_logger("supervisor.tree")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass
class _Exit:
    cell: ActorCell
    generation: int
    error: BaseException | None  # None: returned normally


@dataclass
class _RestartDue:
    cells: list[ActorCell]


class Supervisor:
    """Runs ``children`` under a restart ``strategy``.

    Use it as a child of another supervisor (``ChildSpec(name, sup.run,
    shutdown="infinity")``) or as the root via :meth:`run` with a context made by
    :func:`root_context`.
    """

    def __init__(
        self,
        children: Sequence[ChildSpec],
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        intensity: int = 3,
        period: float = 5.0,
        *,
        seed: int | None = None,
    ) -> None:
        names = [c.name for c in children]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate child names: {names}")
        if intensity < 0 or period <= 0:
            raise ValueError("intensity must be >= 0 and period > 0")
        self.specs = list(children)
        self.strategy = strategy
        self.intensity = intensity
        self.period = period
        self._rng = random.Random(seed)
        self._restart_times: deque[float] = deque()
        self._cells: list[ActorCell] = []
        self._nursery: trio.Nursery | None = None
        self._events_send: trio.MemorySendChannel[_Exit | _RestartDue] | None = None
        self._ctx: ActorContext | None = None
        self.stop_order: list[str] = []  # paths, in the order they stopped (for tests and logs)

    # -- public -------------------------------------------------------------
    @property
    def cells(self) -> list[ActorCell]:
        return list(self._cells)

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children in order, report ready, supervise until cancelled
        or until giving up (then raise :class:`Escalation`)."""
        self._ctx = ctx
        if ctx._cell is not None:
            ctx._cell.supervisor = self
        send, recv = trio.open_memory_channel[_Exit | _RestartDue](math.inf)
        self._events_send = send
        self._cells = [
            ActorCell(path=ctx.child_path(spec.name), spec=spec) for spec in self.specs
        ]
        escalation: BaseException | None = None
        reason = "supervisor cancelled"
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for cell in self._cells:
                    ctx.registry.add(cell)
                for cell in self._cells:
                    error = await self._start(cell)
                    if error is not None:
                        raise StartFailed(f"{cell.path} failed to start: {_describe(error)}") from error
                task_status.started()
                escalation = await self._supervise(recv)
                reason = f"escalation: {escalation}"
            except StartFailed as exc:
                escalation = exc
                reason = f"start failed: {exc}"
            except trio.Cancelled as cancelled:
                reason = cancelled.reason or reason
                raise
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop_cells(list(reversed(self._cells)), reason)
                    for cell in self._cells:
                        ctx.registry.remove(cell)
                nursery.cancel_scope.cancel(reason="supervisor done")
        if escalation is not None:
            ctx.log.error("actor.escalated", error=_describe(escalation))
            raise escalation

    # -- internals ----------------------------------------------------------
    async def _start(self, cell: ActorCell) -> BaseException | None:
        """Start one child and wait until it is ready. Returns the error if it
        failed before becoming ready (the child is then not running)."""
        assert self._nursery is not None and self._ctx is not None
        cell.generation += 1
        cell.done = trio.Event()
        cell.kill_error = None
        cell.stopping = False
        cell.stop_deadline = math.inf
        cell.state = ActorState.STARTING
        # Not shielded until ready: cancelling a supervisor must interrupt a
        # child that is still starting (an engine loading for 20 s).
        cell.scope = trio.CancelScope()
        start_error: list[BaseException] = []
        await self._nursery.start(self._child_task, cell, cell.generation, start_error)
        return start_error[0] if start_error else None

    async def _child_task(
        self,
        cell: ActorCell,
        generation: int,
        start_error: list[BaseException],
        *,
        task_status: TaskStatus = trio.TASK_STATUS_IGNORED,
    ) -> None:
        assert self._ctx is not None and cell.scope is not None
        structlog.contextvars.bind_contextvars(actor=cell.path)
        registry = self._ctx.registry
        log = structlog.get_logger("supervisor.actor")
        ctx = ActorContext(path=cell.path, registry=registry, log=log, _cell=cell)
        scope = cell.scope
        ready = False

        class _Status:
            def started(self, value: Any = None) -> None:
                nonlocal ready
                if ready:
                    raise RuntimeError("task_status.started() called twice")
                ready = True
                # From now on only our supervisor stops this child, in order.
                scope.shield = True
                cell.state = ActorState.RUNNING
                cell.started_at = time.monotonic()
                log.info("actor.ready", restarts=cell.restarts)
                registry.notify("ready", cell)
                task_status.started(value)

        error: BaseException | None = None
        log.info("actor.started", generation=generation)
        registry.notify("started", cell)
        try:
            with scope:
                try:
                    await cell.spec.factory(ctx, task_status=_Status())
                except Exception as exc:
                    error = exc
                except BaseExceptionGroup as group:  # Cancelled mixed with real errors
                    rest = group.split(trio.Cancelled)[1]
                    if rest is None:
                        raise
                    error = rest
            if scope.cancelled_caught and error is None:
                if cell.kill_error is not None:
                    error = cell.kill_error
                elif not cell.stopping:
                    error = ActorKilled(f"{cell.path} cancelled outside its supervisor")
        finally:
            cell.scope = None
            if cell.stopping and cell.kill_error is None:
                cell.state = ActorState.STOPPED
                log.info("actor.stopped", reason=cell.stop_reason, error=_describe(error) if error else None)
            elif error is not None:
                cell.state = ActorState.CRASHED
                cell.last_error = _describe(error)
                log.warning(
                    "actor.crashed", error=cell.last_error, exc_info=not isinstance(error, ActorKilled)
                )
            else:
                cell.state = ActorState.STOPPED
                log.info("actor.stopped", reason="returned")
            registry.notify("stopped", cell)
            cell.done.set()
        if not ready:
            start_error.append(error if error is not None else StartFailed(f"{cell.path} returned before ready"))
            task_status.started()
            return
        if not cell.stopping and self._events_send is not None:
            self._events_send.send_nowait(_Exit(cell, generation, error))

    async def _supervise(
        self, recv: trio.MemoryReceiveChannel[_Exit | _RestartDue]
    ) -> BaseException | None:
        """Handle child exits until told to stop. Returns an escalation, if any."""
        assert self._ctx is not None
        async for event in recv:
            if isinstance(event, _RestartDue):
                failure = await self._restart(event.cells)
                if failure is not None:
                    return failure
                continue
            cell = event.cell
            if event.generation != cell.generation:
                continue  # a stale exit of a generation we already replaced
            failed = event.error is not None
            spec = cell.spec
            if spec.significant:
                what = _describe(event.error) if event.error else "returned"
                return Escalation(f"significant child {cell.path} ended: {what}", cause=event.error)
            if spec.restart is Restart.TEMPORARY or (spec.restart is Restart.TRANSIENT and not failed):
                continue
            now = trio.current_time()
            self._restart_times.append(now)
            while self._restart_times and self._restart_times[0] < now - self.period:
                self._restart_times.popleft()
            if len(self._restart_times) > self.intensity:
                return Escalation(
                    f"{self._ctx.path}: more than {self.intensity} restarts in {self.period}s "
                    f"(last: {cell.path}: {_describe(event.error) if event.error else 'returned'})",
                    cause=event.error,
                )
            group = self._restart_group(cell)
            others = [c for c in group if c is not cell]
            if others:
                await self._stop_cells(list(reversed(others)), f"{self.strategy.value}: {cell.path} failed")
            for c in group:
                c.state = ActorState.RESTARTING
            # Back off only from the child's own crash loop. A deliberate kill
            # (chaos, kill(path)) says nothing about a failing dependency.
            delay = 0.0
            if not isinstance(event.error, ActorKilled):
                cell.recent_failures.append(now)
                while cell.recent_failures and cell.recent_failures[0] < now - self.period:
                    cell.recent_failures.popleft()
                delay = spec.backoff.delay(len(cell.recent_failures), self._rng)
            if delay > 0:
                assert self._nursery is not None
                self._nursery.start_soon(self._restart_later, group, delay)
            else:
                failure = await self._restart(group)
                if failure is not None:
                    return failure
        return None

    async def _restart_later(self, cells: list[ActorCell], delay: float) -> None:
        await trio.sleep(delay)
        if self._events_send is not None:
            self._events_send.send_nowait(_RestartDue(cells))

    async def _restart(self, cells: list[ActorCell]) -> BaseException | None:
        assert self._ctx is not None
        for cell in cells:
            if cell.state is not ActorState.RESTARTING:
                continue  # something else already handled it
            cell.restarts += 1
            error = await self._start(cell)
            if error is not None:
                # failed to come back: count it like any other failure
                assert self._events_send is not None
                cell.last_error = _describe(error)
                self._events_send.send_nowait(_Exit(cell, cell.generation, error))
                return None
            structlog.get_logger("supervisor.actor").info(
                "actor.restarted", actor=cell.path, restarts=cell.restarts
            )
            self._ctx.registry.notify("restarted", cell)
        return None

    def _restart_group(self, cell: ActorCell) -> list[ActorCell]:
        if self.strategy is Strategy.ONE_FOR_ONE:
            return [cell]
        if self.strategy is Strategy.ONE_FOR_ALL:
            return list(self._cells)
        index = self._cells.index(cell)
        return self._cells[index:]

    async def _stop_cells(self, cells: list[ActorCell], reason: str) -> None:
        for cell in cells:
            await self._stop(cell, reason)

    async def _stop(self, cell: ActorCell, reason: str) -> None:
        if cell.scope is None or cell.done.is_set():
            if cell.state is ActorState.RESTARTING:
                cell.state = ActorState.STOPPED
            return
        shutdown = cell.spec.shutdown
        now = trio.current_time()
        cell.stop_deadline = (
            math.inf if shutdown == "infinity" else now if shutdown == "brutal" else now + float(shutdown)
        )
        cell.stopping = True
        cell.stop_reason = reason
        cell.state = ActorState.STOPPING
        cell.scope.cancel(reason=reason)
        await cell.done.wait()
        self.stop_order.append(cell.path)


def root_context(registry: ActorRegistry, path: str = "root") -> ActorContext:
    log: structlog.stdlib.BoundLogger = structlog.get_logger("supervisor.tree").bind(actor=path)
    return ActorContext(path=path, registry=registry, log=log)


async def run_supervised(
    spec: ChildSpec, registry: ActorRegistry, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED
) -> None:
    """Run one spec (typically the root supervisor) as if it had a parent that
    never restarts it. Errors propagate to the caller."""
    ctx = root_context(registry, spec.name)
    await spec.factory(ctx, task_status=task_status)

