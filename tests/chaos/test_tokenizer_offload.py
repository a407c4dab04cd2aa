"""Tokenizing runs off the event loop: a burst of 32 requests with long prompts does not
stall a stream that is already running (synthetic engine, the tiny model's real tokenizer).

Measured on this project's 2-core machine (the stream's longest gap between two chunks while
the burst is served; 6 ms between chunks before it): tokenizing on the trio thread, 2.8 s;
in a worker thread, 0.27 s. What is left is the HTTP side of 32 new connections uploading
27 MB (0.21 s with bodies that are not even JSON, 0.11 s with tiny prompts), not tokenizing.
The bound sits between the two.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.procs import Worker, worker_fixture

STALL_BOUND_S = 0.75
# ~850 kB, ~520k tokens: about 0.6 s of tokenizing each here
LONG_PROMPT = "the quick brown fox jumps over the lazy dog and keeps running far away " * 12000


@pytest.fixture
def worker(tiny_model: Path) -> Iterator[Worker]:
    gen = worker_fixture("--engine", "synthetic", "--synthetic-step-ms", "5", "--model", str(tiny_model),
                         "--http-port", "0")
    w = next(gen)
    w.wait_ready()
    yield w
    gen.close()


def test_a_burst_of_long_prompts_does_not_stall_a_running_stream(worker: Worker, tiny_model: Path) -> None:
    base = f"http://127.0.0.1:{worker.wait_event('http.listening')['port']}"
    arrivals: list[float] = []
    streaming = threading.Event()

    def stream() -> None:
        body = {"model": str(tiny_model), "prompt": "hello", "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
                    if len(arrivals) == 100:
                        streaming.set()

    statuses: list[int] = []
    # encoded once, up front: the test's own threads must not compete with the reader
    body = json.dumps({"model": str(tiny_model), "prompt": LONG_PROMPT, "max_tokens": 1}).encode()
    go = threading.Event()

    def long_prompt() -> None:
        with httpx.Client(timeout=120) as client:
            go.wait()
            r = client.post(f"{base}/v1/completions", content=body, headers={"content-type": "application/json"})
        statuses.append(r.status_code)

    reader = threading.Thread(target=stream)
    reader.start()
    assert streaming.wait(60), "the stream never got going"
    burst = [threading.Thread(target=long_prompt) for _ in range(32)]
    for t in burst:
        t.start()
    started = time.monotonic()
    go.set()
    for t in burst:
        t.join(120)
    ended = time.monotonic()
    reader.join(120)
    # every long prompt was tokenized, and refused as too long for the context
    assert statuses == [400] * 32, statuses
    # every gap between two chunks that overlaps the burst
    during = [b - a for a, b in itertools.pairwise(arrivals) if b > started and a < ended]
    assert during, "the stream ended before the burst"
    assert max(during) < STALL_BOUND_S, f"the stream stalled {max(during):.3f}s during the burst"
