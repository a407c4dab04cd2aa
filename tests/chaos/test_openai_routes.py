"""OpenAI routes and flags beyond completions (synthetic engine with the tiny model's real
tokenizer): --endpoint-types, /tokenize, /detokenize, /version, and --use-vllm-tokenizer's
text mode on the request plane."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from supervisor.client import Call
from tests.procs import Worker, worker_fixture
from tests.synthetic import continuation


def start(tiny_model: Path, *args: str) -> Iterator[Worker]:
    gen = worker_fixture("--engine", "synthetic", "--synthetic-step-ms", "2", "--model", str(tiny_model),
                         "--http-port", "0", *args)
    w = next(gen)
    w.wait_ready()
    yield w
    gen.close()


@pytest.fixture
def completions_only(tiny_model: Path) -> Iterator[Worker]:
    yield from start(tiny_model, "--endpoint-types", "completions")


@pytest.fixture
def text_mode(tiny_model: Path) -> Iterator[Worker]:
    yield from start(tiny_model, "--use-vllm-tokenizer")


def base(w: Worker) -> str:
    return f"http://127.0.0.1:{w.wait_event('http.listening')['port']}"


def test_endpoint_types_decide_the_routes(completions_only: Worker, tiny_model: Path) -> None:
    client = openai.OpenAI(base_url=base(completions_only) + "/v1", api_key="x", max_retries=0)
    assert client.completions.create(model=str(tiny_model), prompt="a", max_tokens=1).choices
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=str(tiny_model), messages=[{"role": "user", "content": "a"}])
    body = info.value.response.json()
    assert body["error"]["type"] == "NotFoundError" and "--endpoint-types completions" in body["error"]["message"]


def test_tokenize_detokenize_and_version(completions_only: Worker, tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    r = httpx.post(base(completions_only) + "/tokenize", json={"model": str(tiny_model), "prompt": "the cat sat"})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == tok.encode("the cat sat") and r.json()["count"] == len(r.json()["tokens"])
    back = httpx.post(base(completions_only) + "/detokenize", json={"model": str(tiny_model),
                                                                     "tokens": r.json()["tokens"]})
    assert back.json()["prompt"] == tok.decode(r.json()["tokens"], skip_special_tokens=True)
    chat = httpx.post(base(completions_only) + "/tokenize", json={"model": str(tiny_model),
                                                                   "messages": [{"role": "user", "content": "hi"}]})
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.json()["tokens"] == tok.encode(rendered, add_special_tokens=False)
    assert httpx.get(base(completions_only) + "/version").json()["llm_supervisor"]
    bad = httpx.post(base(completions_only) + "/detokenize", json={"model": str(tiny_model), "tokens": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


async def test_text_mode_on_the_request_plane(text_mode: Worker, tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    address = f"127.0.0.1:{text_mode.wait_event('request_plane.listening')['port']}"
    messages = [{"role": "user", "content": "hello"}]
    async with Call(address, "generate", {"messages": messages, "max_tokens": 4}) as call:
        chunks = await call.collect()
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    prompt = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)
    assert text == tok.decode(continuation(prompt, 4, vocab=len(tok)), skip_special_tokens=True)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # a completion prompt, and token mode, on the same worker
    async with Call(address, "generate", {"prompt": "the cat", "max_tokens": 2}) as call:
        done = await call.collect()
    assert done[-1]["object"] == "text_completion"
    async with Call(address, "generate", {"token_ids": [5, 6], "stop_conditions": {"max_tokens": 2}}) as call:
        tokens = [t for item in await call.collect() for t in item["token_ids"]]
    assert tokens == continuation([5, 6], 2, vocab=len(tok))
