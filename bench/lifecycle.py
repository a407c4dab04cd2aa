"""Recovery and lifecycle of the tree (synthetic engine, no model):

- in-process restart latency of a trivial child (the runtime's own cost);
- out-of-process restart latency of a non-engine actor, kill -> ready, taken
  from the worker's own log timestamps (actor.crashed -> actor.ready);
- SIGTERM -> process exit for an idle worker, seen from outside;
- cold start: process start -> /ready 200.
"""

from __future__ import annotations

import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor.tree import ActorContext, ActorRegistry, ChildSpec, Supervisor, TaskStatus, root_context
from tests.procs import Worker

from .common import summary, write


async def _in_process(kills: int) -> list[float]:
    ready = trio.Event()

    async def child(ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        ready.set()
        await trio.sleep_forever()

    sup = Supervisor([ChildSpec("a", child)], intensity=kills + 1, period=1e9)
    registry = ActorRegistry()
    samples: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, root_context(registry))
        for _ in range(kills):
            ready = trio.Event()
            t0 = time.perf_counter()
            registry.kill("root/a")
            await ready.wait()
            samples.append(time.perf_counter() - t0)
        nursery.cancel_scope.cancel()
    return samples


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


KILL_SPACING_S = 0.1


def out_of_process(kills: int, path: str) -> list[float]:
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(open("/dev/null", "w")))  # noqa: SIM115
    w = Worker("--engine", "synthetic", "--enable-chaos")
    try:
        w.wait_ready()
        for _ in range(kills):
            started = time.monotonic()
            assert w.post(f"/debug/actors/{path}/kill").status_code == 200
            w.wait_ready(timeout=10)
            # at most 10 kills a second: the root's restart intensity (20 in 1 s) would take the
            # worker down on purpose, and this measures a restart, not the escalation
            time.sleep(max(0.0, KILL_SPACING_S - (time.monotonic() - started)))
        events = w.events()
    finally:
        w.stop()
    samples = []
    crashed_at: float | None = None
    for ev in events:
        if ev.get("actor") != path:
            continue
        if ev["event"] == "actor.crashed":
            crashed_at = _ts(ev)
        elif ev["event"] == "actor.ready" and crashed_at is not None:
            samples.append(_ts(ev) - crashed_at)
            crashed_at = None
    return samples


def sigterm_idle(runs: int) -> tuple[list[float], list[float]]:
    exits, starts = [], []
    for _ in range(runs):
        t0 = time.monotonic()
        w = Worker("--engine", "synthetic")
        try:
            w.wait_ready()
            starts.append(time.monotonic() - t0)
            t1 = time.monotonic()
            w.signal(signal.SIGTERM)
            status = w.wait(10)
            exits.append(time.monotonic() - t1)
            assert status == 0
        finally:
            w.stop()
    return exits, starts


def run(quick: bool = False) -> dict[str, Any]:
    kills = 200 if quick else 1000
    inproc = trio.run(_in_process, kills)
    health = out_of_process(50 if quick else 200, "root/health")
    listener = out_of_process(50 if quick else 200, "root/endpoint/listener")
    exits, starts = sigterm_idle(5 if quick else 10)
    result = {
        "restart_in_process_us": summary(inproc, 1e6, 1),
        "restart_health_ms": summary(health, 1e3),
        "restart_listener_ms": summary(listener, 1e3),
        "sigterm_exit_idle_ms": summary(exits, 1e3, 0),
        "cold_start_to_ready_ms": summary(starts, 1e3, 0),
    }
    if "--no-vllm" not in sys.argv:  # engine death, SIGTERM under load, vLLM cold start: bench/recovery.py
        from . import recovery

        result.update(recovery.run(quick))
    write("lifecycle", result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2))
