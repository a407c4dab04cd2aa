"""Recovery and shutdown with streams in flight, and cold start (part of the lifecycle suite).

- engine death: SIGKILL the vLLM EngineCore while 8 streams run -> the worker exits 1;
  measured from the kill to the worker's exit (seen from outside), with the log's
  ``worker.failed`` time and what the clients got;
- SIGTERM with 8 streams in flight -> exit 0, on the synthetic engine (many runs: the
  tree's own cost) and on vLLM (engine shutdown included). The streams outlast the
  grace period (set to GRACE_S), so they are aborted with a migratable error; we
  report SIGTERM -> exit and that minus the grace period;
- cold start of the default vLLM worker (the demo model, ``scripts/run``'s flags):
  process start -> /ready 200, minus the engine's own load time (``engine.ready``'s
  ``load_time_s``: building AsyncLLM), split into process start -> ``worker.starting``
  (Python and vLLM imports, configuration) and the rest.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from supervisor.client import Call, CallError
from tests.procs import Worker

from .common import summary
from .loadgen import engine_pids, guarded, wait_for_quiet

GRACE_S = 1.0
STREAMS = 8


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _event(worker: Worker, name: str) -> dict[str, Any] | None:
    return next((e for e in worker.events() if e.get("event") == name), None)


async def _streams_then(address: str, max_tokens: int, act: Any) -> list[str]:
    """Start STREAMS streams, wait until each has its first item, call ``act()`` (sync,
    in a thread), let the streams end; return how each ended."""
    outcomes: list[str] = []
    streaming = trio.Semaphore(0)

    async def one(i: int) -> None:
        payload = {"token_ids": [1 + i, 2, 3, 4], "sampling_options": {"temperature": 0.0},
                   "stop_conditions": {"max_tokens": max_tokens, "ignore_eos": True}}
        first = True
        try:
            async with Call(address, "generate", payload) as call:
                async for _ in call:
                    if first:
                        streaming.release()
                        first = False
            outcomes.append("finished")
        except CallError as exc:
            if first:
                streaming.release()
            outcomes.append(f"{exc.code}{' (migratable)' if exc.migratable else ''}")

    async with trio.open_nursery() as nursery:
        for i in range(STREAMS):
            nursery.start_soon(one, i)
        for _ in range(STREAMS):
            await streaming.acquire()
        await trio.to_thread.run_sync(act)
    return outcomes


def _address(worker: Worker) -> str:
    return f"127.0.0.1:{worker.wait_event('request_plane.listening')['port']}"


def _vllm_env() -> dict[str, str | None]:
    return {"VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": str(GRACE_S),
            "DYN_FILE_DISCOVERY_DIR": tempfile.mkdtemp(prefix="bench-recovery-")}


def _start_default_vllm() -> tuple[Worker, dict[str, float]]:
    """The default worker (demo model); returns it ready, with its cold start breakdown."""
    wait_for_quiet()
    t0 = time.time()
    tree = os.environ.get("BENCH_WORKER_TREE")  # another checkout, for before/after runs
    worker = Worker("--engine", "vllm", "--system-port", "0", env=_vllm_env(), cwd=Path(tree) if tree else None)
    worker.wait_ready(timeout=300)
    ready = time.time()
    starting = _event(worker, "worker.starting")
    engine = _event(worker, "engine.ready")
    assert starting is not None and engine is not None
    load = float(engine["load_time_s"])
    return worker, {
        "to_ready_s": ready - t0,
        "engine_load_s": load,
        "minus_engine_load_s": ready - t0 - load,
        "to_worker_starting_s": _ts(starting) - t0,
        "rest_s": ready - _ts(starting) - load,
    }


def engine_kill(worker: Worker) -> dict[str, Any]:
    box: dict[str, float] = {}

    def kill() -> None:
        pids = engine_pids(worker.proc.pid)
        core = next(p for p in pids if _is_core(p))
        box["killed"] = time.time()
        os.kill(core, signal.SIGKILL)
        status = worker.wait(60)
        box["exited"] = time.time()
        box["status"] = status

    outcomes = trio.run(_streams_then, _address(worker), 3000, kill)
    failed = _event(worker, "worker.failed")
    return {
        "exit_s": box["exited"] - box["killed"],
        "status": box["status"],
        "failed_logged_s": _ts(failed) - box["killed"] if failed else None,
        "outcomes": sorted(outcomes),
    }


def _is_core(pid: int) -> bool:
    import psutil

    try:
        return "EngineCore" in psutil.Process(pid).name() or "EngineCore" in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def sigterm_streams(worker: Worker, max_tokens: int) -> dict[str, Any]:
    box: dict[str, float] = {}

    def term() -> None:
        box["signalled"] = time.time()
        worker.signal(signal.SIGTERM)
        box["status"] = worker.wait(60)
        box["exited"] = time.time()

    outcomes = trio.run(_streams_then, _address(worker), max_tokens, term)
    out: dict[str, Any] = {
        "exit_s": box["exited"] - box["signalled"],
        "status": box["status"],
        "outcomes": sorted(outcomes),
    }
    shutdown = _event(worker, "engine.shutdown")
    if shutdown is not None:
        out["engine_shutdown_s"] = shutdown.get("took_s")
    return out


def run(quick: bool = False) -> dict[str, Any]:
    vllm_runs = 1 if quick else 3
    synthetic_runs = 5 if quick else 20

    synth: list[dict[str, Any]] = []
    for _ in range(synthetic_runs):
        tree = os.environ.get("BENCH_WORKER_TREE")
        worker = Worker("--engine", "synthetic", "--synthetic-step-ms", "10", "--system-port", "0",
                        env={"DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": str(GRACE_S),
                             "DYN_FILE_DISCOVERY_DIR": tempfile.mkdtemp(prefix="bench-recovery-")},
                        cwd=Path(tree) if tree else None)
        try:
            worker.wait_ready()
            synth.append(guarded(lambda w=worker: sigterm_streams(w, 3000), worker.proc.pid, tries=1))
        finally:
            worker.stop()

    kills: list[dict[str, Any]] = []
    terms: list[dict[str, Any]] = []
    starts: list[dict[str, float]] = []
    for _ in range(vllm_runs):
        for kind in ("kill", "term"):
            worker, start = _start_default_vllm()
            try:
                starts.append(start)
                if kind == "kill":
                    kills.append(engine_kill(worker))
                else:
                    terms.append(sigterm_streams(worker, 3000))
            finally:
                worker.stop()

    def seconds(rows: list[dict[str, Any]], key: str, minus: float = 0.0) -> dict[str, float]:
        return summary([r[key] - minus for r in rows if r.get(key) is not None], 1e3, 0)

    return {
        "engine_sigkill_to_exit_ms": seconds(kills, "exit_s"),
        "engine_sigkill_to_failed_log_ms": seconds(kills, "failed_logged_s"),
        "sigterm_8_streams_exit_synthetic_ms": seconds(synth, "exit_s"),
        "sigterm_8_streams_exit_synthetic_minus_grace_ms": seconds(synth, "exit_s", GRACE_S),
        "sigterm_8_streams_exit_vllm_ms": seconds(terms, "exit_s"),
        "sigterm_8_streams_exit_vllm_minus_grace_ms": seconds(terms, "exit_s", GRACE_S),
        "vllm_engine_shutdown_ms": seconds(terms, "engine_shutdown_s"),
        "cold_start_vllm_to_ready_ms": seconds(starts, "to_ready_s"),
        "cold_start_vllm_engine_load_ms": seconds(starts, "engine_load_s"),
        "cold_start_vllm_minus_engine_load_ms": seconds(starts, "minus_engine_load_s"),
        "cold_start_vllm_imports_and_config_ms": seconds(starts, "to_worker_starting_s"),
        "cold_start_vllm_rest_ms": seconds(starts, "rest_s"),
        "details": {
            "grace_period_s": GRACE_S,
            "engine_kill": kills,
            "sigterm_vllm": terms,
            "sigterm_synthetic_outcomes": sorted({o for r in synth for o in r["outcomes"]}),
            "sigterm_synthetic_status": sorted({r["status"] for r in synth}),
            "cold_starts": starts,
        },
    }


if __name__ == "__main__":
    # only this part of the lifecycle suite (e.g. with BENCH_WORKER_TREE for a before/after run)
    import sys

    from . import common

    common.COMMAND = " ".join(["python -m bench.recovery", *sys.argv[1:]])
    result = run("--quick" in sys.argv)
    if os.environ.get("BENCH_WORKER_TREE"):
        result["worker_tree"] = os.environ["BENCH_WORKER_TREE"]
    common.write(os.environ.get("BENCH_OUT_NAME", "recovery"), result)
