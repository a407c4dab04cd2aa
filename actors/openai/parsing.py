"""Tool calls and reasoning in chat answers, with vLLM's own parsers.

``--dyn-tool-call-parser NAME`` (hermes, llama3_json, mistral, pythonic ...) and
``--dyn-reasoning-parser NAME`` (qwen3, deepseek_r1 ...) name parsers from vLLM's
registries; a worker's model card carries the names, so a frontend parses its answers
the same way. Per chat request, :class:`ChatParsing` does what ``vllm serve`` does with
the same parsers:

- the request is validated as vLLM's ``ChatCompletionRequest`` and adjusted by the
  parser: a named function or ``tool_choice: required`` becomes a structural tag the
  output is constrained to (guided decoding);
- ``tools`` go to the chat template;
- each choice's text is split into ``reasoning``, ``content`` and ``tool_calls`` (whole, or
  delta by delta when streaming); ``finish_reason`` is ``tool_calls`` when the model called
  a tool on its own (``auto``) or was required to.

``tool_choice: auto`` with tools needs a tool parser (as ``vllm serve`` needs
``--enable-auto-tool-choice``): without one the request is refused with vLLM's words.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ErrorCode, RequestError, invalid

__all__ = ["ChatParsers", "ChatParsing", "ChoiceParser", "known_parsers"]


def known_parsers() -> tuple[list[str], list[str]]:
    """vLLM's registered tool parsers and reasoning parsers (imports vLLM)."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    tools = set(getattr(ToolParserManager, "tool_parsers", {})) | set(getattr(ToolParserManager, "lazy_parsers", {}))
    reasoning = set(getattr(ReasoningParserManager, "reasoning_parsers", {})) | set(
        getattr(ReasoningParserManager, "lazy_parsers", {}))
    return sorted(tools), sorted(reasoning)


@dataclass(frozen=True)
class ChatParsers:
    """The parser names a model is served with (from its flags, or its model card)."""

    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def __bool__(self) -> bool:
        return bool(self.tool_call_parser or self.reasoning_parser)


@functools.cache
def _parser_class(tool: str | None, reasoning: str | None) -> Any:
    from vllm.parser import ParserManager

    return ParserManager.get_parser(tool_parser_name=tool, reasoning_parser_name=reasoning,
                                    enable_auto_tools=tool is not None)


@functools.cache
def _vllm_tokenizer(directory: str) -> Any:
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(directory)


def _structured_section(params: Any) -> dict[str, Any]:
    """vLLM's StructuredOutputsParams -> the token-mode guided_decoding section."""
    out: dict[str, Any] = {}
    for key in ("json", "regex", "choice", "grammar", "json_object", "structural_tag"):
        value = getattr(params, key, None)
        if value is not None:
            out[key] = value
    return out


class ChoiceParser:
    """One choice's parser (vLLM's parsers keep state per stream)."""

    def __init__(self, parsing: ChatParsing, prompt_token_ids: Sequence[int]) -> None:
        self.parsing = parsing
        self.parser = parsing.new_parser()
        self.prompt_token_ids = list(prompt_token_ids)
        self.called_tool = False
        if self.parser is not None:
            self.parser.set_prompt_token_ids(self.prompt_token_ids)

    def whole(self, text: str, token_ids: Sequence[int]) -> tuple[str | None, str | None, list[dict[str, Any]]]:
        """The finished text -> (reasoning, content, tool calls as OpenAI objects)."""
        p = self.parsing
        if self.parser is None:
            return None, text, []
        reasoning, content, calls = self.parser.parse(text, p.request, enable_auto_tools=p.auto_tools,
                                                      model_output_token_ids=list(token_ids))
        tool_calls = []
        for call in calls or []:
            from vllm.entrypoints.generate.base.protocol import ToolCall

            tool_calls.append(ToolCall(id=call.id, function=call).model_dump() if call.id else
                              ToolCall(function=call).model_dump())
        self.called_tool = bool(tool_calls)
        if p.named_or_required and content is None:
            content = ""
        return reasoning, content, tool_calls

    def delta(self, text: str, token_ids: Sequence[int], finished: bool) -> dict[str, Any] | None:
        """One streamed piece -> the chunk's delta (content / reasoning / tool_calls), or None."""
        p = self.parsing
        if self.parser is None:
            return {"content": text}
        message = self.parser.parse_delta(text, list(token_ids), p.request, self.prompt_token_ids, finished=finished)
        if message is None:
            return None
        data: dict[str, Any] = message.model_dump(exclude_none=True)
        data.pop("role", None)
        if data.get("tool_calls"):
            self.called_tool = True
        return data or None

    def deltas(self, pieces: Sequence[str], token_ids: Sequence[int], finished: bool) -> dict[str, Any] | None:
        """Several tokens (one piece of text each) -> one delta, as if they came one by one."""
        if not token_ids:  # an output with no token (the prefill's): the parser is not told, as in vllm serve
            return self.delta("", [], True) if finished else None
        merged: dict[str, Any] = {}
        last = len(token_ids) - 1
        for i, (piece, token) in enumerate(zip(pieces, token_ids, strict=True)):
            data = self.delta(piece, [token], finished and i == last)
            for key, value in (data or {}).items():
                if key == "tool_calls":
                    _merge_tool_calls(merged.setdefault("tool_calls", []), value)
                elif isinstance(value, str):
                    merged[key] = merged.get(key, "") + value
                else:
                    merged[key] = value
        return merged or None

    def finish_reason(self, engine_reason: str) -> str:
        """``tool_calls`` when a tool was called on the model's own choice or as required."""
        p = self.parsing
        if (self.called_tool and p.auto_tools and not p.named) or (p.required and engine_reason == "stop"):
            return "tool_calls"
        return engine_reason


def _merge_tool_calls(into: list[dict[str, Any]], more: list[dict[str, Any]]) -> None:
    """Tool-call deltas of one chunk: a call's next argument piece joins the one before."""
    for call in more:
        last = into[-1] if into else None
        if last is not None and last.get("index") == call.get("index") and "id" not in call:
            function = last.setdefault("function", {})
            for key, value in (call.get("function") or {}).items():
                function[key] = (function.get(key) or "") + (value or "")
        else:
            into.append(call)


@dataclass
class ChatParsing:
    """One chat request's parsing (see the module's doc)."""

    parsers: ChatParsers
    tokenizer_dir: str
    request: Any  # vLLM's ChatCompletionRequest, adjusted
    guided: dict[str, Any] = field(default_factory=dict)
    chat_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def auto_tools(self) -> bool:
        return self.parsers.tool_call_parser is not None

    @property
    def named(self) -> bool:
        choice = self.request.tool_choice
        return choice is not None and not isinstance(choice, str)

    @property
    def required(self) -> bool:
        return bool(self.request.tool_choice == "required")

    @property
    def named_or_required(self) -> bool:
        return self.named or self.required

    def new_parser(self) -> Any:
        cls = _parser_class(self.parsers.tool_call_parser, self.parsers.reasoning_parser)
        if cls is None:
            return None
        return cls(_vllm_tokenizer(self.tokenizer_dir), self.request.tools, model_config=None)

    def choice(self, prompt_token_ids: Sequence[int]) -> ChoiceParser:
        return ChoiceParser(self, prompt_token_ids)

    @classmethod
    def for_request(cls, body: Mapping[str, Any], parsers: ChatParsers, tokenizer_dir: str | None
                    ) -> ChatParsing | None:
        """The parsing a chat request needs, or None (no tools and no reasoning parser);
        raises a 400 for what ``vllm serve`` refuses."""
        tools = body.get("tools")
        tool_choice = body.get("tool_choice")
        if not tools and not parsers.reasoning_parser:
            if tool_choice not in (None, "none", "auto"):
                raise invalid("When using `tool_choice`, `tools` must be set.", param="tool_choice")
            return None
        if tools and parsers.tool_call_parser is None and tool_choice in (None, "auto"):  # no choice means auto
            raise RequestError(ErrorCode.INVALID_REQUEST, '"auto" tool choice requires --dyn-tool-call-parser to '
                               "be set (vllm serve: --enable-auto-tool-choice and --tool-call-parser)",
                               param="tool_choice")
        if tokenizer_dir is None:
            raise RequestError(ErrorCode.INVALID_REQUEST, "tool calls and reasoning need the model's tokenizer "
                               "files; this model has none")
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        try:
            request = ChatCompletionRequest.model_validate({**body, "model": body.get("model") or "model"})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or None
            raise invalid(f"{where}: {first.get('msg')}" if where else str(first.get("msg")),
                          param=where.split(".")[0] if where else None) from None
        parsing = cls(parsers, tokenizer_dir, request)
        parser = parsing.new_parser()
        if parser is not None:
            parsing.request = parser.adjust_request(request)
        elif request.tool_choice == "required" or parsing.named:
            parsing.request = _constrain_without_parser(request)
        structured = getattr(parsing.request, "structured_outputs", None)
        if structured is not None:
            parsing.guided = _structured_section(structured)
        if tools:  # the template sees them even with tool_choice none (as vllm serve by default)
            parsing.chat_kwargs["tools"] = list(tools)
        return parsing


def _constrain_without_parser(request: Any) -> Any:
    """``required`` or a named function with no tool parser: vLLM's JSON schema of the call
    (as its serving does), so the answer still is a call."""
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    schema = get_json_schema_from_tools(tool_choice=request.tool_choice, tools=request.tools,
                                        parallel_tool_calls=request.parallel_tool_calls)
    if schema is not None:
        request.structured_outputs = StructuredOutputsParams(json=schema)
    return request
