"""The workload and its statistics, shared by every variant of the overhead benchmark.

A *level* is a number of concurrent streams (closed loop): each of ``streams``
users sends requests back to back until ``requests`` have been sent in all.
Every request has fixed prompt token ids (its index picks them), greedy
sampling, ``ignore_eos`` and a fixed ``max_tokens``, so every variant does
exactly the same engine work.

A :class:`Sample` is one request as its client saw it: when it was sent, when
each chunk (one engine step's delta) arrived, how many tokens it got.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .common import pct

__all__ = ["CpuMeter", "Level", "Sample", "Timer", "aggregate", "engine_pids", "engine_ttft", "foreign_engines",
           "guarded", "pin_front_end", "pin_threads", "prompt_ids", "record", "wait_for_quiet"]


@dataclass(frozen=True)
class Level:
    streams: int
    requests: int
    prompt_len: int
    max_tokens: int
    vocab: int = 32000
    name: str = ""

    @property
    def key(self) -> str:
        return self.name or str(self.streams)

    def as_dict(self) -> dict[str, Any]:
        return {"streams": self.streams, "requests": self.requests, "prompt_len": self.prompt_len,
                "max_tokens": self.max_tokens, "vocab": self.vocab, "name": self.name}


@dataclass
class Sample:
    start: float
    chunks: list[float] = field(default_factory=list)
    end: float = 0.0
    tokens: int = 0
    error: str | None = None

    def chunk(self, now: float) -> None:
        self.chunks.append(now)


def prompt_ids(index: int, length: int, vocab: int) -> list[int]:
    """Fixed, distinct per request, away from the special ids at the bottom of the vocabulary."""
    span = max(1, vocab - 200)
    return [100 + (index * 7919 + j * 104729) % span for j in range(length)]


class Timer:
    """perf_counter, and the process's own CPU time."""

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def process_cpu(*pids: int) -> float:
    """User + system CPU seconds of some processes (not their children)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def engine_pids(root_pid: int) -> list[int]:
    """vLLM's engine processes under ``root_pid``: EngineCore (scheduler) and its VLLM::Worker
    (the model; on CPU pinned to core 0, while everything else shares the other core)."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for proc in children:
        try:
            if proc.name().startswith("VLLM::") or "EngineCore" in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def engine_ttft(metrics_text: str) -> tuple[float, float]:
    """(sum, count) of vLLM's own ``vllm:time_to_first_token_seconds`` in a Prometheus page:
    from the request reaching AsyncLLM to its first token leaving the output processor."""
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "vllm:time_to_first_token_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return total, count


def foreign_engines(*own_roots: int) -> list[int]:
    """vLLM engine processes on this machine that are not under any of ``own_roots``
    (someone else's engine: it would share our two cores and distort every number)."""
    import psutil

    own: set[int] = set()
    for root in own_roots:
        try:
            own.update(p.pid for p in psutil.Process(root).children(recursive=True))
        except psutil.Error:
            continue
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.info["name"] and proc.info["name"].startswith("VLLM::") and proc.pid not in own:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


FOREIGN_CPU_LIMIT = 0.10  # of one core: more than this from someone else's processes spoils a run


def _own_pids(own_roots: tuple[int, ...]) -> set[int]:
    import os

    import psutil

    own = {os.getpid()}
    for root in (os.getpid(), *own_roots):
        try:
            own.add(root)
            own.update(p.pid for p in psutil.Process(root).children(recursive=True))
        except psutil.Error:
            continue
    return own


class ForeignLoad:
    """CPU seconds spent by processes that are not ours (this process, ``own_roots`` and their
    descendants) between construction and :meth:`stop`: someone else's tests or engine on
    our two cores. Processes that started meanwhile count in full."""

    def __init__(self, *own_roots: int) -> None:
        self.own_roots = own_roots
        self.t0 = time.monotonic()
        self.start = self._snapshot()

    def _snapshot(self) -> dict[tuple[int, float], float]:
        import psutil

        own = _own_pids(self.own_roots)
        snap: dict[tuple[int, float], float] = {}
        for proc in psutil.process_iter(["pid", "create_time", "cpu_times"]):
            info = proc.info
            if info["pid"] in own or info["cpu_times"] is None:
                continue
            snap[(info["pid"], info["create_time"])] = info["cpu_times"].user + info["cpu_times"].system
        return snap

    def stop(self) -> float:
        """Foreign CPU as a fraction of one core over the interval."""
        end = self._snapshot()
        used = sum(cpu - self.start.get(key, 0.0) for key, cpu in end.items())
        return max(0.0, used) / max(1e-6, time.monotonic() - self.t0)


def wait_for_quiet(*own_roots: int, limit_s: float = 1800.0) -> float:
    """Wait until no other vLLM engine runs and other processes use under FOREIGN_CPU_LIMIT of a
    core (at most ``limit_s``); returns the seconds waited."""
    import sys

    started = time.monotonic()
    told = False
    while time.monotonic() - started < limit_s:
        engines = foreign_engines(*own_roots)
        if not engines:
            probe = ForeignLoad(*own_roots)
            time.sleep(1.0)
            load = probe.stop()
            if load < FOREIGN_CPU_LIMIT:
                break
        if not told:
            why = f"vLLM engine pids {engines}" if engines else f"{load:.0%} of a core"
            print(f"waiting for other work on this machine to end ({why})", file=sys.stderr, flush=True)
            told = True
        time.sleep(2.0)
    return time.monotonic() - started


def guarded(run: Callable[[], dict[str, Any]], *own_roots: int, tries: int = 3) -> dict[str, Any]:
    """``run()`` on a quiet machine: wait for quiet, run, and run again (up to ``tries`` times)
    if another vLLM engine was there at the end or other processes used more than
    FOREIGN_CPU_LIMIT of a core meanwhile. The record says how it went."""
    rec: dict[str, Any] = {}
    waited = 0.0
    for attempt in range(tries):
        waited += wait_for_quiet(*own_roots)
        load = ForeignLoad(*own_roots)
        rec = run()
        rec["foreign_cpu"] = round(load.stop(), 3)
        rec["disturbed"] = bool(foreign_engines(*own_roots)) or rec["foreign_cpu"] > FOREIGN_CPU_LIMIT
        rec["attempts"] = attempt + 1
        if not rec["disturbed"]:
            break
    rec["waited_s"] = round(waited, 1)
    return rec


def pin_front_end(root_pid: int) -> set[int]:
    """vLLM on CPU binds its model worker (VLLM::Worker) to some cores and leaves the rest
    "reserved" for everything else, but does not move anything else there: the scheduler
    then puts the EngineCore, the front end and the client on the model's core now and then,
    and how much it does that changed a run's speed by 20-30% from one start to the next.
    So pin ``root_pid`` and its descendants, except the model workers, thread by thread, to
    the cores the model does not use (what vLLM means them to have). Returns those cores."""
    import os

    import psutil

    try:
        procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.Error:
        return set()
    model_cores: set[int] = set()
    others = []
    for proc in procs:
        try:
            if proc.name().startswith("VLLM::Worker"):
                model_cores |= set(proc.cpu_affinity())
            else:
                others.append(proc.pid)
        except psutil.Error:
            continue
    free = set(range(os.cpu_count() or 1)) - model_cores
    if not model_cores or not free:
        return set()
    for pid in others:
        pin_threads(pid, free)
    return free


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` to ``cpus`` (threads started later inherit their creator's)."""
    import os

    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            continue


class CpuMeter:
    """CPU seconds spent by a few groups of processes over one run."""

    def __init__(self, **groups: int | list[int] | None) -> None:
        self.groups = {name: [g] if isinstance(g, int) else list(g) for name, g in groups.items() if g}
        self.start = {name: process_cpu(*pids) for name, pids in self.groups.items()}

    def stop(self) -> dict[str, float]:
        return {f"{name}_cpu_s": process_cpu(*pids) - self.start[name] for name, pids in self.groups.items()}


def record(samples: list[Sample], wall: float, client_cpu: float | None = None) -> dict[str, Any]:
    """One run of one level: the raw latencies (pooled later across runs) and its throughput."""
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in ok)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_kinds": sorted({s.error for s in samples if s.error is not None}),
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall if wall > 0 else 0.0,
        "client_cpu_s": client_cpu,
        "chunks": sum(len(s.chunks) for s in ok),
        "ttft": [s.chunks[0] - s.start for s in ok if s.chunks],
        "itl": [b - a for s in ok for a, b in zip(s.chunks, s.chunks[1:], strict=False)],
    }


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of the same variant and level: mean throughput (and its spread), pooled percentiles."""
    if not records:
        return {}
    rates = [r["tok_s"] for r in records]
    ttft = [x for r in records for x in r["ttft"]]
    itl = [x for r in records for x in r["itl"]]
    tokens = sum(r["tokens"] for r in records)
    out: dict[str, Any] = {
        "runs": len(records),
        "requests": sum(r["requests"] for r in records),
        "errors": sum(r["errors"] for r in records),
        "tok_s": round(statistics.fmean(rates), 2),
        "tok_s_min": round(min(rates), 2),
        "tok_s_max": round(max(rates), 2),
        "ttft_p50_ms": round(pct(ttft, 50) * 1e3, 2),
        "ttft_p99_ms": round(pct(ttft, 99) * 1e3, 2),
        "itl_p50_ms": round(pct(itl, 50) * 1e3, 3),
        "itl_p99_ms": round(pct(itl, 99) * 1e3, 3),
        "tokens_per_chunk": round(tokens / max(1, sum(r["chunks"] for r in records)), 3),
    }
    ttft_sum = sum(r.get("engine_ttft_sum", 0.0) for r in records)
    ttft_count = sum(r.get("engine_ttft_count", 0.0) for r in records)
    if ttft_count and ttft:
        # the same requests, the same engine: what the path to and from vLLM added to its TTFT
        out["ttft_mean_ms"] = round(statistics.fmean(ttft) * 1e3, 2)
        out["engine_ttft_mean_ms"] = round(ttft_sum / ttft_count * 1e3, 2)
        out["ttft_over_engine_mean_ms"] = round(out["ttft_mean_ms"] - out["engine_ttft_mean_ms"], 2)
    for who in ("client", "server", "engine"):
        cpu = [r[f"{who}_cpu_s"] for r in records if r.get(f"{who}_cpu_s") is not None]
        if len(cpu) == len(records):
            out[f"{who}_cpu_us_per_token"] = round(sum(cpu) / max(1, tokens) * 1e6, 1)
    disturbed = sum(1 for r in records if r.get("disturbed"))
    if disturbed:
        out["disturbed_runs"] = disturbed  # another vLLM engine was running at the end of the run
    kinds = sorted({k for r in records for k in r["error_kinds"]})
    if kinds:
        out["error_kinds"] = kinds
    return out
