"""Speed of light: the synthetic engine with zero step time, so every microsecond is the tree's.

The worker is pinned to CPU 0 and the clients (this process) to CPU 1, so the
worker has exactly one core. Each stream is one long request; the engine emits
one token per running request per step, as fast as the tree takes them. We
count the tokens the clients receive and the CPU the worker process spends:

- tok/s (wall): what reached clients per second;
- worker CPU us/token: the worker's user+system CPU over the run / tokens;
- tok/s per worker core: 1e6 / (CPU us per token), what one fully busy core streams;
- worker CPU %: whether the worker (and not the client) was the bottleneck.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.procs import Worker

from .clients import http_level, tcp_level
from .common import pct, write
from .loadgen import CpuMeter, Level, guarded

__all__ = ["markdown", "run"]

WORKER_CPU = 0
CLIENT_CPU = 1


def _start_worker(*extra: str) -> Worker:
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {WORKER_CPU})  # the worker inherits it, threads included
    tree = os.environ.get("BENCH_WORKER_TREE")  # another checkout, for before/after comparisons
    try:
        return Worker("--engine", "synthetic", "--synthetic-step-ms", "0", "--system-port", "0",
                      "--http-port", "0", *extra,
                      env={"DYN_FILE_DISCOVERY_DIR": tempfile.mkdtemp(prefix="bench-speed-")},
                      cwd=Path(tree) if tree else None)
    finally:
        os.sched_setaffinity(0, mine)


def address_of(worker: Worker) -> str:
    return f"127.0.0.1:{worker.wait_event('request_plane.listening')['port']}"


def base_of(worker: Worker) -> str:
    return f"http://127.0.0.1:{worker.wait_event('http.listening')['port']}"


def measure(worker: Worker, transport: str, level: Level) -> dict[str, Any]:
    address, base = address_of(worker), base_of(worker)

    def one() -> dict[str, Any]:
        meter = CpuMeter(worker=worker.proc.pid)
        rec = (tcp_level(address, level, "sol") if transport == "tcp"
               else http_level(base, level, "sol", "synthetic"))
        return {**rec, **meter.stop()}

    rec = guarded(one, worker.proc.pid)  # a vLLM engine elsewhere would spin on the worker's core
    cpu = rec["worker_cpu_s"]
    tokens = rec["tokens"]
    us = cpu / max(1, tokens) * 1e6
    return {
        "transport": transport,
        "streams": level.streams,
        "tokens": tokens,
        "errors": rec["errors"],
        "wall_s": round(rec["wall_s"], 3),
        "tok_s": round(rec["tok_s"]),
        "worker_cpu_us_per_token": round(us, 2),
        "tok_s_per_worker_core": round(1e6 / us) if us > 0 else None,
        "worker_cpu_pct": round(100 * cpu / rec["wall_s"], 1),
        "client_cpu_us_per_token": round(rec["client_cpu_s"] / max(1, tokens) * 1e6, 2),
        "tokens_per_chunk": round(tokens / max(1, rec["chunks"]), 2),
        "disturbed": rec["disturbed"],
    }


def run(quick: bool = False) -> dict[str, Any]:
    total = 100_000 if quick else 400_000
    shapes = [1, 8, 64]
    results: list[dict[str, Any]] = []
    ttft: list[dict[str, Any]] = []
    mine = os.sched_getaffinity(0)
    worker = _start_worker()
    try:
        worker.wait_ready()
        os.sched_setaffinity(0, {CLIENT_CPU})
        # warm up both paths
        measure(worker, "tcp", Level(8, 8, 8, 200))
        measure(worker, "http", Level(8, 8, 8, 200))
        for streams in shapes:
            for transport in ("tcp", "http"):
                per_stream = max(100, total // streams // (4 if transport == "http" else 1))
                res = measure(worker, transport, Level(streams, streams, 8, per_stream))
                results.append(res)
                print(f"  {transport:>4} {streams:>3} streams: {res['tok_s']} tok/s, "
                      f"{res['worker_cpu_us_per_token']} us/token, worker {res['worker_cpu_pct']}% CPU",
                      file=sys.stderr, flush=True)
        # the tree's own time to first token: one stream of one-token requests, nothing else running
        for transport in ("tcp", "http"):
            level = Level(1, 100 if quick else 400, 64, 1)
            rec = guarded(lambda t=transport, lv=level: (tcp_level(address_of(worker), lv, "ttft") if t == "tcp"
                                                         else http_level(base_of(worker), lv, "ttft", "synthetic")),
                          worker.proc.pid)
            ttft.append({"transport": transport, "requests": rec["requests"], "errors": rec["errors"],
                         "ttft_p50_ms": round(pct(rec["ttft"], 50) * 1e3, 3),
                         "ttft_p99_ms": round(pct(rec["ttft"], 99) * 1e3, 3)})
    finally:
        os.sched_setaffinity(0, mine)
        worker.stop()
    best = {t: max((r for r in results if r["transport"] == t), key=lambda r: r["tok_s_per_worker_core"] or 0)
            for t in ("tcp", "http")}
    out = {"results": results, "best": best, "ttft": ttft, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "pinning": {"worker_cpu": WORKER_CPU, "client_cpu": CLIENT_CPU}}
    if os.environ.get("BENCH_WORKER_TREE"):
        out["worker_tree"] = os.environ["BENCH_WORKER_TREE"]
    write(os.environ.get("BENCH_OUT_NAME", "speed"), out)
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    lines = [
        "Synthetic engine, `--synthetic-step-ms 0`; worker pinned to CPU 0, clients to CPU 1; each stream is "
        "one long request.",
        "",
        "| transport | streams | tokens | tok/s (wall) | worker CPU us/token | tok/s per worker core "
        "| worker CPU % | client CPU us/token | tokens/chunk | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(f"| {r['transport']} | {r['streams']} | {r['tokens']} | {r['tok_s']} "
                     f"| {r['worker_cpu_us_per_token']} | {r['tok_s_per_worker_core']} | {r['worker_cpu_pct']} "
                     f"| {r['client_cpu_us_per_token']} | {r['tokens_per_chunk']} | {r['errors']} |")
    if result.get("ttft"):
        lines += ["", "The tree's own time to first token (same pinning, one stream of one-token requests, "
                      "engine time zero; TCP opens a connection per request as `supervisor.client.Call` does, "
                      "HTTP keeps its connection):", "",
                  "| transport | requests | TTFT p50 ms | TTFT p99 ms | errors |", "|---|---|---|---|---|"]
        lines += [f"| {t['transport']} | {t['requests']} | {t['ttft_p50_ms']} | {t['ttft_p99_ms']} | {t['errors']} |"
                  for t in result["ttft"]]
    return lines


if __name__ == "__main__":
    print("\n".join(markdown(run("--quick" in sys.argv))))
