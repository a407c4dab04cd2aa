"""An OpenAI request body -> a validated :class:`OpenAICall`, and its prompts ->
token-mode payloads for the engine (or a worker, from the frontend).

The rules follow what ``vllm serve`` accepts and refuses (same defaults: a
completion without ``max_tokens`` stops after 16 tokens; same refusals: 400
with the offending field in ``param``).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ErrorCode, RequestError, invalid
from .tokenizer import TokenizerRunner

__all__ = ["COMPLETIONS_DEFAULT_MAX_TOKENS", "OpenAICall", "Prompt", "messages_payload", "parse_call",
           "prompt_payload"]

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vllm serve's) default for /v1/completions
MAX_PROMPTS = 1024  # prompts in one /v1/completions batch

# OpenAI field -> token-mode section, key
_SAMPLING = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k",
             "repetition_penalty", "min_p", "length_penalty", "n", "best_of", "use_beam_search")
_STOP = ("stop", "ignore_eos", "min_tokens")
_NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p",
            "length_penalty")
_INTS = ("n", "best_of", "top_k", "seed", "min_tokens", "max_tokens", "max_completion_tokens", "priority")
_BOOLS = ("stream", "echo", "ignore_eos", "use_beam_search", "skip_special_tokens", "logprobs_chat")


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None  # what the client sent, for echo


@dataclass
class OpenAICall:
    """One validated OpenAI request."""

    chat: bool
    body: dict[str, Any]
    request_id: str
    created: int
    model: str | None
    stream: bool
    n: int
    logprobs: int | None  # completions: ``logprobs``; chat: ``top_logprobs`` when ``logprobs`` is true
    echo: bool
    include_usage: bool
    continuous_usage: bool
    prompts: list[Prompt] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        """The metrics label of this entry."""
        return "chat_completions" if self.chat else "completions"


def _type_error(name: str, expected: str, value: Any) -> RequestError:
    return invalid(f"{name}: expected {expected}, got {type(value).__name__} {value!r}", param=name)


def _check_fields(body: Mapping[str, Any]) -> None:
    for name in _NUMBERS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            raise _type_error(name, "a finite number", value)
    for name in _INTS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise _type_error(name, "an integer", value)
    for name in ("stream", "echo", "ignore_eos", "use_beam_search", "skip_special_tokens"):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise _type_error(name, "a boolean", value)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _type_error("stop", "a string or a list of strings", stop)
    n = body.get("n")
    if n is not None and n < 1:
        raise invalid(f"n must be at least 1, got {n}.", param="n")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and value < 1:
            raise invalid(f"{name} must be at least 1, got {value}.", param=name)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise _type_error("stream_options", "an object", options)
    if options and not body.get("stream"):
        raise invalid("Stream options can only be defined when `stream=True`.", param="stream_options")


def parse_call(body: Any, *, chat: bool, request_id: str | None = None) -> OpenAICall:
    """Validate the fields every request has; prompts are tokenized later (:func:`tokenize`)."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    _check_fields(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    n = int(body.get("n") or 1)
    logprobs: int | None
    if chat:
        want = body.get("logprobs")
        if want is not None and not isinstance(want, bool):
            raise _type_error("logprobs", "a boolean", want)
        top = body.get("top_logprobs")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
            raise _type_error("top_logprobs", "an integer", top)
        if top is not None and not want:
            raise invalid("when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
        if top is not None and top < 0 and top != -1:
            raise invalid("`top_logprobs` must be a positive value or -1.", param="top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        lp = body.get("logprobs")
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int)):
            raise invalid("`logprobs` must be an integer.", param="logprobs")
        if lp is not None and lp < 0 and lp != -1:
            raise invalid("`logprobs` must be a positive value or -1.", param="logprobs")
        logprobs = lp
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage"))
    prefix = "chatcmpl" if chat else "cmpl"
    return OpenAICall(
        chat=chat,
        body=body,
        request_id=f"{prefix}-{request_id or uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        stream=bool(body.get("stream")),
        n=n,
        logprobs=logprobs,
        echo=bool(body.get("echo")) and not chat,
        include_usage=include_usage,
        continuous_usage=include_usage and bool(options.get("continuous_usage_stats")),
    )


def _chat_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of objects", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a role", param="messages")
        message = dict(m)
        content = message.get("content")
        if isinstance(content, list):  # content parts: the text ones
            texts = []
            for part in content:
                if not isinstance(part, Mapping):
                    raise invalid(f"messages[{i}].content parts must be objects", param="messages")
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                else:
                    raise RequestError(ErrorCode.INVALID_REQUEST, f"messages[{i}].content: parts of type "
                                       f"{part.get('type')!r} are not supported by this model", param="messages")
            message["content"] = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string or a list of parts", param="messages")
        out.append(message)
    return out


def _completion_prompts(body: Mapping[str, Any]) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if prompt is None or prompt == "" or prompt == []:
        raise invalid("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            items: list[str | list[int]] = list(prompt)
        elif all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                 for p in prompt):
            items = [list(p) for p in prompt]
        else:
            raise invalid("prompt must be a string, a list of strings, a list of token ids, or a list of "
                          "lists of token ids", param="prompt")
        if len(items) > MAX_PROMPTS:
            raise invalid(f"prompt list length {len(items)} exceeds the maximum allowed count of {MAX_PROMPTS}.",
                          param="prompt")
        return items
    raise invalid("prompt must be a string, a list of strings, a list of token ids, or a list of "
                  "lists of token ids", param="prompt")


async def tokenize(call: OpenAICall, tokenizer: TokenizerRunner, chat_kwargs: Mapping[str, Any] | None = None
                   ) -> list[Prompt]:
    """The call's prompts as token ids (in a worker thread when the tokenizer is heavy)."""
    if call.chat:
        messages = _chat_messages(call.body)
        try:
            ids = await tokenizer.chat(messages, **dict(chat_kwargs or {}))
        except RequestError:
            raise
        except Exception as exc:  # a template that refuses the conversation (roles out of order...)
            raise invalid(f"the chat template cannot render these messages: {exc}", param="messages") from None
        return [Prompt(ids)]
    prompts: list[Prompt] = []
    for item in _completion_prompts(call.body):
        if isinstance(item, str):
            prompts.append(Prompt(await tokenizer.encode(item), item))
        else:
            prompts.append(Prompt(item, None))
    return prompts


def prompt_payload(call: OpenAICall, prompt: Prompt, *, max_model_len: int) -> dict[str, Any]:
    """One prompt of a call as a token-mode request (what a worker's ``generate`` takes)."""
    body = call.body
    prompt_len = len(prompt.token_ids)
    if prompt_len > max_model_len:
        raise invalid(f"This model's maximum context length is {max_model_len} tokens. However, your request has "
                      f"{prompt_len} input tokens. Please reduce the length of the input messages.", param="messages"
                      if call.chat else "prompt")
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    if requested is None and not call.chat:
        requested = COMPLETIONS_DEFAULT_MAX_TOKENS
    room = max_model_len - prompt_len
    payload = _sections(call)
    payload["stop_conditions"]["max_tokens"] = max(1, min(requested, room) if requested is not None else room)
    return {"token_ids": prompt.token_ids, **payload}


def messages_payload(call: OpenAICall) -> dict[str, Any]:
    """A chat call for a backend that builds the prompt itself (a multimodal processor): the
    messages as they came, with the token-mode sections; ``max_tokens`` only when asked
    for (the backend knows the room the prompt leaves)."""
    payload = _sections(call)
    requested = call.body.get("max_completion_tokens", call.body.get("max_tokens"))
    if requested is not None:
        payload["stop_conditions"]["max_tokens"] = requested
    return {"messages": call.body.get("messages"), **payload}


def _sections(call: OpenAICall) -> dict[str, Any]:
    """A call's sampling, stop, output and routing sections, as a token-mode request has them."""
    body = call.body
    sampling = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
    stop = {k: body[k] for k in _STOP if body.get(k) is not None}
    output: dict[str, Any] = {}
    if call.logprobs is not None:
        output["logprobs"] = call.logprobs
    prompt_logprobs = body.get("prompt_logprobs")
    if call.echo and call.logprobs is not None:
        output["prompt_logprobs"] = max(call.logprobs, prompt_logprobs or 0)
    elif prompt_logprobs is not None:
        output["prompt_logprobs"] = prompt_logprobs
    if body.get("skip_special_tokens") is not None:
        output["skip_special_tokens"] = body["skip_special_tokens"]
    payload: dict[str, Any] = {"sampling_options": sampling, "stop_conditions": stop, "output_options": output}
    guided = guided_decoding(body)
    if guided:
        sampling["guided_decoding"] = guided
    priority = body.get("priority")
    if priority:
        payload["routing"] = {"priority": priority}
    return payload


_LEGACY_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


def guided_decoding(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the output must match, as the token-mode guided_decoding section: from
    ``response_format`` (json_object, json_schema), vLLM's ``structured_outputs``, or the
    older ``guided_*`` fields (which vllm serve 0.32 ignores; Dynamo honours them, so do we)."""
    guided: dict[str, Any] = {}
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, Mapping) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise invalid("response_format.type must be text, json_object or json_schema", param="response_format")
        if fmt["type"] == "json_object":
            guided["json_object"] = True
        elif fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, Mapping):
                raise invalid("When response_format type is 'json_schema', the 'json_schema' field must be "
                              "provided.", param="response_format")
            guided["json"] = spec.get("schema") or {}
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, Mapping):
            raise invalid("structured_outputs must be an object", param="structured_outputs")
        guided.update({k: v for k, v in structured.items() if v is not None})
    for legacy, key in _LEGACY_GUIDED.items():
        if body.get(legacy) is not None:
            guided[key] = body[legacy]
    if body.get("guided_whitespace_pattern") is not None:
        guided["whitespace_pattern"] = body["guided_whitespace_pattern"]
    return guided or None


def stop_words(body: Mapping[str, Any]) -> Sequence[str]:
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) else list(stop or [])
