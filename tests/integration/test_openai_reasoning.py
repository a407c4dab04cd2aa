"""Reasoning against ``vllm serve``: the tiny tool model (``<think>`` tokens), ``vllm serve
--reasoning-parser qwen3`` and our worker with ``--dyn-reasoning-parser qwen3``. The random
model does not think on its own: a ``structured_outputs`` regex writes ``<think>...</think>``
and an answer (the structured output applies during reasoning too, on both sides), and the
parsers split them into ``reasoning`` and ``content``, whole and streamed."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.vllm

THINK = r"<think>[a-z]{2,8}( [a-z]{2,8}){1,3}</think>[a-z]{2,8}( [a-z]{2,8}){1,3}"
ASK: list[Any] = [{"role": "user", "content": "Think, then answer."}]


@pytest.fixture(scope="module")
def clients(parser_clients: tuple[Any, Any, str]) -> tuple[Any, Any, str]:
    return parser_clients


def split(message: Any) -> tuple[str | None, str | None]:
    return (message.model_extra or {}).get("reasoning"), message.content


def test_reasoning_is_split_from_the_answer(clients: Any) -> None:
    ours, theirs, model = clients
    kw: dict[str, Any] = {"model": model, "messages": ASK, "max_tokens": 40, "temperature": 0,
                          "extra_body": {"structured_outputs": {"regex": THINK}}}
    a, b = (c.chat.completions.create(**kw) for c in (ours, theirs))
    assert split(a.choices[0].message) == split(b.choices[0].message)
    reasoning, content = split(a.choices[0].message)
    assert reasoning and content and "<think>" not in content, (reasoning, content)
    assert (a.model_extra or {}).get("usage") is None or a.usage.completion_tokens == b.usage.completion_tokens
    # Dynamo's name for it too
    assert (a.choices[0].message.model_extra or {}).get("reasoning_content") == reasoning
    streams = []
    for client in (ours, theirs):
        thought, said = "", ""
        for chunk in client.chat.completions.create(stream=True, **kw):
            for choice in chunk.choices:
                thought += (choice.delta.model_extra or {}).get("reasoning") or ""
                said += choice.delta.content or ""
        streams.append((thought, said))
    assert streams[0] == streams[1]
    # streamed, vLLM's parser keeps a <think> the model spelled out character by character (not
    # as the one token) in the reasoning; whole, it drops it: the same text either way otherwise
    assert streams[0][0].removeprefix("<think>") == reasoning and streams[0][1] == content


def test_an_answer_that_never_closes_its_thinking(clients: Any) -> None:
    """qwen3's parser reads an answer without </think> as all reasoning: the same on both sides."""
    ours, theirs, model = clients
    a, b = (c.chat.completions.create(model=model, messages=ASK, max_tokens=10, temperature=0) for c in (ours, theirs))
    assert split(a.choices[0].message) == split(b.choices[0].message)
    assert a.choices[0].finish_reason == b.choices[0].finish_reason
