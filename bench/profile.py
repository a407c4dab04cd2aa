"""Profile the worker under streaming load with py-spy (not part of ``python -m bench``).

    python -m bench.profile tcp|http [--streams N] [--tokens N] [--top N]

Starts a synthetic zero-step-time worker pinned to CPU 0, streams to it from
CPU 1, and samples the worker with ``py-spy record --format raw`` for the
duration of the load. Prints the top functions by self and inclusive samples
and writes the collapsed stacks to bench/out/profile-<transport>.txt (feed to
speedscope or flamegraph.pl).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.procs import Worker

from .clients import http_level, http_model, tcp_level
from .common import OUT
from .loadgen import CpuMeter, Level, engine_pids
from .speed import CLIENT_CPU, _start_worker


def summarize(path: str, top: int) -> str:
    self_count: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not n.isdigit():
                continue
            count = int(n)
            frames = [fr for fr in stack.split(";") if fr]
            total += count
            if frames:
                self_count[frames[-1]] += count
            for fr in set(frames):
                incl[fr] += count
    lines = [f"total samples {total}", "", "self:"]
    lines += [f"{100 * c / total:6.1f}%  {fr}" for fr, c in self_count.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * c / total:6.1f}%  {fr}" for fr, c in incl.most_common(top)]
    return "\n".join(lines)


def _cprofiled_worker(prof: str, *args: str, env: dict[str, str | None]) -> Worker:
    """A Worker whose process runs under bench.cprofile_worker: Worker starts
    ``sys.executable -m supervisor ...``, so for its start sys.executable is a small
    script that swaps ``-m supervisor`` for the profiling entry point."""
    import stat
    import sys

    script = Path(tempfile.mkdtemp(prefix="bench-cprof-")) / "python"
    script.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} -m bench.cprofile_worker {prof} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    real = sys.executable
    sys.executable = str(script)
    try:
        return Worker(*args, env=env)
    finally:
        sys.executable = real


def profile_vllm(args: argparse.Namespace) -> None:
    from .overhead import engine_flags, model_path, vllm_env, vocab_size

    model = model_path("demo")
    vocab = vocab_size(model)
    prof = str(OUT / f"cprofile-vllm-{args.transport}.prof")
    flags = ("--engine", "vllm", *engine_flags(model), "--http-port", "0", "--system-port", "0")
    env = {**vllm_env(), "DYN_FILE_DISCOVERY_DIR": tempfile.mkdtemp(prefix="bench-prof-")}
    worker = _cprofiled_worker(prof, *flags, env=env) if args.cprofile else Worker(*flags, env=env)
    out = str(OUT / f"profile-vllm-{args.transport}.txt")
    try:
        worker.wait_ready(timeout=300)
        address = f"127.0.0.1:{worker.wait_event('request_plane.listening')['port']}"
        base = f"http://127.0.0.1:{worker.wait_event('http.listening')['port']}"
        name = http_model(base)
        level = Level(args.streams, args.streams, 64, args.max_tokens, vocab)
        tcp_level(address, Level(8, 8, 32, 16, vocab), "warm")
        http_level(base, Level(8, 8, 32, 16, vocab), "warm", name)
        spy = subprocess.Popen(["sleep", str(args.seconds)]) if args.cprofile else subprocess.Popen(
            ["py-spy", "record", "--format", "raw", "-r", str(args.rate), "-o", out, "--pid",
             str(worker.proc.pid), "--nonblocking", "-d", str(int(args.seconds))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tokens = 0
        if args.cprofile:
            worker.signal(signal.SIGUSR2)
        meter = CpuMeter(server=worker.proc.pid, engine=engine_pids(worker.proc.pid))
        started = time.monotonic()
        while spy.poll() is None:
            rec = (tcp_level(address, level, "prof") if args.transport == "tcp"
                   else http_level(base, level, "prof", name))
            tokens += rec["tokens"]
        cpu = meter.stop()
        if args.cprofile:
            worker.signal(signal.SIGUSR2)
        print(f"{tokens} tokens in {time.monotonic() - started:.1f}s; CPU us/token: "
              + ", ".join(f"{k} {v / max(1, tokens) * 1e6:.1f}" for k, v in cpu.items()))
    finally:
        worker.stop()
    if args.cprofile:
        import pstats

        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        return
    print(summarize(out, args.top))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=("tcp", "http"))
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--idle", action="store_true", help="include idle samples")
    parser.add_argument("--engine", choices=("synthetic", "vllm"), default="synthetic",
                        help="vllm: the overhead benchmark's demo model and flags, unpinned")
    parser.add_argument("--max-tokens", type=int, default=128, help="per request, with --engine vllm")
    parser.add_argument("--seconds", type=float, default=30.0, help="of load, with --engine vllm")
    parser.add_argument("--cprofile", action="store_true",
                        help="with --engine vllm: cProfile on the worker's CPU-time clock instead of py-spy")
    args = parser.parse_args()
    if args.engine == "vllm":
        profile_vllm(args)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    out = str(OUT / f"profile-{args.transport}.txt")
    mine = os.sched_getaffinity(0)
    worker = _start_worker()
    try:
        worker.wait_ready()
        os.sched_setaffinity(0, {CLIENT_CPU})
        address = f"127.0.0.1:{worker.wait_event('request_plane.listening')['port']}"
        base = f"http://127.0.0.1:{worker.wait_event('http.listening')['port']}"
        level = Level(args.streams, args.streams, 8, args.tokens // args.streams)
        cmd = ["py-spy", "record", "--format", "raw", "-r", str(args.rate), "-o", out, "--pid",
               str(worker.proc.pid), "--nonblocking"]
        if args.idle:
            cmd.append("--idle")
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        done = threading.Event()
        rec = (tcp_level(address, level, "prof") if args.transport == "tcp"
               else http_level(base, level, "prof", "synthetic"))
        done.set()
        spy.send_signal(2)
        spy.wait(30)
        print(f"{rec['tokens']} tokens in {rec['wall_s']:.2f}s = {rec['tok_s']:.0f} tok/s")
    finally:
        os.sched_setaffinity(0, mine)
        worker.stop()
    print(summarize(out, args.top))


if __name__ == "__main__":
    main()
