"""The worker's OpenAI-compatible HTTP front, driven by the official `openai` client."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.procs import Worker, worker_fixture
from tests.synthetic import text


def http_client(worker: Worker) -> openai.OpenAI:
    port = worker.wait_event("http.listening", timeout=120)["port"]
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def http_base(worker: Worker) -> str:
    return f"http://127.0.0.1:{worker.wait_event('http.listening')['port']}"


# -- real vLLM ----------------------------------------------------------------------------


@pytest.mark.vllm
def test_models_and_completions_on_vllm(vllm_worker: Worker, tiny_model: object) -> None:
    client = http_client(vllm_worker)
    models = client.models.list()
    assert [m.id for m in models.data] == [str(tiny_model)]
    done = client.completions.create(model=str(tiny_model), prompt="the cat sat", max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 6
    assert done.usage.total_tokens == done.usage.prompt_tokens + 6
    assert isinstance(done.choices[0].text, str)
    again = client.completions.create(model=str(tiny_model), prompt="the cat sat", max_tokens=6, temperature=0)
    assert again.choices[0].text == done.choices[0].text  # greedy is deterministic


@pytest.mark.vllm
def test_chat_streaming_on_vllm(vllm_worker: Worker, tiny_model: object) -> None:
    client = http_client(vllm_worker)
    stream = client.chat.completions.create(
        model=str(tiny_model), messages=[{"role": "user", "content": "hello there"}], max_tokens=5,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason == "length"
    assert content[0].choices[0].delta.content == ""  # the role opens the stream, as vllm serve does
    assert len(content) == 1 + 5  # then one chunk per engine step
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 5
    unary = client.chat.completions.create(
        model=str(tiny_model), messages=[{"role": "user", "content": "hello there"}], max_tokens=5, temperature=0
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in content)
    assert unary.choices[0].message.content == streamed


@pytest.mark.vllm
def test_openai_errors_on_vllm(vllm_worker: Worker, tiny_model: object) -> None:
    client = http_client(vllm_worker)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=str(tiny_model), prompt="x", max_tokens=-1)
    assert "max_tokens" in str(bad.value)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert "no-such-model" in str(missing.value)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=str(tiny_model), prompt=[1] * 2100, max_tokens=2)
    assert "context length" in str(too_long.value)
    r = httpx.post(http_base(vllm_worker) + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "BadRequestError"
    # and the worker still serves
    ok = client.completions.create(model=str(tiny_model), prompt="x", max_tokens=2, temperature=0)
    assert ok.usage is not None and ok.usage.completion_tokens == 2


@pytest.mark.vllm
def test_client_disconnect_aborts_on_vllm(vllm_worker: Worker, tiny_model: object) -> None:
    body = {"model": str(tiny_model), "prompt": "tell me a long story", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", http_base(vllm_worker) + "/v1/completions", json=body) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        first = json.loads(next(lines).removeprefix("data: "))
        next(lines)
    request_id = first["id"]
    assert request_id.startswith("cmpl-")
    aborted = vllm_worker.wait_event("request.aborted", timeout=20, request_id=request_id)
    assert aborted["reason"] == "client disconnected"
    assert aborted["message"] == f"Aborted Request ID: {request_id}"
    # and the engine really dropped it
    engine_side = vllm_worker.wait_event("engine.aborted", timeout=20, request_id=request_id)
    assert engine_side["message"] == f"Aborted Request ID: {request_id}-0"  # the batch's first prompt


# -- synthetic engine: exact, cheap ----------------------------------------------------------


@pytest.fixture
def synthetic_http() -> Iterator[Worker]:
    yield from worker_fixture("--engine", "synthetic", "--synthetic-step-ms", "1", "--http-port", "0")


def test_synthetic_completion_text_is_exact(synthetic_http: Worker) -> None:
    client = http_client(synthetic_http)
    done = client.completions.create(model="synthetic", prompt="hi", max_tokens=3)
    assert done.choices[0].text == text(b"hi", 3)
    assert done.usage is not None and done.usage.prompt_tokens == 2
    chunks = list(client.completions.create(model="synthetic", prompt="hi", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text(b"hi", 3)
    assert chunks[-1].choices[0].finish_reason == "length"
