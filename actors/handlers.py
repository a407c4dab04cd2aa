"""Request handlers: what the endpoints do, whatever carries them.

A handler is ``async def handler(payload, emit, request_id) -> None``: it
validates the payload, talks to the engine through its :class:`EngineRef`, and
calls ``await emit(item)`` for each streamed item. ``request_id`` is the
request's unique id in the engine (see :class:`actors.pipeline.Inflight`).
Problems with one request raise :class:`~actors.errors.RequestError` (or let an
engine error through); the pipeline that runs the handler turns them into the
request's error and nothing else is touched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
import trio

from .engine.actor import EngineRef
from .engine.base import EngineInfo, EngineRequest, LoraAdapter, MultiModalInput, StepOutput
from .errors import EngineDead, ErrorCode, RequestError, RequestFailed, invalid
from .model_card import ModelCard, card_items
from .multimodal.inputs import MediaAccept
from .multimodal.prompt import MultimodalPrompts
from .pipeline import AbortReason, RequestPipeline

__all__ = ["Emit", "Handler", "Handlers", "build_sampling", "step_item", "token_ids_of"]

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
_GUIDED_KEYS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# how the constraint is applied (vLLM's StructuredOutputsParams options), alongside one of the above
_GUIDED_OPTIONS = {"disable_any_whitespace": bool, "disable_additional_properties": bool, "whitespace_pattern": str}


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
        chosen = {k: guided[k] for k in _GUIDED_KEYS if guided.get(k) not in (None, False)}
        if len(chosen) > 1:
            raise invalid(f"sampling_options.guided_decoding: give one of {', '.join(_GUIDED_KEYS)}, "
                          f"not {sorted(chosen)}")
        if "choice" in chosen and (not isinstance(chosen["choice"], list) or not chosen["choice"]
                                   or not all(isinstance(c, str) for c in chosen["choice"])):
            raise invalid("sampling_options.guided_decoding.choice must be a non-empty list of strings")
        for key in ("regex", "grammar", "structural_tag"):  # structural_tag: xgrammar's, as JSON text
            if key in chosen and not isinstance(chosen[key], str):
                raise invalid(f"sampling_options.guided_decoding.{key} must be a string")
        if "json" in chosen and not isinstance(chosen["json"], dict | str):
            raise invalid("sampling_options.guided_decoding.json must be a JSON schema (an object, or its text)")
        if chosen:
            for key, kind in _GUIDED_OPTIONS.items():
                value = guided.get(key)
                if value is None:
                    continue
                if not isinstance(value, kind):
                    raise invalid(f"sampling_options.guided_decoding.{key} must be a {kind.__name__}, "
                                  f"got {value!r}")
                chosen[key] = value
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
    """One streamed response item, in Dynamo's LLMEngineOutput shape, plus ``index``:
    which of the request's ``n`` samples the tokens belong to. A sample's last item
    has its ``finish_reason``; the request's last item also has ``completion_usage``."""
    item: dict[str, Any] = {"token_ids": out.token_ids, "index": out.index}
    if out.log_probs is not None:
        item["log_probs"] = out.log_probs
    if out.top_logprobs is not None:
        item["top_logprobs"] = out.top_logprobs
    if out.prompt_logprobs is not None:
        item["prompt_logprobs"] = out.prompt_logprobs
    if out.finish_reason is not None:
        item["finish_reason"] = out.finish_reason
        if out.stop_reason is not None:
            item["stop_reason"] = out.stop_reason
    if out.final:
        item["completion_usage"] = {
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens},
        }
        if out.kv_transfer_params is not None:
            item["disaggregated_params"] = {"kv_transfer_params": out.kv_transfer_params}
    return item


class LoraRegistry:
    """Loaded LoRA adapters. One lock per adapter name; ids are never reused."""

    def __init__(self) -> None:
        self.adapters: dict[str, LoraAdapter] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._next_id = 1

    def lock(self, name: str) -> trio.Lock:
        return self._locks.setdefault(name, trio.Lock())

    def new_id(self) -> int:
        lora_id, self._next_id = self._next_id, self._next_id + 1
        return lora_id

    def names(self) -> list[str]:
        return sorted(self.adapters)


def _lora_path(source: Any) -> str:
    if not isinstance(source, Mapping) or not isinstance(source.get("uri"), str):
        raise invalid("source must be an object with a uri (file:///path/to/adapter)")
    uri: str = source["uri"]
    if uri.startswith("file://"):
        path = uri.removeprefix("file://")
    elif "://" in uri:
        raise invalid(f"source.uri {uri!r}: only file:// adapters can be loaded here")
    else:
        path = uri
    if not os.path.isdir(path):
        raise invalid(f"source.uri {uri!r}: no adapter directory at {path}")
    return path


class Handlers:
    """The endpoint table for one worker, and the engine control it offers
    (sleep, wake-up, LoRA) on the request plane and the system port."""

    def __init__(self, engine: EngineRef, pipeline: RequestPipeline, *, role: str = "agg",
                 enable_lora: bool = False) -> None:
        self.engine = engine
        self.pipeline = pipeline
        self.role = role
        self.loras = LoraRegistry()
        self.asleep = False
        self._sleep_lock = trio.Lock()
        self.endpoints: dict[str, Handler] = {
            "generate": self.generate,
            "clear_kv_blocks": self.clear_kv_blocks,
            "sleep": self.sleep,
            "wake_up": self.wake_up,
            "model_card": self.model_card,
        }
        # --use-vllm-tokenizer: OpenAI-style text requests on the request plane (actors.text_mode)
        self.text_mode: Any = None
        # multimodal roles (set by roles): what images this worker takes (actors.multimodal.inputs);
        # a processor builds prompts from chat messages (.prompt) and its engine forwards requests
        self.media: MediaAccept | None = None
        self.prompts: MultimodalPrompts | None = None
        self.forwards = False
        # the model card and its tokenizer files (set by roles, which knows the model's directory)
        self.card_source: Callable[[EngineInfo], tuple[ModelCard, dict[str, Path]]] | None = None
        if enable_lora:
            self.endpoints.update(
                {"load_lora": self.load_lora, "unload_lora": self.unload_lora, "list_loras": self.list_loras}
            )
        # set by the endpoint server: deregister/register around sleep
        self.on_sleep: Callable[[], Awaitable[None]] | None = None
        self.on_wake: Callable[[], Awaitable[None]] | None = None
        self.on_lora_change: Callable[[], Awaitable[None]] | None = None
        pipeline.gates.append(self._gate)

    def _gate(self, endpoint: str, generates: bool) -> RequestError | None:
        if generates and self.asleep:
            return RequestError(ErrorCode.UNAVAILABLE, "the engine is asleep (POST /engine/wake_up wakes it); "
                                "retry on another instance")
        return None

    def lookup(self, endpoint: str) -> Handler:
        handler = self.endpoints.get(endpoint)
        if handler is None:
            known = ", ".join(sorted(self.endpoints))
            raise RequestError(ErrorCode.NOT_FOUND, f"unknown endpoint {endpoint!r}; this worker serves: {known}")
        return handler

    @staticmethod
    def generates(endpoint: str) -> bool:
        """Whether an endpoint runs an engine request (refused while asleep, aborted by sleep)."""
        return endpoint == "generate"

    async def info(self) -> EngineInfo:
        return await self.engine.wait_ready()

    async def generate(self, payload: Any, emit: Emit, request_id: str) -> None:
        if self.text_mode is not None and self.text_mode.wants(payload):
            await self.text_mode.generate(payload, emit, request_id)
            return
        request = await self.prepare(payload, request_id)
        async with self.engine.generate(request) as stream:
            async for out in stream:
                await emit(step_item(out))

    async def prepare(self, payload: Any, request_id: str) -> EngineRequest:
        """Validate a token-mode request and turn it into an engine request."""
        info = await self.info()
        if self.prompts is not None and isinstance(payload, Mapping) and "messages" in payload \
                and "token_ids" not in payload:
            payload = await self.prompts.preprocess(payload, info.max_model_len)
        tokens = token_ids_of(payload)
        if len(tokens) >= info.max_model_len:
            raise invalid(
                f"prompt has {len(tokens)} tokens; the context length is {info.max_model_len}"
            )
        multi_modal: MultiModalInput | None = None
        if payload.get("multi_modal") is not None:
            if self.media is None:
                raise invalid(f"multi_modal: this worker takes no images ({info.model} as --role {self.role}; "
                              "images go to a multimodal processor)", param="multi_modal")
            if not self.forwards:
                multi_modal = await self.media.parse(payload["multi_modal"], tokens)
        sampling = build_sampling(payload, info, prompt_len=len(tokens))
        extra: dict[str, Any] = {}
        if self.role == "encode":  # vLLM's own encoder (ECConnector producer): the prompt's images only
            sampling["max_tokens"] = 1
            sampling.pop("min_tokens", None)
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
        lora: LoraAdapter | None = None
        model = payload.get("model")
        if model is not None and model != info.model:
            lora = self.loras.adapters.get(model) if isinstance(model, str) else None
            if lora is None:
                raise RequestError(
                    ErrorCode.NOT_FOUND,
                    f"unknown model or LoRA adapter {model!r}; this worker serves {info.model!r} "
                    f"and adapters {self.loras.names()}",
                )
        routing = _section(payload, "routing")
        annotations = payload.get("annotations") or []
        if not isinstance(annotations, list):
            raise invalid("annotations must be a list of strings")
        priority = routing.get("priority") or 0
        _check("routing.priority", priority, int)
        dp_rank = routing.get("dp_rank")
        if dp_rank is not None:
            _check("routing.dp_rank", dp_rank, int)
        return EngineRequest(
            request_id=request_id,
            token_ids=tokens,
            max_tokens=sampling["max_tokens"],
            sampling=sampling,
            annotations=[str(a) for a in annotations],
            priority=priority,
            dp_rank=dp_rank,
            lora=lora,
            n=int(sampling.get("n", 1)),
            multi_modal=multi_modal,
            payload=dict(payload) if self.forwards else None,
        )

    async def model_card(self, payload: Any, emit: Emit, request_id: str) -> None:
        """The model card, then its tokenizer files in chunks (see :mod:`actors.model_card`)."""
        if self.card_source is None:
            raise RequestError(ErrorCode.NOT_FOUND, "this worker has no model card")
        info = await self.info()
        source = self.card_source
        items = await trio.to_thread.run_sync(lambda: list(card_items(*source(info))))
        for item in items:
            await emit(item)

    async def clear_kv_blocks(self, payload: Any, emit: Emit, request_id: str) -> None:
        await self.engine.reset_prefix_cache()
        await emit({"status": "success", "message": "KV cache cleared"})

    # -- engine control ------------------------------------------------------
    async def sleep(self, payload: Any, emit: Emit, request_id: str) -> None:
        level = payload.get("level", 1) if isinstance(payload, Mapping) else 1
        if isinstance(level, bool) or not isinstance(level, int) or level not in (1, 2):
            raise invalid(f"level must be 1 or 2, got {level!r}")
        async with self._sleep_lock:
            if self.asleep:
                await emit({"status": "ok", "message": "already asleep"})
                return
            if self.on_sleep is not None:
                await self.on_sleep()  # out of discovery first: no new work is routed here
            self.asleep = True  # from here the pipeline refuses generation (migratable)
            aborted = self.pipeline.inflight.cancel_all(AbortReason.ENGINE_ASLEEP, generating_only=True)
            try:
                await self.engine.sleep(level)
            except (EngineDead, RequestFailed) as exc:
                raise RequestError(ErrorCode.INTERNAL, f"sleep failed: {exc}") from None
            _log.info("engine.asleep", level=level, aborted_requests=aborted)
        await emit({"status": "ok", "message": f"engine asleep (level {level}); on CPU this pauses "
                                               "scheduling and drops the prefix cache, weights stay loaded"})

    async def wake_up(self, payload: Any, emit: Emit, request_id: str) -> None:
        tags = payload.get("tags") if isinstance(payload, Mapping) else None
        if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
            raise invalid("tags must be a list of strings")
        async with self._sleep_lock:
            if not self.asleep:
                await emit({"status": "ok", "message": "already awake"})
                return
            try:
                await self.engine.wake_up(tags)
            except (EngineDead, RequestFailed) as exc:
                raise RequestError(ErrorCode.INTERNAL, f"wake_up failed: {exc}") from None
            if self.on_wake is not None:
                try:
                    await self.on_wake()
                except Exception as exc:
                    # the engine is awake but unregistered: stay marked asleep so a retry re-registers
                    raise RequestError(ErrorCode.INTERNAL,
                                       f"re-register failed, still marked asleep: {exc}") from None
            self.asleep = False
            _log.info("engine.awake")
        await emit({"status": "ok", "message": "engine awake"})

    # -- LoRA ----------------------------------------------------------------
    async def load_lora(self, payload: Any, emit: Emit, request_id: str) -> None:
        if not isinstance(payload, Mapping) or not isinstance(payload.get("lora_name"), str):
            raise invalid("load_lora needs lora_name (string) and source {uri}")
        name: str = payload["lora_name"]
        path = _lora_path(payload.get("source"))
        async with self.loras.lock(name):
            existing = self.loras.adapters.get(name)
            if existing is not None:
                await emit({"status": "success", "message": f"LoRA {name!r} already loaded",
                            "lora_name": name, "lora_id": existing.lora_id})
                return
            info = await self.info()
            limit = max(0, info.max_loras - 1)  # the last slot stays empty (vLLM mixed-batch bug)
            if len(self.loras.adapters) >= limit:
                raise RequestError(ErrorCode.RESOURCE_EXHAUSTED,
                                   f"at most {limit} LoRA adapters can be loaded (max_loras {info.max_loras}, "
                                   f"one slot kept free); loaded: {self.loras.names()}")
            adapter = LoraAdapter(name, self.loras.new_id(), path)
            try:
                await self.engine.add_lora(adapter)
            except (EngineDead, RequestFailed) as exc:
                raise RequestError(ErrorCode.INVALID_REQUEST, f"loading LoRA {name!r} failed: {exc}") from None
            self.loras.adapters[name] = adapter
            if self.on_lora_change is not None:
                try:
                    await self.on_lora_change()
                except Exception as exc:  # announce failed: roll the engine back too
                    del self.loras.adapters[name]
                    with trio.CancelScope(shield=True):
                        await self.engine.remove_lora(adapter.lora_id)
                    raise RequestError(ErrorCode.INTERNAL, f"LoRA {name!r} loaded but registering it failed "
                                       f"({exc}); rolled back") from None
        await emit({"status": "success", "message": f"LoRA {name!r} loaded", "lora_name": name,
                    "lora_id": adapter.lora_id})

    async def unload_lora(self, payload: Any, emit: Emit, request_id: str) -> None:
        if not isinstance(payload, Mapping) or not isinstance(payload.get("lora_name"), str):
            raise invalid("unload_lora needs lora_name (string)")
        name: str = payload["lora_name"]
        async with self.loras.lock(name):
            adapter = self.loras.adapters.get(name)
            if adapter is None:
                raise RequestError(ErrorCode.NOT_FOUND,
                                   f"LoRA {name!r} is not loaded; loaded: {self.loras.names()}")
            try:
                await self.engine.remove_lora(adapter.lora_id)
            except (EngineDead, RequestFailed) as exc:
                raise RequestError(ErrorCode.INTERNAL, f"unloading LoRA {name!r} failed: {exc}") from None
            del self.loras.adapters[name]
        await emit({"status": "success", "message": f"LoRA {name!r} unloaded", "lora_name": name,
                    "lora_id": adapter.lora_id})

    async def list_loras(self, payload: Any, emit: Emit, request_id: str) -> None:
        loras = {a.name: a.lora_id for a in self.loras.adapters.values()}
        await emit({"status": "success", "loras": loras, "count": len(loras)})
