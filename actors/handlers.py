"""Request handlers: what the endpoints do, whatever plane carries them.

A handler is ``async def handler(payload, emit) -> None``: it validates the
payload, talks to the engine through its :class:`EngineRef`, and calls
``await emit(item)`` for each streamed item. Problems with one request raise
:class:`~actors.protocol.RequestError`; they never touch other requests.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from supervisor.errors import EngineDead

from .engine.actor import EngineRef
from .engine.base import EngineInfo, EngineRequest, RequestFailed, StepOutput
from .protocol import RequestError

__all__ = ["Emit", "Handler", "Handlers", "Inflight", "RequestControl", "build_sampling", "step_item"]

Emit = Callable[[Any], Awaitable[None]]
Handler = Callable[[Any, Emit, str], Awaitable[None]]

_log = structlog.get_logger("actors.handlers")

# sampling_options keys -> (SamplingParams field, expected type)
_SAMPLING_FIELDS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "n": ("n", int),
    "presence_penalty": ("presence_penalty", (int, float)),
    "frequency_penalty": ("frequency_penalty", (int, float)),
    "repetition_penalty": ("repetition_penalty", (int, float)),
    "temperature": ("temperature", (int, float)),
    "top_p": ("top_p", (int, float)),
    "top_k": ("top_k", int),
    "min_p": ("min_p", (int, float)),
    "seed": ("seed", int),
}
_GUIDED_KEYS = ("json", "regex", "choice", "grammar")


def invalid(message: str) -> RequestError:
    return RequestError("invalid_request", message)


def _check(name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise invalid(f"{name} must be {names}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid(f"{name} must be finite, got {value!r}")
    return value


def _section(payload: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = payload.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise invalid(f"{key} must be an object, got {type(value).__name__}")
    return value


def token_ids_of(payload: Any) -> list[int]:
    if not isinstance(payload, Mapping):
        raise invalid(f"request payload must be an object, got {type(payload).__name__}")
    tokens = payload.get("token_ids")
    if not isinstance(tokens, list) or not tokens:
        raise invalid("token_ids must be a non-empty list of integers")
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise invalid(f"token_ids must hold non-negative integers, found {t!r}")
    return tokens


def build_sampling(payload: Mapping[str, Any], info: EngineInfo, *, prompt_len: int) -> dict[str, Any]:
    """Dynamo's request sections -> SamplingParams keyword arguments.

    Starts from the model's generation defaults; unknown keys are ignored; a
    value of the wrong type is an error naming the field.
    """
    kwargs: dict[str, Any] = {
        k: v for k, v in info.generation_defaults.items() if k != "max_new_tokens" and v is not None
    }
    sampling = _section(payload, "sampling_options")
    for key, (target, kind) in _SAMPLING_FIELDS.items():
        value = sampling.get(key)
        if value is not None:
            kwargs[target] = _check(f"sampling_options.{key}", value, kind)
    if sampling.get("use_beam_search"):
        raise invalid("sampling_options.use_beam_search: beam search is not available on the streaming engine")
    best_of = sampling.get("best_of")
    if best_of is not None and best_of != kwargs.get("n", 1):
        raise invalid("sampling_options.best_of: vLLM v1 supports best_of only equal to n")
    length_penalty = sampling.get("length_penalty")
    if length_penalty is not None:
        _check("sampling_options.length_penalty", length_penalty, (int, float))  # beam search only
    guided = sampling.get("guided_decoding")
    if guided is not None:
        if not isinstance(guided, Mapping):
            raise invalid("sampling_options.guided_decoding must be an object")
        chosen = {k: guided[k] for k in _GUIDED_KEYS if guided.get(k) is not None}
        if len(chosen) > 1:
            raise invalid(
                f"sampling_options.guided_decoding: give one of json, regex, choice, grammar, not {sorted(chosen)}"
            )
        if chosen:
            kwargs["structured_outputs"] = chosen

    stop = _section(payload, "stop_conditions")
    max_tokens = stop.get("max_tokens")
    if max_tokens is None:
        max_tokens = max(1, info.max_model_len - prompt_len)
    _check("stop_conditions.max_tokens", max_tokens, int)
    if max_tokens < 1:
        raise invalid(f"stop_conditions.max_tokens must be at least 1, got {max_tokens}")
    kwargs["max_tokens"] = max_tokens
    if stop.get("min_tokens") is not None:
        min_tokens = _check("stop_conditions.min_tokens", stop["min_tokens"], int)
        if min_tokens < 0:
            raise invalid(f"stop_conditions.min_tokens must be non-negative, got {min_tokens}")
        kwargs["min_tokens"] = min_tokens
    if stop.get("stop") is not None:
        words = stop["stop"]
        if isinstance(words, str):
            words = [words]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise invalid("stop_conditions.stop must be a string or a list of strings")
        kwargs["stop"] = words
    hidden = stop.get("stop_token_ids_hidden")
    if hidden is not None:
        if not isinstance(hidden, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in hidden):
            raise invalid("stop_conditions.stop_token_ids_hidden must be a list of integers")
        kwargs["stop_token_ids"] = hidden
    if stop.get("ignore_eos") is not None:
        if not isinstance(stop["ignore_eos"], bool):
            raise invalid("stop_conditions.ignore_eos must be a boolean")
        kwargs["ignore_eos"] = stop["ignore_eos"]

    output = _section(payload, "output_options")
    for key in ("logprobs", "prompt_logprobs"):
        value = output.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise invalid(f"output_options.{key} must be a non-negative integer, got {value!r}")
        kwargs[key] = value
    if output.get("skip_special_tokens") is not None:
        if not isinstance(output["skip_special_tokens"], bool):
            raise invalid("output_options.skip_special_tokens must be a boolean")
        kwargs["skip_special_tokens"] = output["skip_special_tokens"]
    return kwargs


def step_item(out: StepOutput) -> dict[str, Any]:
    """One streamed response item, in Dynamo's LLMEngineOutput shape."""
    item: dict[str, Any] = {"token_ids": out.token_ids}
    if out.log_probs is not None:
        item["log_probs"] = out.log_probs
    if out.top_logprobs is not None:
        item["top_logprobs"] = out.top_logprobs
    if out.finish_reason is not None:
        item["finish_reason"] = out.finish_reason
        item["completion_usage"] = {
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens},
        }
        if out.kv_transfer_params is not None:
            item["disaggregated_params"] = {"kv_transfer_params": out.kv_transfer_params}
    return item


@dataclass
class RequestControl:
    """One running request's cancel scope, and why it was cancelled."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reason: str | None = None

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel(reason=reason)


@dataclass
class Inflight:
    """The in-flight request table. Owned above the endpoint server so it
    survives its restarts; the drain waits on it."""

    requests: dict[str, RequestControl] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)

    def add(self, request_id: str, control: RequestControl) -> None:
        self.requests[request_id] = control

    def remove(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_empty(self) -> None:
        while self.requests:
            await self.changed.wait()


class Handlers:
    """The endpoint table for one worker."""

    def __init__(self, engine: EngineRef, *, role: str = "agg") -> None:
        self.engine = engine
        self.role = role
        self.endpoints: dict[str, Handler] = {
            "generate": self.generate,
            "clear_kv_blocks": self.clear_kv_blocks,
        }

    async def info(self) -> EngineInfo:
        return await self.engine.wait_ready()

    async def generate(self, payload: Any, emit: Emit, request_id: str) -> None:
        info = await self.info()
        tokens = token_ids_of(payload)
        if len(tokens) >= info.max_model_len:
            raise invalid(
                f"prompt has {len(tokens)} tokens; the context length is {info.max_model_len}"
            )
        sampling = build_sampling(payload, info, prompt_len=len(tokens))
        extra: dict[str, Any] = {}
        if self.role == "prefill":
            sampling["max_tokens"] = 1
            sampling.pop("min_tokens", None)
            extra["kv_transfer_params"] = {"do_remote_decode": True}
        else:
            prefill = payload.get("prefill_result")
            if isinstance(prefill, Mapping):
                params = (prefill.get("disaggregated_params") or {}).get("kv_transfer_params")
                if params is not None:
                    extra["kv_transfer_params"] = params
        if extra:
            sampling["extra_args"] = extra
        routing = _section(payload, "routing")
        annotations = payload.get("annotations") or []
        if not isinstance(annotations, list):
            raise invalid("annotations must be a list of strings")
        request = EngineRequest(
            request_id=request_id,
            token_ids=tokens,
            max_tokens=sampling["max_tokens"],
            sampling=sampling,
            annotations=[str(a) for a in annotations],
            priority=int(routing.get("priority") or 0),
            dp_rank=routing.get("dp_rank"),
        )
        try:
            async with self.engine.generate(request) as stream:
                async for out in stream:
                    await emit(step_item(out))
        except EngineDead as exc:
            raise RequestError("engine_dead", str(exc), migratable=True) from None
        except RequestFailed as exc:
            raise RequestError("invalid_request", str(exc)) from None

    async def clear_kv_blocks(self, payload: Any, emit: Emit, request_id: str) -> None:
        try:
            await self.engine.reset_prefix_cache()
        except EngineDead as exc:
            raise RequestError("engine_dead", str(exc), migratable=True) from None
        except RequestFailed as exc:
            raise RequestError("internal", str(exc)) from None
        await emit({"status": "success", "message": "KV cache cleared"})
