"""Our worker's OpenAI front against ``vllm serve``: the same tiny model, the same engine
flags, the same requests through the official ``openai`` client; the answers must match."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.procs import VllmServe, Worker

pytestmark = pytest.mark.vllm


def ours(worker: Worker) -> openai.OpenAI:
    port = worker.wait_event("http.listening", timeout=120)["port"]
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def theirs(serve: VllmServe) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def clients(vllm_worker: Worker, vllm_serve: VllmServe) -> tuple[openai.OpenAI, openai.OpenAI]:
    return ours(vllm_worker), theirs(vllm_serve)


def both(clients: tuple[openai.OpenAI, openai.OpenAI], call: str, **kw: Any) -> tuple[Any, Any]:
    results = []
    for client in clients:
        api = client.completions if call == "completions" else client.chat.completions
        results.append(api.create(**kw))
    return results[0], results[1]


def streamed_texts(stream: Any, chat: bool) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            piece = (choice.delta.content or "") if chat else choice.text
            texts[choice.index] = texts.get(choice.index, "") + piece
    return texts


def choices(response: Any, chat: bool) -> list[tuple[int, str, str | None]]:
    return [(c.index, c.message.content if chat else c.text, c.finish_reason) for c in response.choices]


def usage(response: Any) -> tuple[int, int, int]:
    return response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens


def test_greedy_completion(clients: Any, tiny_model: Path) -> None:
    a, b = both(clients, "completions", model=str(tiny_model), prompt="the cat sat on", max_tokens=12,
                temperature=0)
    assert choices(a, False) == choices(b, False)
    assert usage(a) == usage(b)


def test_completion_without_max_tokens_stops_at_16_as_openai_does(clients: Any, tiny_model: Path) -> None:
    a, b = both(clients, "completions", model=str(tiny_model), prompt="hello", temperature=0)
    assert choices(a, False) == choices(b, False) and usage(a) == usage(b)
    assert a.usage.completion_tokens <= 16


@pytest.mark.parametrize("chat", [False, True])
def test_n2_sampled_choices(clients: Any, tiny_model: Path, chat: bool) -> None:
    kw: dict[str, Any] = {"model": str(tiny_model), "max_tokens": 10, "n": 2, "temperature": 1.0, "seed": 1234}
    if chat:
        kw["messages"] = [{"role": "user", "content": "tell me about cats"}]
    else:
        kw["prompt"] = "once upon a time"
    a, b = both(clients, "chat" if chat else "completions", **kw)
    assert len(a.choices) == 2
    assert choices(a, chat) == choices(b, chat)
    assert a.choices[0] != a.choices[1]
    assert usage(a) == usage(b)
    sa, sb = both(clients, "chat" if chat else "completions", stream=True, **kw)
    ta, tb = streamed_texts(sa, chat), streamed_texts(sb, chat)
    assert ta == tb == {c[0]: c[1] for c in choices(b, chat)}


def test_a_batch_of_prompts(clients: Any, tiny_model: Path) -> None:
    kw = {"model": str(tiny_model), "prompt": ["the cat", "a dog ran to the"], "max_tokens": 6, "temperature": 0}
    a, b = both(clients, "completions", **kw)
    assert len(a.choices) == 2
    assert choices(a, False) == choices(b, False)
    assert usage(a) == usage(b)
    sa, sb = both(clients, "completions", stream=True, **kw)
    assert streamed_texts(sa, False) == streamed_texts(sb, False) == {c[0]: c[1] for c in choices(b, False)}


def close(x: float | None, y: float | None) -> bool:
    if x is None or y is None:
        return x is y
    return math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-4)


def test_completion_logprobs(clients: Any, tiny_model: Path) -> None:
    kw = {"model": str(tiny_model), "prompt": "the dog", "max_tokens": 5, "temperature": 0, "logprobs": 3}
    a, b = both(clients, "completions", **kw)
    la, lb = a.choices[0].logprobs, b.choices[0].logprobs
    assert la is not None and lb is not None
    assert la.tokens == lb.tokens and la.text_offset == lb.text_offset
    assert all(close(x, y) for x, y in zip(la.token_logprobs, lb.token_logprobs, strict=True))
    assert [sorted(t) for t in la.top_logprobs] == [sorted(t) for t in lb.top_logprobs]
    assert all(close(ta[k], tb[k]) for ta, tb in zip(la.top_logprobs, lb.top_logprobs, strict=True) for k in ta)
    sa, sb = both(clients, "completions", stream=True, **kw)
    streamed = [t for chunk in sa for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    reference = [t for chunk in sb for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    assert streamed == reference == lb.tokens


def test_chat_logprobs(clients: Any, tiny_model: Path) -> None:
    kw = {"model": str(tiny_model), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
          "temperature": 0, "logprobs": True, "top_logprobs": 2}
    a, b = both(clients, "chat", **kw)
    ca, cb = a.choices[0].logprobs.content, b.choices[0].logprobs.content
    assert [e.token for e in ca] == [e.token for e in cb]
    assert [e.bytes for e in ca] == [e.bytes for e in cb]
    assert all(close(x.logprob, y.logprob) for x, y in zip(ca, cb, strict=True))
    assert [[t.token for t in e.top_logprobs] for e in ca] == [[t.token for t in e.top_logprobs] for e in cb]
    sa, sb = both(clients, "chat", stream=True, **kw)
    streamed = [e.token for chunk in sa for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    reference = [e.token for chunk in sb for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert streamed == reference == [e.token for e in cb]


def test_a_prompt_of_token_ids(clients: Any, tiny_model: Path) -> None:
    kw = {"model": str(tiny_model), "prompt": [1] + [(7 * i) % 300 + 3 for i in range(64)], "max_tokens": 8,
          "temperature": 0, "extra_body": {"ignore_eos": True}}
    a, b = both(clients, "completions", **kw)
    assert choices(a, False) == choices(b, False)
    sa, sb = both(clients, "completions", stream=True, **kw)
    assert streamed_texts(sa, False) == streamed_texts(sb, False) == {c[0]: c[1] for c in choices(b, False)}


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "n"], "additionalProperties": False}


@pytest.mark.parametrize("constraint", [
    {"structured_outputs": {"choice": ["red", "green", "blue"]}},
    {"structured_outputs": {"regex": "[a-z]{2,5}-[0-9]{2}"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}},
    {"response_format": {"type": "json_object"}},
], ids=["choice", "regex", "json_schema", "json_object"])
def test_structured_output(clients: Any, tiny_model: Path, constraint: dict[str, Any]) -> None:
    kw = {"model": str(tiny_model), "messages": [{"role": "user", "content": "pick one"}], "max_tokens": 40,
          "temperature": 0}
    extra = {k: v for k, v in constraint.items() if k != "response_format"}
    a, b = both(clients, "chat", extra_body=extra, response_format=constraint.get("response_format"), **kw)
    assert choices(a, True) == choices(b, True)
    content = a.choices[0].message.content
    if "choice" in extra.get("structured_outputs", {}):
        assert content in ("red", "green", "blue")
    if "regex" in extra.get("structured_outputs", {}):
        import re

        assert re.fullmatch("[a-z]{2,5}-[0-9]{2}", content)
    if constraint.get("response_format", {}).get("type") == "json_schema" and a.choices[0].finish_reason == "stop":
        import json

        data = json.loads(content)
        assert data["answer"] in ("yes", "no", "maybe") and set(data) == {"answer", "n"}


def test_guided_json_is_valid_against_its_schema(vllm_worker: Worker, tiny_model: Path) -> None:
    """The older guided_* fields (vllm serve 0.32 ignores them; Dynamo honours them, and so do we):
    the answer parses and matches the schema (compact JSON: see VLLM_TEST_ARGS)."""
    import json

    reply = ours(vllm_worker).chat.completions.create(
        model=str(tiny_model), messages=[{"role": "user", "content": "answer"}], max_tokens=60, temperature=0,
        extra_body={"guided_json": SCHEMA})
    data = json.loads(reply.choices[0].message.content)
    assert data["answer"] in ("yes", "no", "maybe") and 0 <= data["n"] <= 9 and set(data) == {"answer", "n"}


def test_echo_with_logprobs(clients: Any, tiny_model: Path) -> None:
    a, b = both(clients, "completions", model=str(tiny_model), prompt="the cat sat on", max_tokens=4,
                temperature=0, echo=True, logprobs=1)
    assert choices(a, False) == choices(b, False) and usage(a) == usage(b)
    assert a.choices[0].text.startswith("the cat sat on")
    ours_lp, theirs_lp = a.choices[0].logprobs, b.choices[0].logprobs
    assert ours_lp.tokens == theirs_lp.tokens and ours_lp.text_offset == theirs_lp.text_offset
    assert ours_lp.token_logprobs[0] is None and theirs_lp.token_logprobs[0] is None  # the first prompt token
    assert all(close(x, y) for x, y in zip(ours_lp.token_logprobs[1:], theirs_lp.token_logprobs[1:], strict=True))


def test_prompt_logprobs(clients: Any, tiny_model: Path) -> None:
    a, b = both(clients, "completions", model=str(tiny_model), prompt="the cat sat on", max_tokens=2,
                temperature=0, extra_body={"prompt_logprobs": 2})
    ours_p, theirs_p = a.choices[0].model_extra["prompt_logprobs"], b.choices[0].model_extra["prompt_logprobs"]
    assert len(ours_p) == len(theirs_p) and ours_p[0] is None and theirs_p[0] is None
    for mine, vllms in zip(ours_p[1:], theirs_p[1:], strict=True):
        assert set(mine) == set(vllms)  # the same candidate token ids, each with its rank and text
        for token_id, entry in vllms.items():
            assert mine[token_id]["rank"] == entry["rank"] and mine[token_id]["decoded_token"] == entry["decoded_token"]
            assert close(mine[token_id]["logprob"], entry["logprob"])


def test_continuous_usage_in_a_stream(clients: Any, tiny_model: Path) -> None:
    seen = []
    for client in clients:
        stream = client.chat.completions.create(
            model=str(tiny_model), messages=[{"role": "user", "content": "hello there"}], max_tokens=6,
            temperature=0, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
        chunks = list(stream)
        with_choices = [c for c in chunks if c.choices]
        assert with_choices and all(c.usage is not None for c in with_choices)
        # completion tokens grow to the end; the prompt's count never changes
        counts = [c.usage.completion_tokens for c in with_choices]
        assert counts == sorted(counts) and len({c.usage.prompt_tokens for c in with_choices}) == 1
        final = chunks[-1]
        assert not final.choices and final.usage is not None
        seen.append((streamed_texts(iter(chunks), True), usage(final)))
    assert seen[0] == seen[1]


def test_seed_and_user_sampled(clients: Any, tiny_model: Path) -> None:
    a, b = both(clients, "chat", model=str(tiny_model), messages=[{"role": "user", "content": "tell me"}],
                max_tokens=10, temperature=1.0, seed=1234, user="someone")
    assert choices(a, True) == choices(b, True) and usage(a) == usage(b)


def _error(client: openai.OpenAI, call: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    api = client.completions if call == "completions" else client.chat.completions
    with pytest.raises(openai.APIStatusError) as caught:
        api.create(**kw)
    error = caught.value
    return error.status_code, {"type": getattr(error, "type", None), "param": getattr(error, "param", None),
                               "message": error.message}


@pytest.mark.parametrize(("call", "kw"), [
    ("completions", {"model": "no-such-model", "prompt": "x", "max_tokens": 2}),
    ("completions", {"prompt": "word " * 3000, "max_tokens": 2}),
    ("completions", {"prompt": "x", "max_tokens": 2, "logprobs": -5}),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "top_logprobs": 2}),
    ("chat", {"messages": [], "max_tokens": 2}),
], ids=["unknown-model", "prompt-too-long", "negative-logprobs", "top-logprobs-without-logprobs", "no-messages"])
def test_errors_as_vllm_serve_gives_them(clients: Any, tiny_model: Path, call: str, kw: dict[str, Any]) -> None:
    kw = {"model": str(tiny_model), **kw}
    (ours_status, ours_body), (their_status, their_body) = (_error(c, call, **kw) for c in clients)
    assert ours_status == their_status, (ours_body, their_body)
    assert ours_body.get("type") == their_body.get("type"), (ours_body, their_body)
