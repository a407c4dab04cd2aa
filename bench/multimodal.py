"""Multimodal: the embedding chain against one aggregated LLaVA worker, on this machine.

Both behind a processor (the same HTTP front, prompt building and image fetching), real
vLLM, the tiny LLaVA:

- chain: processor -> encode worker (transformers' vision tower, cache by image hash) ->
  PD worker (vLLM takes the embeddings);
- aggregated: processor -> one encode+prefill worker in the agg role (vLLM runs its own
  vision tower on every request).

8 clients stream chat completions (one image each, 16 tokens) back to back; the images
come from a pool of 8, so they repeat (the encoder cache's case). Reported: requests per
second, TTFT, and the encode worker's cache hit rate.

    python -m bench multimodal [--quick]
"""

from __future__ import annotations

import base64
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import openai

from tests.procs import Worker, free_port

from .common import write

CLIENTS = 8
POOL = 8
MAX_TOKENS = 16
VLLM = ("--engine", "vllm", "--max-model-len", "2048", "--block-size", "32", "--enforce-eager", "--seed", "0",
        "--kv-cache-memory-bytes", str(64 * 2**20))


def _images() -> list[str]:
    from PIL import Image

    urls = []
    for i in range(POOL):
        out = io.BytesIO()
        Image.new("RGB", (80 + i, 60), (30 * i % 256, 200 - 20 * i, 90)).save(out, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(out.getvalue()).decode())
    return urls


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _metric(worker: Worker, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    page = worker.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(page) for s in f.samples if s.name == name)


def _deployment(model: Path, tmp: Path, chain: bool) -> tuple[list[Worker], Worker]:
    env: dict[str, str | None] = {"DYN_FILE_DISCOVERY_DIR": str(tmp / ("chain" if chain else "agg")),
                                  "VLLM_CPU_KVCACHE_SPACE": None,
                                  "DYN_VLLM_KV_EVENT_PORT": str(free_port()),
                                  "DYN_VLLM_KV_EVENT_REPLAY_PORT": str(free_port())}
    common = ("--model", str(model), "--enable-multimodal", "--system-port", "0")
    workers = []
    if chain:
        workers.append(Worker(*common, "--multimodal-encode-worker", env=env))
        workers.append(Worker(*VLLM, *common, "--multimodal-worker", env=env))
    else:
        workers.append(Worker(*VLLM, *common, "--multimodal-encode-prefill-worker", "--role", "agg", env=env))
    processor = Worker(*common, "--multimodal-processor", "--http-port", "0", env=env)
    for w in [*workers, processor]:
        w.wait_event("endpoint.registered", timeout=300)
    deadline = time.monotonic() + 30
    while len([e for e in processor.events() if e["event"] == "frontend.worker_added"]) < len(workers):
        if time.monotonic() > deadline:
            raise RuntimeError("the processor did not see its workers")
        time.sleep(0.1)
    return workers, processor


def _load(processor: Worker, requests: int, images: list[str]) -> dict[str, Any]:
    port = processor.wait_event("http.listening")["port"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    ttfts: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def one_client() -> None:
        for n in counter:
            url = images[(n * 5) % len(images)]
            started = time.perf_counter()
            first: float | None = None
            try:
                stream = client.chat.completions.create(
                    model=model, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                    messages=[{"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                                           {"type": "image_url", "image_url": {"url": url}}]}])
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - started
            except openai.APIError as exc:
                with lock:
                    errors.append(str(exc)[:200])
                continue
            with lock:
                ttfts.append(first if first is not None else time.perf_counter() - started)

    # warm-up: vLLM's first request with an image compiles and allocates
    _ = client.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "text", "text": "warm"}, {"type": "image_url", "image_url": {"url": images[0]}}]}])
    started = time.perf_counter()
    threads = [threading.Thread(target=one_client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.perf_counter() - started
    return {"requests": len(ttfts), "errors": len(errors), "error_samples": errors[:3],
            "rps": round(len(ttfts) / elapsed, 2), "ttft_p50_ms": round(1000 * _pct(ttfts, 0.5), 1),
            "ttft_p99_ms": round(1000 * _pct(ttfts, 0.99), 1),
            "ttft_mean_ms": round(1000 * statistics.fmean(ttfts), 1) if ttfts else 0.0}


def run(quick: bool = False) -> dict[str, Any]:
    from actors.engine.models import build_tiny_llava, default_cache_dir

    model = build_tiny_llava(default_cache_dir() / "tiny-llava-test")
    requests = 48 if quick else 240
    images = _images()
    tmp = Path(tempfile.mkdtemp(prefix="bench-multimodal-"))
    result: dict[str, Any] = {"clients": CLIENTS, "image_pool": POOL, "max_tokens": MAX_TOKENS, "requests": requests}
    for name, chain in (("chain", True), ("aggregated", False)):
        workers, processor = _deployment(model, tmp, chain)
        try:
            result[name] = _load(processor, requests, images)
            if chain:
                hits = _metric(workers[0], "dynamo_component_encoder_cache_hits_total")
                misses = _metric(workers[0], "dynamo_component_encoder_cache_misses_total")
                result[name]["encoder_cache_hit_rate"] = round(hits / max(1.0, hits + misses), 3)
        finally:
            for w in [processor, *workers]:
                w.stop()
        print(f"  {name}: {result[name]}", file=sys.stderr, flush=True)
    result["rps_ratio_chain_over_aggregated"] = round(result["chain"]["rps"] / max(0.01, result["aggregated"]["rps"]),
                                                      3)
    return result


def markdown(result: dict[str, Any]) -> list[str]:
    rows = ["| deployment | requests | errors | req/s | TTFT p50 ms | TTFT p99 ms | encoder cache hit rate |",
            "|---|---|---|---|---|---|---|"]
    for name in ("chain", "aggregated"):
        r = result[name]
        rows.append(f"| {name} | {r['requests']} | {r['errors']} | {r['rps']} | {r['ttft_p50_ms']} | "
                    f"{r['ttft_p99_ms']} | {r.get('encoder_cache_hit_rate', '-')} |")
    return [f"{result['clients']} clients, chat completions with one image each ({result['max_tokens']} tokens, "
            f"streamed), images from a pool of {result['image_pool']}, the tiny LLaVA on real vLLM. "
            f"Chain = processor -> encode worker -> PD worker; aggregated = processor -> one encode+prefill "
            f"worker (agg). Ratio of requests per second, chain over aggregated: "
            f"{result['rps_ratio_chain_over_aggregated']}.", "", *rows]


if __name__ == "__main__":
    out = run("--quick" in sys.argv)
    write("multimodal", out)
    print("\n".join(markdown(out)))
