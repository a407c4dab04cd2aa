"""LoRA adapters (request plane and OpenAI API), priority scheduling, sleep/wake and the health
canary on real vLLM (one worker, one sequence at a time, --scheduling-policy priority)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from supervisor.client import Call, CallError
from tests.conftest import request_address, start_vllm_worker
from tests.kvfake import wait_until as poll_until
from tests.procs import Worker, wait_until

pytestmark = pytest.mark.vllm

PROMPT = [1, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path) -> Path:
    from actors.engine.models import build_tiny_lora, default_cache_dir

    return build_tiny_lora(tiny_model, default_cache_dir() / "tiny-lora-test")


@pytest.fixture(scope="module")
def worker(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    tmp = tmp_path_factory.mktemp("lora-worker")
    gen = start_vllm_worker(tiny_model, tmp, "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                            "--canary-wait-time", "1", "--http-port", "0", "--max-num-seqs", "1",
                            "--scheduling-policy", "priority")
    w = next(gen)
    w.discovery_dir = tmp / "discovery"  # type: ignore[attr-defined]
    w.wait_ready(timeout=240)
    yield w
    gen.close()


async def call(w: Worker, endpoint: str, payload: Any) -> list[Any]:
    async with Call(request_address(w), endpoint, payload) as c:
        return await c.collect()


def greedy(n: int, model: str | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"token_ids": PROMPT, "sampling_options": {"temperature": 0.0},
                         "stop_conditions": {"max_tokens": n, "ignore_eos": True}}
    if model:
        p["model"] = model
    return p


def tokens(items: list[dict[str, Any]]) -> list[int]:
    return [t for i in items for t in i["token_ids"]]


async def test_lora_load_generate_mixed_batch_unload(worker: Worker, lora_dir: Path) -> None:
    load = {"lora_name": "tiny-lora", "source": {"uri": f"file://{lora_dir}"}}
    first = (await call(worker, "load_lora", load))[-1]
    assert first["status"] == "success" and first["lora_name"] == "tiny-lora"
    again = (await call(worker, "load_lora", load))[-1]  # idempotent
    assert again["lora_id"] == first["lora_id"] and "already" in again["message"]
    listed = (await call(worker, "list_loras", {}))[-1]
    assert listed == {"status": "success", "loras": {"tiny-lora": first["lora_id"]}, "count": 1}

    base_alone = tokens(await call(worker, "generate", greedy(8)))
    lora_alone = tokens(await call(worker, "generate", greedy(8, "tiny-lora")))
    assert lora_alone != base_alone  # the adapter is applied
    # a batch mixing base and LoRA requests: each equals its single-request output
    results: dict[str, list[list[int]]] = {"base": [], "lora": []}

    async def one(kind: str) -> None:
        results[kind].append(tokens(await call(worker, "generate", greedy(8, "tiny-lora" if kind == "lora" else None))))

    async with trio.open_nursery() as nursery:
        for kind in ("base", "lora", "base", "lora"):
            nursery.start_soon(one, kind)
    assert results["base"] == [base_alone, base_alone]
    assert results["lora"] == [lora_alone, lora_alone]

    unloaded = (await call(worker, "unload_lora", {"lora_name": "tiny-lora"}))[-1]
    assert unloaded["status"] == "success"
    with pytest.raises(CallError) as missing:
        await call(worker, "unload_lora", {"lora_name": "tiny-lora"})
    assert missing.value.code == "not_found" and "loaded: []" in missing.value.message
    with pytest.raises(CallError) as gone:
        await call(worker, "generate", greedy(2, "tiny-lora"))
    assert gone.value.code == "not_found"


async def test_lora_bad_source_and_system_routes(worker: Worker, lora_dir: Path) -> None:
    with pytest.raises(CallError) as bad:
        await call(worker, "load_lora", {"lora_name": "x", "source": {"uri": "file:///no/such/dir"}})
    assert bad.value.code == "invalid_request" and "/no/such/dir" in bad.value.message
    with pytest.raises(CallError) as remote:
        await call(worker, "load_lora", {"lora_name": "x", "source": {"uri": "s3://bucket/x"}})
    assert "file://" in remote.value.message
    body = {"lora_name": "via-http", "source": {"uri": f"file://{lora_dir}"}}
    async with httpx.AsyncClient(base_url=worker.url(""), timeout=60) as http:
        r = await http.post("/loras", json=body)
        assert r.status_code == 200 and r.json()["status"] == "success"
        assert (await http.get("/loras")).json()["loras"].keys() == {"via-http"}
        assert (await http.delete("/loras/via-http")).status_code == 200
        assert (await http.delete("/loras/via-http")).status_code == 404


@pytest.fixture
async def client(worker: Worker) -> AsyncIterator[openai.AsyncOpenAI]:
    """Closed when the test ends: an AsyncOpenAI left to the garbage collector closes itself
    from ``__del__`` with a task on whatever asyncio loop runs then. In a later test that is a
    trio-asyncio loop, and its trio transport inside an asyncio task crashes that loop (CI: "Task
    got bad yield" in the NATS restart test)."""
    port = worker.wait_event("http.listening")["port"]
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                                  timeout=120) as c:
        yield c


async def test_lora_on_the_openai_api(worker: Worker, lora_dir: Path, tiny_model: Path,
                                      client: openai.AsyncOpenAI) -> None:
    from transformers import AutoTokenizer

    async with httpx.AsyncClient(base_url=worker.url(""), timeout=60) as http:
        loaded = await http.post("/loras", json={"lora_name": "adapter", "source": {"uri": f"file://{lora_dir}"}})
    assert loaded.status_code == 200, loaded.text
    try:
        models = {m.id: m for m in (await client.models.list()).data}
        base = str(tiny_model)
        assert models.keys() == {base, "adapter"}
        assert (models["adapter"].model_extra or {}).get("parent") == base
        assert (models[base].model_extra or {}).get("parent") is None
        # the adapter's greedy answer on the OpenAI API is the request plane's, in the model's own words
        lora_tokens = tokens(await call(worker, "generate", greedy(8, "adapter")))
        base_tokens = tokens(await call(worker, "generate", greedy(8)))
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)

        def text(ids: list[int]) -> str:
            """What follows the prompt, decoded with it, up to a last character whose bytes the
            8 tokens leave incomplete (the random model writes byte tokens; a streaming
            detokenizer and a whole decode may render such an end differently)."""
            def decode(t: list[int]) -> str:
                return str(tokenizer.decode(t, skip_special_tokens=True))
            return decode(PROMPT + ids)[len(decode(PROMPT)):].rstrip("\ufffd")

        assert text(lora_tokens) != text(base_tokens)
        for model, expected in (("adapter", lora_tokens), (base, base_tokens)):
            answer = await client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                                     extra_body={"ignore_eos": True})
            assert answer.model == model and answer.usage is not None and answer.usage.completion_tokens == 8
            assert text(expected) and answer.choices[0].text.startswith(text(expected)), (answer.choices[0].text,
                                                                                            text(expected))
        chat = await client.chat.completions.create(model="adapter", max_tokens=4,
                                                    messages=[{"role": "user", "content": "hi"}])
        assert chat.model == "adapter" and chat.usage is not None and chat.usage.completion_tokens == 4
    finally:
        async with httpx.AsyncClient(base_url=worker.url(""), timeout=60) as http:
            assert (await http.delete("/loras/adapter")).status_code == 200


async def test_priority_orders_the_waiting_requests(worker: Worker, tiny_model: Path,
                                                    client: openai.AsyncOpenAI) -> None:
    """One sequence at a time: while a long request runs, a low-priority request and then a
    high-priority one wait; once the long one is cancelled, vLLM (lower value first) runs the
    high-priority one first."""

    async def ask(name: str, tokens: int, priority: int, finished: list[str],
                  started: trio.Event | None = None) -> None:
        stream = await client.completions.create(model=str(tiny_model), prompt=PROMPT, max_tokens=tokens,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True, "priority": priority})
        async for _ in stream:
            if started is not None and not started.is_set():
                started.set()
        finished.append(name)

    async def ask_long(scope: trio.CancelScope, finished: list[str], running: trio.Event) -> None:
        with scope:  # as long as the context allows: it holds the one sequence until cancelled
            await ask("long", 2048 - len(PROMPT), 0, finished, running)

    # The long request lasts as long as the model's context allows (seconds). A test process held
    # up for longer (seen in CI) queues the others after it ended; that run says nothing about
    # priority, so it is run again.
    for _attempt in range(3):
        finished: list[str] = []
        async with trio.open_nursery() as nursery:
            running = trio.Event()
            long = trio.CancelScope()
            nursery.start_soon(ask_long, long, finished, running)
            await running.wait()
            nursery.start_soon(ask, "low", 20, 10, finished)
            queued = await _waiting(worker, 2, finished)
            if queued:
                nursery.start_soon(ask, "high", 20, -10, finished)
                queued = await _waiting(worker, 3, finished)
            long.cancel()  # the client goes away: vLLM aborts it and picks the next waiting request
        await poll_until(lambda: _inflight(worker) == 0, 30)
        if queued:
            break
    else:
        raise AssertionError("three times the long request ended before both others were queued behind it")
    assert finished == ["high", "low"]


def _inflight(w: Worker) -> int:
    """Completions the worker has started and not finished (its own log)."""
    events = w.events()
    return (sum(e.get("event") == "request.started" and e.get("endpoint") == "completions" for e in events)
            - sum(e.get("event") == "request.finished" and e.get("endpoint") == "completions" for e in events))


async def _waiting(w: Worker, count: int, finished: list[str]) -> bool:
    """Until the worker has ``count`` completions in flight (True), or the long one has ended."""
    await poll_until(lambda: _inflight(w) >= count or "long" in finished, 60)
    return "long" not in finished


def _registered(w: Worker) -> list[Any]:
    return [json.loads(p.read_text()) for p in w.discovery_dir.glob("*/*.json")]  # type: ignore[attr-defined]


async def test_sleep_deregisters_and_wake_up_reverses_it(worker: Worker) -> None:
    assert len(_registered(worker)) == 1
    slept = (await call(worker, "sleep", {"level": 1}))[-1]
    assert slept["status"] == "ok" and "asleep" in slept["message"]
    assert _registered(worker) == []
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(worker.url("/ready"))).status_code == 503
    assert "already" in (await call(worker, "sleep", {}))[-1]["message"]  # idempotent
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(worker.url("/engine/wake_up"), json={})
    assert r.status_code == 200 and r.json()["message"] == "engine awake"
    assert len(_registered(worker)) == 1
    worker.wait_ready(timeout=10)
    assert "already" in (await call(worker, "wake_up", {}))[-1]["message"]
    assert len(tokens(await call(worker, "generate", greedy(3)))) == 3
    with pytest.raises(CallError):
        await call(worker, "sleep", {"level": 7})


def test_canary_runs_when_idle(worker: Worker) -> None:
    wait_until(lambda: any(e.get("event") == "health.canary" and e.get("ok") for e in worker.events()), 30,
               "a successful canary")
    canary = next(e for e in worker.events() if e.get("event") == "health.canary")
    assert canary["request_id"].startswith("health-canary-") and canary["actor"] == "root/health"
