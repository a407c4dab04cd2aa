"""Overhead: what our tree costs on top of vLLM, against vLLM's own server.

Same model, same engine flags, same requests (fixed prompt token ids, greedy,
``ignore_eos``, fixed output length), at 1, 8 and 32 concurrent streams:

  (a) raw     vLLM's AsyncLLM driven directly in asyncio (bench/raw_engine.py)
  (b) tcp     our worker, over the TCP request plane (supervisor.client.Call)
  (c) http    our worker's OpenAI HTTP front (--http-port)
  (d) serve   vLLM's own OpenAI server (python -m vllm.entrypoints.openai.api_server)

Only one vLLM engine may run at a time (2 cores), so each *host* (the raw
driver, our worker, vllm serve) is started once per round and every level runs
in it; (b) and (c) share one worker and alternate. Rounds reverse the host
order (raw, ours, serve, then serve, ours, raw, ...) so slow drift of the
machine cancels. Every host is warmed up before measuring. Throughput is the
mean over rounds; latency percentiles pool every request of every round;
ratios are to (a) at the same level.

Clients run in this process (HTTP: aiohttp on uvloop; TCP: trio), on the same
two cores as the engine; their CPU time is reported per token, as is the
server front end's (the worker process, or the api_server process) and the
engine core's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.procs import Worker, free_port

from .clients import http_level, http_model, tcp_level
from .common import OUT, write
from .loadgen import (
    CpuMeter,
    Level,
    aggregate,
    engine_pids,
    engine_ttft,
    guarded,
    pin_front_end,
    pin_threads,
    wait_for_quiet,
)

VARIANTS = ("raw", "tcp", "http", "serve")
LABELS = {"raw": "(a) raw AsyncLLM", "tcp": "(b) worker, TCP plane", "http": "(c) worker, HTTP front",
          "serve": "(d) vllm serve"}
KV_CACHE_BYTES = 512 * 2**20
START_TIMEOUT = 300.0


def vllm_env() -> dict[str, str | None]:
    return {"VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "VLLM_CPU_KVCACHE_SPACE": None, "TOKENIZERS_PARALLELISM": "false",
            "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}  # as our worker runs vLLM (supervisor/cli.py)


def merged_env(extra: dict[str, str | None]) -> dict[str, str]:
    env: dict[str, str | None] = {**os.environ, **extra}
    return {k: v for k, v in env.items() if v is not None}


def model_path(name: str) -> Path:
    if name == "tiny":
        from actors.engine.models import build_tiny_llama, default_cache_dir

        return build_tiny_llama(default_cache_dir() / "tiny-llama-test")
    if name == "demo":
        from actors.engine.models import demo_model_path

        return Path(demo_model_path())
    return Path(name)


def vocab_size(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["vocab_size"])


def engine_flags(model: Path) -> list[str]:
    """The engine settings every variant gets, verbatim. KV events are on (as our worker
    runs by default, and Dynamo deploys it); ports are fresh for each start."""
    kv_events = {"enable_kv_cache_events": True, "publisher": "zmq",
                 "endpoint": f"tcp://127.0.0.1:{free_port()}", "replay_endpoint": f"tcp://127.0.0.1:{free_port()}"}
    return ["--model", str(model), "--max-model-len", "2048", "--block-size", "128", "--enforce-eager",
            "--seed", "0", "--enable-prefix-caching", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
            # vLLM's CPU worker uses AMX without asking Linux for it and dies of SIGILL on AMX hosts:
            # our worker asks in each vLLM worker process by default; the raw driver and vllm serve
            # need to be told (actors/engine/vllm_worker.py)
            "--worker-extension-cls", "actors.engine.vllm_worker.WorkerSetup",
            "--kv-events-config", json.dumps(kv_events)]  # last: the results print it as '<json>'


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM the process (it stops its engine), then make sure its whole session is gone."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = [p for p in psutil.process_iter(["pid"]) if _in_group(p, pgid)]
        if not left:
            return
        time.sleep(0.2)
    for p in psutil.process_iter(["pid"]):
        if _in_group(p, pgid):
            p.kill()


def _in_group(proc: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ProcessLookupError):
        return False


# -- hosts -------------------------------------------------------------------------------


def pin(host_pid: int) -> None:
    """The host's front end and EngineCore, and this client, onto the cores vLLM leaves to
    them (bench.loadgen.pin_front_end); the same for every variant. BENCH_PIN=0: no pinning."""
    if os.environ.get("BENCH_PIN", "1") != "1":
        return
    cores = pin_front_end(host_pid)
    if cores:
        pin_threads(os.getpid(), cores)


def unpin() -> None:
    pin_threads(os.getpid(), set(range(os.cpu_count() or 1)))


def run_raw(model: Path, plan: list[dict[str, Any]]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-raw-"))
    (tmp / "plan.json").write_text(json.dumps(plan))
    log = (tmp / "log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.raw_engine", str(tmp / "plan.json"), str(tmp / "out.json"), "--",
         *engine_flags(model)],
        cwd=Path(__file__).resolve().parent.parent, env=merged_env(vllm_env()), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        status = proc.wait(START_TIMEOUT + 3600)
    finally:
        _kill_group(proc)
        log.close()
    if status != 0:
        raise RuntimeError(f"raw engine driver failed ({status}):\n{(tmp / 'log').read_text()[-4000:]}")
    result: dict[str, Any] = json.loads((tmp / "out.json").read_text())
    return result


def _scrape_ttft(url: str) -> tuple[float, float]:
    return engine_ttft(httpx.get(url, timeout=10).text)


def _ttft_delta(before: tuple[float, float], after: tuple[float, float]) -> dict[str, float]:
    return {"engine_ttft_sum": after[0] - before[0], "engine_ttft_count": after[1] - before[1]}


def _warm_http(base: str, model: str, vocab: int) -> None:
    for level in (Level(1, 1, 32, 16, vocab), Level(8, 8, 32, 16, vocab)):
        rec = http_level(base, level, "warmup", model)
        if rec["errors"]:
            raise RuntimeError(f"warm-up over HTTP failed: {rec['error_kinds']}")


def run_ours(model: Path, plan: list[dict[str, Any]]) -> dict[str, Any]:
    t0 = time.monotonic()
    tree = os.environ.get("BENCH_WORKER_TREE")  # another checkout of the worker, for before/after runs
    worker = Worker("--engine", "vllm", *engine_flags(model), "--http-port", "0", "--system-port", "0",
                    env={**vllm_env(), "DYN_FILE_DISCOVERY_DIR": tempfile.mkdtemp(prefix="bench-disc-")},
                    cwd=Path(tree) if tree else None)
    results = []
    try:
        worker.wait_ready(timeout=START_TIMEOUT)
        load_s = time.monotonic() - t0
        pin(worker.proc.pid)
        metrics_url = f"http://127.0.0.1:{worker.system_port}/metrics"
        address = f"127.0.0.1:{worker.wait_event('request_plane.listening')['port']}"
        base = f"http://127.0.0.1:{worker.wait_event('http.listening')['port']}"
        name = http_model(base)
        vocab = plan[0]["level"]["vocab"]
        for level in (Level(1, 1, 32, 16, vocab), Level(8, 8, 32, 16, vocab)):
            rec = tcp_level(address, level, "warmup")
            if rec["errors"]:
                raise RuntimeError(f"warm-up over TCP failed: {rec['error_kinds']}\n{worker.tail()}")
        _warm_http(base, name, vocab)
        engines = engine_pids(worker.proc.pid)
        for n, entry in enumerate(plan):
            level = Level(**entry["level"])

            def one(level: Level = level, tag: str = entry["tag"], n: int = n) -> dict[str, Any]:
                meter = CpuMeter(server=worker.proc.pid, engine=engines)
                ttft0 = _scrape_ttft(metrics_url)
                if tag == "tcp":
                    rec = tcp_level(address, level, f"tcp-{n}")
                else:
                    rec = http_level(base, level, f"http-{n}", name)
                return {**rec, **meter.stop(), **_ttft_delta(ttft0, _scrape_ttft(metrics_url))}

            rec = guarded(one, worker.proc.pid)
            results.append({"tag": entry["tag"], "level": entry["level"], "record": rec})
            print(f"  {entry['tag']:>5} {level.streams:>3} streams: {rec['tok_s']:.1f} tok/s", file=sys.stderr,
                  flush=True)
    finally:
        unpin()
        worker.stop()
    return {"load_s": load_s, "results": results}


def run_serve(model: Path, plan: list[dict[str, Any]]) -> dict[str, Any]:
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="bench-serve-", suffix=".log")[1])
    log = log_path.open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine_flags(model), "--host", "127.0.0.1",
         "--port", str(port)],
        env=merged_env(vllm_env()), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    results = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not healthy in {START_TIMEOUT}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        load_s = time.monotonic() - t0
        pin(proc.pid)
        name = http_model(base)
        _warm_http(base, name, plan[0]["level"]["vocab"])
        engines = engine_pids(proc.pid)
        for n, entry in enumerate(plan):
            level = Level(**entry["level"])

            def one(level: Level = level, n: int = n) -> dict[str, Any]:
                meter = CpuMeter(server=proc.pid, engine=engines)
                ttft0 = _scrape_ttft(f"{base}/metrics")
                rec = http_level(base, level, f"serve-{n}", name)
                return {**rec, **meter.stop(), **_ttft_delta(ttft0, _scrape_ttft(f"{base}/metrics"))}

            rec = guarded(one, proc.pid)
            results.append({"tag": entry["tag"], "level": entry["level"], "record": rec})
            print(f"  serve {level.streams:>3} streams: {rec['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        unpin()
        _kill_group(proc)
        log.close()
    return {"load_s": load_s, "results": results}


# -- the benchmark ---------------------------------------------------------------------------


def _retried(host: Any, model: Path, plan: list[dict[str, Any]], tries: int = 3) -> dict[str, Any]:
    """A host that fails to start (a free port taken by someone else meanwhile) is started again."""
    for attempt in range(tries):
        try:
            out: dict[str, Any] = host(model, plan)
            return out
        except (RuntimeError, AssertionError) as exc:
            if attempt == tries - 1:
                raise
            print(f"  {host.__name__} failed ({str(exc)[-300:]}); starting it again", file=sys.stderr, flush=True)
            wait_for_quiet()
    raise AssertionError("unreachable")


def levels_for(quick: bool, vocab: int) -> list[Level]:
    """The three concurrency levels, and a TTFT probe: one stream of short requests, so
    time to first token is one prefill on an idle engine, with enough samples for its p50."""
    probe = Level(1, 8 if quick else 16, 64, 2, vocab, name="ttft")
    if quick:
        return [Level(1, 2, 64, 64, vocab), Level(8, 8, 64, 64, vocab), Level(32, 32, 64, 64, vocab), probe]
    return [Level(1, 3, 64, 128, vocab), Level(8, 16, 64, 128, vocab), Level(32, 64, 64, 128, vocab), probe]


def run(quick: bool = False, model_name: str | None = None, rounds: int | None = None,
        variants: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Knobs (environment): BENCH_MODEL (demo, tiny or a path), BENCH_ROUNDS, BENCH_VARIANTS
    (e.g. raw,tcp), BENCH_WORKER_TREE (run our worker from another checkout), BENCH_OUT_NAME."""
    model_name = model_name or os.environ.get("BENCH_MODEL", "demo")
    variants = variants or tuple(v for v in os.environ.get("BENCH_VARIANTS", ",".join(VARIANTS)).split(",") if v)
    model = model_path(model_name)
    vocab = vocab_size(model)
    levels = levels_for(quick, vocab)
    rounds = rounds or int(os.environ.get("BENCH_ROUNDS", 0)) or (1 if quick else 4)
    hosts = [h for h, wanted in (("raw", {"raw"}), ("ours", {"tcp", "http"}), ("serve", {"serve"}))
             if wanted & set(variants)]
    records: dict[str, dict[str, list[dict[str, Any]]]] = {v: {lv.key: [] for lv in levels} for v in variants}
    loads: dict[str, list[float]] = {h: [] for h in hosts}
    started = time.monotonic()
    for r in range(rounds):
        order = hosts if r % 2 == 0 else hosts[::-1]
        for host in order:
            waited = wait_for_quiet()
            print(f"round {r + 1}/{rounds}: {host}" + (f" (waited {waited:.0f}s for quiet)" if waited > 1 else ""),
                  file=sys.stderr, flush=True)
            if host == "ours":
                ours = [v for v in ("tcp", "http") if v in variants]
                plan = []
                for lv in levels:
                    pair = ours if r % 2 == 0 else ours[::-1]
                    plan += [{"tag": v, "level": lv.as_dict()} for v in pair]
                out = _retried(run_ours, model, plan)
            else:
                plan = [{"tag": host, "level": lv.as_dict()} for lv in levels]
                out = _retried(run_raw if host == "raw" else run_serve, model, plan)
            loads[host].append(round(out["load_s"], 2))
            for item in out["results"]:
                records[item["tag"]][Level(**item["level"]).key].append(item["record"])
    table: dict[str, dict[str, Any]] = {}
    for v in variants:
        for lv in levels:
            table.setdefault(lv.key, {})[v] = aggregate(records[v][lv.key])
    for key, row in table.items():
        base = row.get("raw")
        if not base:
            continue
        for v, agg in row.items():
            if v == "raw" or not agg:
                continue
            paired = [a["tok_s"] / b["tok_s"] for a, b in zip(records[v][key], records["raw"][key], strict=False)]
            agg["tok_s_ratio_per_round"] = [round(x, 3) for x in paired]
            agg["tok_s_ratio"] = round(agg["tok_s"] / base["tok_s"], 3)
            agg["ttft_added_p50_ms"] = round(agg["ttft_p50_ms"] - base["ttft_p50_ms"], 2)
            agg["itl_ratio_p50"] = round(agg["itl_p50_ms"] / base["itl_p50_ms"], 3)
    per_round = {v: {lv.key: [_run_summary(r) for r in records[v][lv.key]] for lv in levels} for v in variants}
    result = {
        "model": str(model),
        "model_name": model_name,
        "engine_flags": engine_flags(Path("<model>"))[2:],
        "levels": [lv.as_dict() for lv in levels],
        "rounds": rounds,
        "host_start_s": loads,
        "table": table,
        "runs": per_round,
        "took_s": round(time.monotonic() - started, 1),
        "variants": list(variants),
        "pinned": os.environ.get("BENCH_PIN", "1") == "1",
    }
    if os.environ.get("BENCH_WORKER_TREE"):
        result["worker_tree"] = os.environ["BENCH_WORKER_TREE"]
    write(os.environ.get("BENCH_OUT_NAME", "overhead"), result)
    return result


def _run_summary(r: dict[str, Any]) -> dict[str, Any]:
    """One run of one level, without its per-request lists."""
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("ttft", "itl")}
    if r["ttft"]:
        out["ttft_mean_ms"] = round(sum(r["ttft"]) / len(r["ttft"]) * 1e3, 2)
    if r.get("engine_ttft_count"):
        out["engine_ttft_mean_ms"] = round(r["engine_ttft_sum"] / r["engine_ttft_count"] * 1e3, 2)
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    levels = ", ".join(
        f"{lv.get('name') or str(lv['streams']) + ' streams'}: {lv['streams']} x {lv['requests']} requests"
        for lv in result["levels"])
    lv0 = result["levels"][0]
    lines = [
        f"Model `{Path(result['model']).name}`; engine flags, the same for (a)-(d): "
        f"`{' '.join(result['engine_flags'][:-1])} '<json>'` (KV events on, as our worker runs by default). "
        f"Prompts: {lv0['prompt_len']} fixed token ids per request; greedy, `ignore_eos`, "
        f"{result['levels'][1]['max_tokens']} output tokens ({levels}; the ttft probe asks for "
        f"{result['levels'][-1]['max_tokens']} tokens). {result['rounds']} round(s); one host at a time "
        "(raw driver, our worker, vllm serve), host order reversed every round. Throughput: mean over rounds; "
        "ratio: to (a) at the same level, with the per-round paired ratios; latencies: percentiles over every "
        "request of every round. TTFT p50 - (a)'s compares different engine starts, whose own speed differs "
        "by several ms; TTFT over vLLM's own is the client's TTFT minus vLLM's `time_to_first_token` "
        "(arrival in AsyncLLM to first output) for the same requests on the same engine: what the path "
        "to and from the engine added. CPU per output token: server = the front-end process (for (a) the whole "
        "driver, which is also its own client), client = this benchmark's client, engine = EngineCore + "
        "VLLM::Worker.",
        "",
        "| level | variant | out tok/s | ratio to (a) | per-round ratios | TTFT p50 ms | TTFT p99 ms "
        "| TTFT p50 - (a)'s, ms | TTFT over vLLM's own, mean ms | ITL p50 ms | ITL p99 ms | server CPU us/tok "
        "| client CPU us/tok | engine CPU us/tok | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in result["table"].items():
        for v, agg in row.items():
            if not agg:
                continue
            ratio = agg.get("tok_s_ratio", "1") if v != "raw" else "1"
            rounds = " ".join(str(x) for x in agg.get("tok_s_ratio_per_round", [])) or "-"
            errors = f"{agg['errors']}" + (f" (disturbed runs: {agg['disturbed_runs']})"
                                           if agg.get("disturbed_runs") else "")
            lines.append(
                f"| {key} | {LABELS[v]} | {agg['tok_s']} | {ratio} | {rounds} | {agg['ttft_p50_ms']} "
                f"| {agg['ttft_p99_ms']} | {agg.get('ttft_added_p50_ms', '-')} "
                f"| {agg.get('ttft_over_engine_mean_ms', '-')} | {agg['itl_p50_ms']} "
                f"| {agg['itl_p99_ms']} | {agg.get('server_cpu_us_per_token', '-')} "
                f"| {agg.get('client_cpu_us_per_token', '-')} | {agg.get('engine_cpu_us_per_token', '-')} "
                f"| {errors} |"
            )
    lines += ["", f"Host start to ready (s): `{json.dumps(result['host_start_s'])}`; took {result['took_s']} s."]
    return lines


if __name__ == "__main__":
    out = run("--quick" in sys.argv)
    print("\n".join(markdown(out)))
    print(f"(written to {OUT / 'overhead.json'})")
