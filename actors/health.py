"""The health monitor: asks the engine how it is every ``interval`` seconds,
and sends a canary request through it when the endpoint has been idle.

An engine that says it is dead is declared dead through its :class:`EngineRef`;
the engine actor is significant, so that takes the tree down (exit 1). A check
not answered within ``timeout`` or a failed canary marks the worker unhealthy
(``/health`` 503); three of either in a row declare the engine dead. One slow
answer is no verdict: on a loaded host the worker's own event loop can stall
for seconds while the engine is fine. The canary is a request like any other:
it goes through the request pipeline.

A sleeping engine is left alone: no health check and no canary is sent while
the worker is asleep (vLLM pauses scheduling then, so a canary would never be
answered), and the verdict waits for the wake-up. The monitor holds no state
that matters: killed, it starts polling again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from supervisor.tree import ActorContext, TaskStatus

from .engine.actor import EngineRef
from .engine.base import EngineInfo
from .errors import EngineDead, EngineUnhealthy, ErrorCode
from .handlers import Handlers
from .pipeline import RequestPipeline, Status, Ticket

__all__ = ["Canary", "HealthMonitor", "HealthStatus"]

CANARY_FAILURES_FATAL = 3
CHECK_TIMEOUTS_FATAL = 3


@dataclass
class HealthStatus:
    """Last verdict, read by the system server. Owned above the monitor so it
    survives the monitor's restarts."""

    healthy: bool = False
    asleep: bool = False  # the monitor stands aside while the engine sleeps
    asleep_ticks: int = 0  # rounds the monitor stood aside (the engine was left alone)
    checks: int = 0
    canaries: int = 0
    canary_failures: int = 0
    check_timeouts: int = 0  # checks in a row not answered within the timeout
    last_error: str | None = None


@dataclass
class Canary:
    """A small real request sent when the endpoint has been idle for ``wait``
    seconds: the BOS token, greedy, one token (or ``payload``)."""

    handlers: Handlers
    pipeline: RequestPipeline
    wait: float = 10.0
    timeout: float = 3.0
    payload: Mapping[str, Any] | None = None
    sent: int = field(default=0)

    def request(self, info: EngineInfo | None) -> dict[str, Any]:
        """The BOS token, greedy, one token. On a disaggregated worker the prompt is one
        full KV block and a token more: vLLM 0.32's ExampleConnector fails the engine on a
        repeated prompt shorter than a block, which a short canary is every time."""
        if self.payload is not None:
            return dict(self.payload)
        bos = info.bos_token_id if info is not None and info.bos_token_id is not None else 1
        length = 1
        if self.handlers.role in ("prefill", "decode") and info is not None:
            length = info.block_size + 1
        return {"token_ids": [bos] * length, "sampling_options": {"temperature": 0.0},
                "stop_conditions": {"max_tokens": 1}}


class HealthMonitor:
    def __init__(
        self,
        engine: EngineRef,
        status: HealthStatus,
        *,
        interval: float = 2.0,
        timeout: float = 3.0,
        canary: Canary | None = None,
        asleep: Callable[[], bool] = lambda: False,
    ) -> None:
        self.engine = engine
        self.status = status
        self.interval = interval
        self.timeout = timeout
        self.canary = canary
        self.asleep = asleep

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        await self.engine.wait_ready()
        task_status.started()
        while True:
            if self.asleep():
                if not self.status.asleep:
                    ctx.log.info("health.paused", reason="engine asleep")
                self.status.asleep = True
                self.status.asleep_ticks += 1
            else:
                if self.status.asleep:
                    ctx.log.info("health.resumed", reason="engine awake")
                    self.status.asleep = False
                    if self.canary is not None:
                        self.canary.pipeline.inflight.touch()  # a full idle wait before the next canary
                canary = self.canary
                if (await self.check_once(ctx) and canary is not None
                        and canary.pipeline.inflight.idle_for() >= canary.wait and not self.asleep()):
                    await self.send_canary(ctx, canary)
            await trio.sleep(self.interval)

    async def check_once(self, ctx: ActorContext) -> bool:
        error: EngineDead | None = None
        with trio.move_on_after(self.timeout) as scope:
            try:
                await self.engine.check_health()
            except EngineDead as exc:
                error = EngineUnhealthy(f"engine check_health failed: {exc}")
        self.status.checks += 1
        if scope.cancelled_caught:
            self.status.check_timeouts += 1
            error = EngineUnhealthy(f"engine did not answer check_health within {self.timeout}s "
                                    f"({self.status.check_timeouts} times in a row)")
            if self.status.check_timeouts < CHECK_TIMEOUTS_FATAL:
                self.status.healthy = False
                self.status.last_error = str(error)
                ctx.log.warning("health.check_slow", error=str(error), timeouts=self.status.check_timeouts)
                return False
        elif error is None:
            self.status.check_timeouts = 0
        if error is None:
            # a failing canary keeps the worker unhealthy until a canary passes
            if self.status.canary_failures == 0:
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

    async def send_canary(self, ctx: ActorContext, canary: Canary) -> bool:
        canary.sent += 1
        self.status.canaries += 1
        request_id = f"health-canary-{canary.sent}"
        info = self.engine.info
        problem: str | None = None
        got: list[Any] = []

        async def work(ticket: Ticket) -> None:
            request = await canary.handlers.prepare(canary.request(info), ticket.key)
            async with self.engine.generate(request) as stream:
                got.extend([out async for out in stream])

        with trio.move_on_after(canary.timeout) as scope:
            outcome = await canary.pipeline.run("generate", request_id, work)
            if outcome.error is not None and outcome.error.code in (ErrorCode.SHUTTING_DOWN, ErrorCode.UNAVAILABLE):
                # not the engine's fault: the worker began to shut down or was put to sleep meanwhile
                ctx.log.info("health.canary_skipped", request_id=request_id, reason=outcome.error.message)
                return True
            if outcome.error is not None:
                problem = f"canary failed: {outcome.error.code.value}: {outcome.error.message}"
            elif outcome.status is Status.OK and (not got or not got[-1].final):
                problem = "canary ended without a finish reason"
        if scope.cancelled_caught:
            problem = f"canary got no answer within {canary.timeout}s"
        canary.pipeline.inflight.touch()
        ctx.log.info("health.canary", ok=problem is None, request_id=request_id, error=problem)
        if problem is None:
            self.status.canary_failures = 0
            self.status.healthy = True
            self.status.last_error = None
            return True
        self.status.canary_failures += 1
        self.status.healthy = False
        self.status.last_error = problem
        ctx.log.warning("health.canary_failed", error=problem, failures=self.status.canary_failures)
        if self.status.canary_failures >= CANARY_FAILURES_FATAL:
            self.engine.declare_dead(EngineUnhealthy(f"{self.status.canary_failures} canaries failed: {problem}"))
        return False
