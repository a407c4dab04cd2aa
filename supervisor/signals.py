"""SIGTERM/SIGINT -> the shutdown phases.

Phases, in order: deregister -> refuse new work -> drain (up to the
grace period) -> abort what is left with a migratable error -> cancel the tree
(the supervisors stop their children in reverse start order; the engine shuts
down in its own cleanup) -> exit 0. A second signal during the drain skips the
rest of it.

Actors take part through hooks on :class:`Lifecycle`; the lifecycle itself
knows nothing of what they do.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Awaitable, Callable

import structlog
import trio

DrainHook = Callable[[float], Awaitable[None]]  # called with the drain deadline (trio clock)
Hook = Callable[[], Awaitable[None]]

_log = structlog.get_logger("supervisor.signals")


class Phase(enum.Enum):
    RUNNING = "running"
    DEREGISTERING = "deregistering"
    DRAINING = "draining"
    ABORTING = "aborting"
    STOPPING = "stopping"
    FAILED = "failed"  # engine death / escalation: going down with exit 1


class Lifecycle:
    """The process-wide shutdown state and the hooks actors registered."""

    def __init__(self, grace_period: float = 5.0) -> None:
        self.grace_period = grace_period
        self.phase = Phase.RUNNING
        self.signals_seen = 0
        self._deregister: dict[str, Hook] = {}
        self._drain: dict[str, DrainHook] = {}
        self._abort: dict[str, Hook] = {}
        self._drain_scope: trio.CancelScope | None = None
        self.stopped = trio.Event()  # set once the tree may be cancelled

    # -- state other actors read -------------------------------------------
    @property
    def accepting(self) -> bool:
        """False from the first shutdown phase on: new requests are refused."""
        return self.phase is Phase.RUNNING

    # -- hooks -------------------------------------------------------------
    def on_deregister(self, name: str, hook: Hook) -> Callable[[], None]:
        self._deregister[name] = hook
        return lambda: self._deregister.pop(name, None) and None

    def on_drain(self, name: str, hook: DrainHook) -> Callable[[], None]:
        self._drain[name] = hook
        return lambda: self._drain.pop(name, None) and None

    def on_abort(self, name: str, hook: Hook) -> Callable[[], None]:
        self._abort[name] = hook
        return lambda: self._abort.pop(name, None) and None

    # -- phases ------------------------------------------------------------
    async def deregister_all(self) -> None:
        await _run_hooks("deregister", self._deregister)

    async def _abort_all(self) -> None:
        await _run_hooks("abort", self._abort)

    async def shutdown(self, reason: str) -> None:
        """Run the graceful phases. Returns when the tree may be cancelled."""
        if self.phase is not Phase.RUNNING:
            return
        _log.info("shutdown.started", reason=reason, grace_period_s=self.grace_period)
        self.phase = Phase.DEREGISTERING
        await self.deregister_all()
        self.phase = Phase.DRAINING
        deadline = trio.current_time() + self.grace_period
        with trio.CancelScope() as scope:
            self._drain_scope = scope
            if self.signals_seen > 1:
                scope.cancel(reason="second signal: drain skipped")
            async with trio.open_nursery() as nursery:
                for name, hook in list(self._drain.items()):
                    nursery.start_soon(self._run_drain, name, hook, deadline)
        self._drain_scope = None
        if scope.cancelled_caught:
            _log.warning("shutdown.drain_skipped", reason="second signal")
        self.phase = Phase.ABORTING
        await self._abort_all()
        self.phase = Phase.STOPPING
        _log.info("shutdown.stopping_tree")
        self.stopped.set()

    async def _run_drain(self, name: str, hook: DrainHook, deadline: float) -> None:
        try:
            with trio.move_on_at(deadline) as scope:
                await hook(deadline)
            if scope.cancelled_caught:
                _log.warning("shutdown.drain_timeout", hook=name, grace_period_s=self.grace_period)
        except Exception as exc:
            _log.warning("shutdown.hook_failed", hook=name, phase="drain", error=repr(exc))

    def skip_drain(self) -> None:
        if self._drain_scope is not None:
            self._drain_scope.cancel(reason="second signal: drain skipped")

    async def fail(self, reason: str) -> None:
        """Engine death / escalation: deregister at once, no drain."""
        if self.phase is Phase.FAILED:
            return
        self.phase = Phase.FAILED
        _log.error("shutdown.failing", reason=reason)
        with trio.CancelScope(shield=True):
            await self.deregister_all()
            await self._abort_all()


async def watch_signals(
    lifecycle: Lifecycle,
    tree_scope: trio.CancelScope,
    *,
    signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Turn signals into shutdown phases; cancel ``tree_scope`` when done."""
    with trio.open_signal_receiver(*signums) as signals:
        task_status.started()
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                name = signal.Signals(signum).name
                lifecycle.signals_seen += 1
                if lifecycle.signals_seen == 1:
                    _log.info("signal.received", signal=name, action="graceful shutdown")
                    nursery.start_soon(_shutdown_then_cancel, lifecycle, tree_scope, name)
                else:
                    _log.warning("signal.received", signal=name, action="skip drain")
                    lifecycle.skip_drain()


async def _shutdown_then_cancel(lifecycle: Lifecycle, tree_scope: trio.CancelScope, name: str) -> None:
    await lifecycle.shutdown(reason=name)
    tree_scope.cancel(reason=f"{name}: shutdown")


async def _run_hooks(phase: str, hooks: dict[str, Hook], limit_s: float = 2.0) -> None:
    for name, hook in list(hooks.items()):
        try:
            with trio.move_on_after(limit_s):
                await hook()
        except Exception as exc:  # one failing hook must not stop the others
            _log.warning("shutdown.hook_failed", hook=name, phase=phase, error=repr(exc))
