"""One request path for every entry (synthetic engine, real worker processes): the
TCP plane, the HTTP front and the system routes share admission, the in-flight
table, metrics, logs and limits."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from actors.protocol import Data, End, Error, FrameReader, Request, encode_frame
from supervisor.client import Call, CallError
from tests.procs import Worker, wait_until, worker_fixture
from tests.synthetic import continuation, text
from tests.unit.test_metrics import value


def tcp_address(worker: Worker) -> str:
    return f"127.0.0.1:{worker.wait_event('request_plane.listening')['port']}"


def http_client(worker: Worker) -> openai.OpenAI:
    port = worker.wait_event("http.listening")["port"]
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    gen = worker_fixture("--engine", "synthetic", "--synthetic-step-ms", "5", "--http-port", "0",
                         env={"DYN_FILE_DISCOVERY_DIR": str(tmp_path)})
    w = next(gen)
    w.wait_ready()
    yield w
    gen.close()


# -- n > 1 ----------------------------------------------------------------------------------


async def test_token_mode_items_say_which_sample_they_belong_to(worker: Worker) -> None:
    payload = {"token_ids": [5], "sampling_options": {"n": 2}, "stop_conditions": {"max_tokens": 3}}
    async with Call(tcp_address(worker), "generate", payload) as call:
        items = await call.collect()
    by_sample = {i: [t for it in items if it["index"] == i for t in it["token_ids"]] for i in (0, 1)}
    assert by_sample == {0: continuation([5], 3, 0), 1: continuation([5], 3, 1)}
    finished = [it for it in items if "finish_reason" in it]
    assert sorted(it["index"] for it in finished) == [0, 1]
    assert [("completion_usage" in it) for it in items] == [False] * (len(items) - 1) + [True]
    assert items[-1]["completion_usage"]["completion_tokens"] == 6


def test_n2_gives_two_choices_streaming_and_not(worker: Worker) -> None:
    client = http_client(worker)
    done = client.completions.create(model="synthetic", prompt="ab", max_tokens=3, n=2)
    assert [c.index for c in done.choices] == [0, 1]
    assert [c.text for c in done.choices] == [text(b"ab", 3, 0), text(b"ab", 3, 1)]
    assert done.usage is not None and done.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="synthetic", prompt="ab", max_tokens=3, n=2, stream=True))
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {c.index: c.text for c in done.choices}
    chat = client.chat.completions.create(model="synthetic", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=2, n=2)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content


def test_a_list_of_prompts_is_a_batch(worker: Worker) -> None:
    client = http_client(worker)
    done = client.completions.create(model="synthetic", prompt=["a", "bc"], max_tokens=2, n=2)
    assert [(c.index, c.text) for c in done.choices] == [
        (0, text(b"a", 2, 0)), (1, text(b"a", 2, 1)), (2, text(b"bc", 2, 0)), (3, text(b"bc", 2, 1))]
    assert done.usage is not None and (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 8)
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model="synthetic", prompt=["a", "bc"], max_tokens=2, n=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {c.index: c.text for c in done.choices}


# -- one in-flight table ----------------------------------------------------------------------


async def test_the_same_request_id_on_two_connections_runs_twice_and_both_drain(tmp_path: Path) -> None:
    gen = worker_fixture("--engine", "synthetic", "--synthetic-step-ms", "20",
                         env={"DYN_FILE_DISCOVERY_DIR": str(tmp_path), "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "1"})
    w = next(gen)
    try:
        w.wait_ready()
        addr = tcp_address(w)
        results: list[Any] = []
        first_items = trio.Semaphore(0)

        async def one(prompt: list[int]) -> None:
            payload = {"token_ids": prompt, "stop_conditions": {"max_tokens": 100_000}}
            try:
                async with Call(addr, "generate", payload, request_id="same-id") as call:
                    seen = []
                    async for item in call:
                        seen += item["token_ids"]
                        if len(seen) == 1:
                            # each connection gets its own request's tokens, not the other one's
                            assert seen == continuation(prompt, 1)
                            first_items.release()
            except CallError as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, [100])
            nursery.start_soon(one, [200])
            for _ in range(2):
                await first_items.acquire()
            w.signal(signal.SIGTERM)
        # both were in the table: the drain waited for both, the abort told both to go elsewhere
        draining = w.wait_event("requests.draining")
        assert draining["inflight"] == 2
        assert [(r.code, r.migratable) for r in results] == [("shutting_down", True)] * 2
        assert await trio.to_thread.run_sync(w.wait, 10.0) == 0
    finally:
        gen.close()


# -- HTTP counted like the request plane --------------------------------------------------


def test_http_requests_are_counted_in_the_request_metrics(worker: Worker) -> None:
    client = http_client(worker)
    client.completions.create(model="synthetic", prompt="a", max_tokens=2)
    client.chat.completions.create(model="synthetic", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    list(client.chat.completions.create(model="synthetic", messages=[{"role": "user", "content": "x"}],
                                        max_tokens=2, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a", max_tokens=2)
    page = worker.get("/metrics").text
    ns = {"dynamo_namespace": "dynamo", "dynamo_component": "backend"}
    assert value(page, "dynamo_component_requests_total", dynamo_endpoint="completions", **ns) == 2
    assert value(page, "dynamo_component_requests_total", dynamo_endpoint="chat_completions", **ns) == 2
    assert value(page, "dynamo_component_errors_total", dynamo_endpoint="completions", error_type="not_found",
                 **ns) == 1
    assert value(page, "dynamo_component_inflight_requests", dynamo_endpoint="completions", **ns) == 0
    assert value(page, "dynamo_component_request_duration_seconds_count", dynamo_endpoint="chat_completions",
                 **ns) == 2


def test_the_metrics_page_passes_promtool(worker: Worker) -> None:
    assert shutil.which("promtool"), "promtool is missing: scripts/setup installs it (Debian package prometheus)"
    client = http_client(worker)
    client.completions.create(model="synthetic", prompt="a", max_tokens=2)
    page = worker.get("/metrics").text
    check = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


# -- limits --------------------------------------------------------------------------------


def _oversized_post(port: int, path: str, sent: int, declared: int) -> bytes:
    """POST a body that declares ``declared`` bytes but only ever sends ``sent``: a server
    that waits for the whole body before checking its size never answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  f"content-length: {declared}\r\n\r\n".encode())
        chunk = b" " * 65536
        left = sent
        try:
            while left > 0:
                s.sendall(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        except OSError:
            pass  # the server may hang up as soon as it said no
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        except TimeoutError:
            raise AssertionError(f"no answer from {path} to an oversized body") from None
        return answer


def test_an_oversized_body_is_refused_while_it_arrives(worker: Worker) -> None:
    http_port = worker.wait_event("http.listening")["port"]
    answer = _oversized_post(http_port, "/v1/completions", sent=9 * 2**20, declared=100 * 2**20)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    answer = _oversized_post(worker.system_port, "/engine/sleep", sent=2 * 2**20, declared=50 * 2**20)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # and the worker still serves
    assert http_client(worker).completions.create(model="synthetic", prompt="a", max_tokens=1).choices


# -- sleep --------------------------------------------------------------------------------------


def test_a_sleeping_worker_is_left_alone_by_its_health_checks_until_woken(tmp_path: Path) -> None:
    # a canary after 0.2 s idle with a 0.3 s timeout: a canary sent to the paused engine would fail
    # three times within about 2 s and take the worker down
    gen = worker_fixture("--engine", "synthetic", "--synthetic-step-ms", "5", "--canary-wait-time", "0.2",
                         "--health-check-interval", "0.1", "--health-check-timeout", "0.3",
                         env={"DYN_FILE_DISCOVERY_DIR": str(tmp_path)})
    w = next(gen)
    try:
        w.wait_ready()
        wait_until(lambda: any(e["event"] == "health.canary" for e in w.events()), 10, "a canary while awake")
        assert list(tmp_path.glob("*/*.json")), "registered"
        r = w.post("/engine/sleep", json={"level": 1})
        assert r.status_code == 200, r.text
        assert not list(tmp_path.glob("*/*.json")), "asleep: deregistered"
        # 100 rounds of the monitor (10 s) standing aside: ten times what killed a sleeping worker
        wait_until(lambda: w.get("/health").json()["health"]["asleep_ticks"] >= 100, 60,
                   lambda: f"100 monitor rounds asleep; {w.get('/health').json()}")
        assert w.proc.poll() is None
        health = w.get("/health")
        assert health.status_code == 503 and "asleep" in health.json()["awake"]
        assert not [e for e in w.events() if e["event"] in ("health.canary_failed", "health.engine_dead")]
        # a request meanwhile is refused, retry elsewhere
        async def refused() -> CallError:
            with pytest.raises(CallError) as info:
                async with Call(tcp_address(w), "generate", {"token_ids": [1]}) as call:
                    await call.collect()
            return info.value
        error = trio.run(refused)
        assert (error.code, error.migratable) == ("unavailable", True)
        r = w.post("/engine/wake_up", json={})
        assert r.status_code == 200, r.text
        assert list(tmp_path.glob("*/*.json")), "awake: registered again"
        w.wait_ready(10)

        async def served() -> list[Any]:
            async with Call(tcp_address(w), "generate", {"token_ids": [1],
                                                          "stop_conditions": {"max_tokens": 2}}) as call:
                return await call.collect()
        assert len(trio.run(served)) == 2
    finally:
        gen.close()


# -- raw frames ------------------------------------------------------------------------------


def test_a_duplicate_id_on_one_connection_is_refused_without_touching_the_first(worker: Worker) -> None:
    host, port = tcp_address(worker).split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        payload = {"token_ids": [9], "stop_conditions": {"max_tokens": 50}}
        s.sendall(encode_frame(Request("dup", "generate", payload)) + encode_frame(Request("dup", "generate", payload)))
        reader = FrameReader()
        frames: list[Any] = []
        deadline = time.monotonic() + 10
        while not any(isinstance(f, End) for f in frames) and time.monotonic() < deadline:
            frames += reader.feed(s.recv(65536))
    errors = [f for f in frames if isinstance(f, Error)]
    assert len(errors) == 1 and errors[0].code == "invalid_request" and "already in flight" in errors[0].message
    assert sum(len(f.payload["token_ids"]) for f in frames if isinstance(f, Data)) == 50
