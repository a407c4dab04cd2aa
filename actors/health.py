"""The health monitor: asks the engine how it is every ``interval`` seconds.

An engine that says it is dead, or does not answer within ``timeout``, is
declared dead through its :class:`EngineRef`; the engine actor is significant,
so that takes the tree down (exit 1). The monitor itself holds no state that
matters: killed, it just starts polling again.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from supervisor.errors import EngineDead, EngineUnhealthy
from supervisor.tree import ActorContext, TaskStatus

from .engine.actor import EngineRef

__all__ = ["HealthMonitor", "HealthStatus"]


@dataclass
class HealthStatus:
    """Last verdict, read by the system server. Owned above the monitor so it
    survives the monitor's restarts."""

    healthy: bool = False
    checks: int = 0
    last_error: str | None = None


class HealthMonitor:
    def __init__(
        self,
        engine: EngineRef,
        status: HealthStatus,
        *,
        interval: float = 2.0,
        timeout: float = 3.0,
    ) -> None:
        self.engine = engine
        self.status = status
        self.interval = interval
        self.timeout = timeout

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        await self.engine.wait_ready()
        task_status.started()
        while True:
            await self.check_once(ctx)
            await trio.sleep(self.interval)

    async def check_once(self, ctx: ActorContext) -> bool:
        error: EngineDead | None = None
        with trio.move_on_after(self.timeout) as scope:
            try:
                await self.engine.check_health()
            except EngineDead as exc:
                error = EngineUnhealthy(f"engine check_health failed: {exc}")
        if scope.cancelled_caught:
            error = EngineUnhealthy(f"engine did not answer check_health within {self.timeout}s")
        self.status.checks += 1
        if error is None:
            if not self.status.healthy:
                ctx.log.info("health.ok")
            self.status.healthy = True
            self.status.last_error = None
            return True
        self.status.healthy = False
        self.status.last_error = str(error)
        ctx.log.error("health.engine_dead", error=str(error))
        self.engine.declare_dead(error)
        return False
