"""Tool calling and reasoning against ``vllm serve``: the tiny tool model (Hermes-style
template, ``<tool_call>`` and ``<think>`` tokens), ``vllm serve --enable-auto-tool-choice
--tool-call-parser hermes --reasoning-parser qwen3`` and our worker with
``--dyn-tool-call-parser hermes --dyn-reasoning-parser qwen3``, the same requests through the
official ``openai`` client.

The random model never calls a tool on its own, so calls are forced: a named ``tool_choice``
or ``required`` (the parser's structural tag), or a ``structured_outputs`` regex that writes a
Hermes tool call for ``auto`` to find. Nor does it think on its own: a regex writes
``<think>...</think>`` and an answer (the structured output applies during reasoning too, on
both sides: vLLM's ``enable_in_reasoning``), and the parsers split them into ``reasoning`` and
``content``, whole and streamed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import VLLM_TEST_ARGS, openai_pair
from tests.procs import REPO, Worker

pytestmark = pytest.mark.vllm

TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                      "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                                     "required": ["zone"]}}},
]
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
THINK = r"<think>[a-z]{2,8}( [a-z]{2,8}){1,3}</think>[a-z]{2,8}( [a-z]{2,8}){1,3}"
THINK_ASK: list[Any] = [{"role": "user", "content": "Think, then answer."}]
# a Hermes tool call, written by the constraint (the parser, not the constraint, turns it into a call)
CALL_REGEX = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,6}"\}\}</tool_call>'


# the structured output constrains the reasoning too (vLLM's enable_in_reasoning), in both servers
PARSER_ENGINE_ARGS = (*VLLM_TEST_ARGS[:-2], "--structured-outputs-config",
                      json.dumps({"backend": "xgrammar", "disable_any_whitespace": True, "enable_in_reasoning": True}))


@pytest.fixture(scope="module")
def clients(tiny_tool_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, str]]:
    """Both parsers on, on both sides: a tool call and a thought are each parsed as vllm serve does."""
    assert VLLM_TEST_ARGS[-2] == "--structured-outputs-config"
    yield from openai_pair(tiny_tool_model, tmp_path_factory.mktemp("parsers"),
                           ("--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"),
                           ("--dyn-tool-call-parser", "hermes", "--dyn-reasoning-parser", "qwen3"),
                           engine_args=PARSER_ENGINE_ARGS)


def both(clients: Any, **kw: Any) -> tuple[Any, Any]:
    ours, theirs, model = clients
    return tuple(c.chat.completions.create(model=model, **kw) for c in (ours, theirs))  # type: ignore[return-value]


def calls(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def streamed(clients: Any, **kw: Any) -> list[tuple[str, list[tuple[str, Any]], str | None]]:
    """Each side's stream, assembled: content, the tool calls (name, arguments) and finish reason."""
    ours, theirs, model = clients
    results = []
    for client in (ours, theirs):
        content, finish = "", None
        pending: dict[int, dict[str, str]] = {}
        for chunk in client.chat.completions.create(model=model, stream=True, **kw):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for tc in choice.delta.tool_calls or []:
                    entry = pending.setdefault(tc.index, {"name": "", "arguments": ""})
                    if tc.function is not None:
                        entry["name"] += tc.function.name or ""
                        entry["arguments"] += tc.function.arguments or ""
                finish = choice.finish_reason or finish
        results.append((content, [(e["name"], json.loads(e["arguments"])) for _, e in sorted(pending.items())],
                        finish))
    return results


def test_a_named_function(clients: Any) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    a, b = both(clients, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=60, temperature=0)
    assert calls(a.choices[0].message) == calls(b.choices[0].message)
    assert [name for name, _ in calls(a.choices[0].message)] == ["get_weather"]
    assert a.choices[0].finish_reason == b.choices[0].finish_reason
    mine, vllms = streamed(clients, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=60, temperature=0)
    assert mine == vllms and mine[1] == calls(a.choices[0].message)


def test_required(clients: Any) -> None:
    """The answer is constrained to tool calls (the random model writes one after another until
    the length runs out: then, as vllm serve, no complete call is returned)."""
    a, b = both(clients, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0)
    assert calls(a.choices[0].message) == calls(b.choices[0].message)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert str(a.choices[0].message.content or "").startswith("<tool_call>")
    assert (a.choices[0].finish_reason, a.usage.completion_tokens) == (b.choices[0].finish_reason,
                                                                       b.usage.completion_tokens)


def test_auto_finds_the_call_the_model_wrote(clients: Any) -> None:
    kw: dict[str, Any] = {"messages": ASK, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 60, "temperature": 0,
                          "extra_body": {"structured_outputs": {"regex": CALL_REGEX}}}
    a, b = both(clients, **kw)
    assert calls(a.choices[0].message) == calls(b.choices[0].message)
    assert [name for name, _ in calls(a.choices[0].message)] == ["get_weather"]
    assert a.choices[0].finish_reason == b.choices[0].finish_reason == "tool_calls"
    assert a.choices[0].message.content == b.choices[0].message.content
    mine, vllms = streamed(clients, **kw)
    assert mine == vllms and mine[2] == "tool_calls"


def test_auto_without_a_call_and_none(clients: Any) -> None:
    for choice in ("auto", "none"):
        a, b = both(clients, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=12, temperature=0)
        assert (a.choices[0].message.content, calls(a.choices[0].message), a.choices[0].finish_reason) == \
            (b.choices[0].message.content, calls(b.choices[0].message), b.choices[0].finish_reason), choice


def test_a_conversation_with_a_tool_result(clients: Any) -> None:
    messages: list[Any] = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    a, b = both(clients, messages=messages, tools=TOOLS, max_tokens=10, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_tool_choice_auto_needs_a_parser(clients: Any, vllm_worker: Worker, tiny_model: Path) -> None:
    """Our worker without --dyn-tool-call-parser refuses auto with tools, as vllm serve without
    --enable-auto-tool-choice does."""
    port = vllm_worker.wait_event("http.listening", timeout=120)["port"]
    plain = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match=r"auto.? tool choice requires"):
        plain.chat.completions.create(model=str(tiny_model), messages=ASK, tools=TOOLS, tool_choice="auto",
                                      max_tokens=4)


def test_an_unknown_parser_is_refused_naming_the_known_ones() -> None:
    out = subprocess.run([sys.executable, "-m", "supervisor", "--engine", "synthetic", "--dyn-tool-call-parser",
                          "no-such-parser", "--check-config"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--dyn-tool-call-parser no-such-parser: unknown; vLLM's are: " in out.stderr and "hermes" in out.stderr


# -- reasoning

def split(message: Any) -> tuple[str | None, str | None]:
    return (message.model_extra or {}).get("reasoning"), message.content


def test_reasoning_is_split_from_the_answer(clients: Any) -> None:
    ours, theirs, model = clients
    kw: dict[str, Any] = {"model": model, "messages": THINK_ASK, "max_tokens": 40, "temperature": 0,
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
    a, b = (c.chat.completions.create(model=model, messages=THINK_ASK, max_tokens=10, temperature=0)
            for c in (ours, theirs))
    assert split(a.choices[0].message) == split(b.choices[0].message)
    assert a.choices[0].finish_reason == b.choices[0].finish_reason
