"""Engine outputs -> OpenAI responses and stream chunks, shaped as ``vllm serve`` shapes them.

A call has ``len(prompts) * n`` choices; choice ``i`` is sample ``i % n`` of
prompt ``i // n``. The :class:`Renderer` keeps each choice's text, logprobs and
finish reason as outputs arrive (in any interleaving), and renders either the
stream's chunks as it goes or the whole response at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.base import StepOutput
from .parsing import ChatParsing, ChoiceParser
from .request import OpenAICall, Prompt
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["Renderer", "finish_reason", "usage"]

LOGPROB_FLOOR = -9999.0  # what OpenAI (and vLLM) put for -inf


def finish_reason(reason: str | None) -> str | None:
    """Token mode says ``cancelled`` where vLLM's API says ``abort``."""
    return {"cancelled": "abort"}.get(reason or "", reason)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": None if cached_tokens is None else {"cached_tokens": cached_tokens}}


def _floor(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


@dataclass
class _Choice:
    index: int
    prompt: Prompt
    detok: IncrementalDetokenizer | None
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    stop_reason: int | str | None = None
    echoed: bool = False
    role_sent: bool = False
    text_offset: int = 0
    # completions logprobs, accumulated for the whole response
    lp_tokens: list[str] = field(default_factory=list)
    lp_values: list[float | None] = field(default_factory=list)
    lp_top: list[dict[str, float] | None] = field(default_factory=list)
    lp_offsets: list[int] = field(default_factory=list)
    chat_logprobs: list[dict[str, Any]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # kept when a parser reads the answer
    parser: ChoiceParser | None = None  # tool calls and reasoning (actors.openai.parsing)
    pieces: list[str] = field(default_factory=list)  # the last output's text, token by token (for the parser)


class Renderer:
    def __init__(self, call: OpenAICall, model: str, tokenizer: Tokenizer,
                 parsing: ChatParsing | None = None) -> None:
        self.call = call
        self.model = model
        self.tokenizer = tokenizer
        self.parsing = parsing if call.chat else None
        self.choices: list[_Choice] = [
            _Choice(p * call.n + s, prompt, None,
                    parser=self.parsing.choice(prompt.token_ids) if self.parsing else None)
            for p, prompt in enumerate(call.prompts) for s in range(call.n)
        ]
        self.prompt_logprobs: dict[int, list[Any]] = {}
        self.cached_tokens: int | None = None
        self.reported_prompt_tokens: dict[int, int] = {}  # by prompt, when the backend built the prompt
        self._token_text: Callable[[int], str] = tokenizer.token_text

    # -- feeding ---------------------------------------------------------------------
    def _choice(self, prompt_index: int, out: StepOutput) -> _Choice:
        return self.choices[prompt_index * self.call.n + out.index]

    def _text(self, choice: _Choice, out: StepOutput) -> str:
        if choice.parser is not None:
            # a parser reads the stream token by token (as vllm serve's engine loop feeds it): an
            # output that carries several tokens is cut into each one's text
            if choice.detok is None:
                choice.detok = IncrementalDetokenizer(self.tokenizer)
            choice.pieces = [choice.detok.add([token]) for token in out.token_ids]
            return "".join(choice.pieces)
        if out.text is not None:
            return out.text
        if choice.detok is None:
            choice.detok = IncrementalDetokenizer(self.tokenizer)
        return choice.detok.add(out.token_ids)

    def take(self, prompt_index: int, out: StepOutput) -> tuple[_Choice, str, Any]:
        """Record one output; returns its choice, its text delta and its logprobs (rendered
        for this API) so a stream can send them."""
        choice = self._choice(prompt_index, out)
        delta = self._text(choice, out)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = out.prompt_logprobs
        if out.final:
            self.cached_tokens = (self.cached_tokens or 0) + out.cached_tokens
            if not choice.prompt.token_ids:  # the backend built the prompt: its count is the one
                self.reported_prompt_tokens[prompt_index] = out.prompt_tokens
        token_ids: Sequence[int] = out.token_ids
        tops: Sequence[list[dict[str, Any]] | None] | None = out.top_logprobs
        if self.call.echo and not choice.echoed:
            choice.echoed = True
            prompt_text = choice.prompt.text if choice.prompt.text is not None else \
                self.tokenizer.decode(choice.prompt.token_ids)
            delta = prompt_text + delta
            token_ids = [*choice.prompt.token_ids, *out.token_ids]
            if tops is not None:
                tops = [*(self.prompt_logprobs.get(prompt_index) or [None] * len(choice.prompt.token_ids)),
                        *tops]
        choice.text.append(delta)
        choice.tokens += len(out.token_ids)
        if choice.parser is not None:
            choice.token_ids += out.token_ids
        if out.finish_reason is not None:
            choice.finish = finish_reason(out.finish_reason)
            choice.stop_reason = out.stop_reason
        logprobs: Any = None
        if self.call.logprobs is not None and tops is not None:
            logprobs = self._chat_logprobs(choice, token_ids, tops) if self.call.chat else \
                self._completion_logprobs(choice, token_ids, tops)
        return choice, delta, logprobs

    # -- logprobs ------------------------------------------------------------------------
    def _token(self, token_id: int, candidates: list[dict[str, Any]] | None) -> tuple[str, float | None]:
        for cand in candidates or ():
            if cand["token_id"] == token_id:
                token = cand.get("token")
                return (token if token is not None else self._token_text(token_id)), _floor(cand["logprob"])
        return self._token_text(token_id), None

    def _candidate_text(self, candidate: dict[str, Any]) -> str:
        token = candidate.get("token")
        return str(token) if token is not None else self._token_text(int(candidate["token_id"]))

    def _completion_logprobs(self, choice: _Choice, token_ids: Sequence[int],
                             tops: Sequence[list[dict[str, Any]] | None]) -> dict[str, Any]:
        wanted = self.call.logprobs
        assert wanted is not None
        tokens: list[str] = []
        values: list[float | None] = []
        top: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for i, token_id in enumerate(token_ids):
            candidates = tops[i] if i < len(tops) else None
            token, value = self._token(token_id, candidates)
            tokens.append(token)
            values.append(value)
            if candidates is None or value is None:
                top.append(None)
            else:
                # the sampled token and the top ``logprobs`` alternatives, as vLLM lists them
                top.append({self._candidate_text(c): _floor(c["logprob"])
                            for j, c in enumerate(candidates) if wanted == -1 or wanted >= j})
            offsets.append(choice.text_offset)
            choice.text_offset += len(token)
        choice.lp_tokens += tokens
        choice.lp_values += values
        choice.lp_top += top
        choice.lp_offsets += offsets
        return {"text_offset": offsets, "token_logprobs": values, "tokens": tokens, "top_logprobs": top}

    def _chat_logprobs(self, choice: _Choice, token_ids: Sequence[int],
                       tops: Sequence[list[dict[str, Any]] | None]) -> dict[str, Any]:
        wanted = self.call.logprobs
        content: list[dict[str, Any]] = []
        for i, token_id in enumerate(token_ids):
            candidates = tops[i] if i < len(tops) else None
            token, value = self._token(token_id, candidates)
            entry: dict[str, Any] = {"token": token, "logprob": value if value is not None else LOGPROB_FLOOR,
                                     "bytes": list(token.encode("utf-8", errors="replace"))}
            alternatives = []
            for j, c in enumerate(candidates or ()):
                if wanted == -1 or (wanted is not None and j < wanted):
                    text = self._candidate_text(c)
                    alternatives.append({"token": text, "logprob": _floor(c["logprob"]),
                                         "bytes": list(text.encode("utf-8", errors="replace"))})
            entry["top_logprobs"] = alternatives
            content.append(entry)
        choice.chat_logprobs += content
        return {"content": content}

    # -- streaming ------------------------------------------------------------------------
    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.call.request_id, "object": "chat.completion.chunk" if self.call.chat
                else "text_completion", "created": self.call.created, "model": self.model, "choices": choices}

    def first_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open each choice with the assistant's role."""
        if not self.call.chat:
            return []
        chunks = []
        for choice in self.choices:
            choice.role_sent = True
            chunk = self._chunk([{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
            if self.call.continuous_usage:
                chunk["usage"] = usage(self._prompt_tokens(choice), 0)
            chunks.append(chunk)
        return chunks

    def chunks(self, prompt_index: int, out: StepOutput) -> list[dict[str, Any]]:
        choice, delta, logprobs = self.take(prompt_index, out)
        if not delta and not out.token_ids and out.finish_reason is None:
            return []  # nothing new (a prefill step)
        finished = out.finish_reason is not None
        entry: dict[str, Any] = {"index": choice.index, "logprobs": logprobs,
                                 "finish_reason": choice.finish if finished else None}
        if choice.parser is not None:
            parsed = choice.parser.deltas(choice.pieces, out.token_ids, finished)
            if finished:
                entry["finish_reason"] = choice.parser.finish_reason(choice.finish or "stop")
            if parsed is None and not finished:
                return []  # the parser holds it back (the start of a tool call or a tag)
            entry["delta"] = _with_reasoning_alias(parsed or {})
        elif self.call.chat:
            entry["delta"] = {"content": delta}
        else:
            entry["text"] = delta
            entry["stop_reason"] = choice.stop_reason if out.finish_reason is not None else None
        chunk = self._chunk([entry])
        if self.call.continuous_usage:
            chunk["usage"] = usage(self._prompt_tokens(choice), choice.tokens)
        return [chunk]

    def last_chunks(self) -> list[dict[str, Any]]:
        if not self.call.include_usage:
            return []
        chunk = self._chunk([])
        chunk["usage"] = self.usage()
        return [chunk]

    # -- the whole response ---------------------------------------------------------------
    def _prompt_tokens(self, choice: _Choice) -> int:
        return len(choice.prompt.token_ids) or self.reported_prompt_tokens.get(choice.index // self.call.n, 0)

    def usage(self) -> dict[str, Any]:
        prompt_tokens = sum(len(p.token_ids) or self.reported_prompt_tokens.get(i, 0)
                            for i, p in enumerate(self.call.prompts))
        return usage(prompt_tokens, sum(c.tokens for c in self.choices), self.cached_tokens)

    def response(self) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for choice in self.choices:
            text = "".join(choice.text)
            if self.call.chat:
                chat_logprobs = {"content": choice.chat_logprobs} if self.call.logprobs is not None else None
                message: dict[str, Any] = {"role": "assistant", "content": text, "tool_calls": []}
                finish = choice.finish
                if choice.parser is not None:
                    reasoning, content, tool_calls = choice.parser.whole(text, choice.token_ids)
                    message = _with_reasoning_alias({"role": "assistant", "content": content,
                                                     "tool_calls": tool_calls, "reasoning": reasoning})
                    finish = choice.parser.finish_reason(finish or "stop")
                choices.append({"index": choice.index, "message": message, "logprobs": chat_logprobs,
                                "finish_reason": finish, "stop_reason": choice.stop_reason})
            else:
                logprobs: dict[str, Any] | None = None
                if self.call.logprobs is not None:
                    logprobs = {"text_offset": choice.lp_offsets, "token_logprobs": choice.lp_values,
                                "tokens": choice.lp_tokens, "top_logprobs": choice.lp_top}
                prompt_index = choice.index // self.call.n
                prompt_lp = self.prompt_logprobs.get(prompt_index) if self.call.body.get("prompt_logprobs") \
                    is not None else None
                choices.append({"index": choice.index, "text": text, "logprobs": logprobs,
                                "finish_reason": choice.finish, "stop_reason": choice.stop_reason,
                                "prompt_logprobs": _vllm_prompt_logprobs(prompt_lp)})
        return {"id": self.call.request_id, "object": "chat.completion" if self.call.chat else "text_completion",
                "created": self.call.created, "model": self.model, "choices": choices, "usage": self.usage()}


def _with_reasoning_alias(message: dict[str, Any]) -> dict[str, Any]:
    """vLLM 0.32 names a message's reasoning ``reasoning``; Dynamo and older vLLM clients read
    ``reasoning_content``: both are given."""
    if message.get("reasoning") is not None:
        message["reasoning_content"] = message["reasoning"]
    return message


def _vllm_prompt_logprobs(entries: list[Any] | None) -> list[Any] | None:
    """vLLM's shape: per prompt token (the first is null), ``{token_id: {logprob, rank, decoded_token}}``."""
    if entries is None:
        return None
    return [None if entry is None else {str(c["token_id"]): {"logprob": c["logprob"], "rank": c["rank"],
                                                             "decoded_token": c["token"]} for c in entry}
            for entry in entries]
