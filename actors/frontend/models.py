"""The frontend's :class:`~actors.openai.server.ModelBackend`: the OpenAI API over the
workers discovery knows, with routing, prefill -> decode, and migration.

A request's prompt goes to the worker the router picks, in token mode. When prefill
workers serve the model, the prompt is prefilled on one of them first (its KV transfer
parameters come back with its single token) and decoded on a decode worker with
``prefill_result``; with none, the request is served aggregated (unless
``--enforce-disagg``).

Migration (``--migration-limit``): when a worker dies, drops the connection, goes silent
or ends the stream with a migratable error (shutdown, drain, engine death, a broken
stream), the prompt plus every token already streamed goes to another worker (never one
that failed this request), ``max_tokens`` reduced by what was streamed, and the client's
stream goes on with no gap, no duplicate and no error. Not for guided decoding, not for
``n`` > 1 and never for a client's own cancel.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from supervisor.client import Call, CallError, HttpCall, NatsCall, open_call

from ..engine.base import StepOutput
from ..errors import ErrorCode, RequestError
from ..openai.parsing import ChatParsers
from ..openai.server import OutputStream, ServedModel
from .instances import Instance, Instances
from .metrics import FrontendMetrics
from .router import Decision, Router

__all__ = ["FrontendModels", "step_of"]

_log = structlog.get_logger("actors.frontend")


def step_of(item: dict[str, Any]) -> StepOutput:
    """A token-mode item -> an engine output (as the worker's engine gave it)."""
    out = StepOutput(token_ids=[int(t) for t in item.get("token_ids") or []], index=int(item.get("index") or 0),
                     log_probs=item.get("log_probs"), top_logprobs=item.get("top_logprobs"),
                     finish_reason=item.get("finish_reason"), stop_reason=item.get("stop_reason"),
                     prompt_logprobs=item.get("prompt_logprobs"))
    usage = item.get("completion_usage")
    if isinstance(usage, dict):
        out.final = True
        out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        out.completion_tokens = int(usage.get("completion_tokens") or 0)
        out.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        params = (item.get("disaggregated_params") or {}).get("kv_transfer_params")
        out.kv_transfer_params = params if isinstance(params, dict) else None
    return out


@dataclass(frozen=True)
class FrontendOptions:
    migration_limit: int = 3
    enforce_disagg: bool = False
    nats_servers: Sequence[str] = ()


class FrontendModels:
    def __init__(self, instances: Instances, router: Router, metrics: FrontendMetrics,
                 options: FrontendOptions) -> None:
        self.instances = instances
        self.router = router
        self.metrics = metrics
        self.options = options

    async def serving(self, model: str | None, endpoint: str = "completions") -> ServedModel:
        kind = "chat" if endpoint == "chat_completions" else "completions"
        names = sorted({i.model for i in self.instances.serving_any() if kind in i.endpoint_types})
        name = model
        adapter: str | None = None
        if model is None:
            if len(names) != 1:
                raise RequestError(ErrorCode.INVALID_REQUEST, f"name a model: served are {names}", param="model")
            name = names[0]
        elif model not in names:
            base = next((n for n in names if model in self.instances.adapters(n)), None)
            if base is None:
                raise RequestError(ErrorCode.NOT_FOUND, f"The model `{model}` does not exist.", param="model")
            name, adapter = base, model
        assert name is not None
        served = self.instances.models.get(name)
        if served is not None and not served.ready.is_set():
            with trio.move_on_after(30):
                await served.ready.wait()
            served = self.instances.models.get(name)
        if served is None or served.tokenizer is None:
            raise RequestError(ErrorCode.UNAVAILABLE, f"model {name!r}: its card is not loaded yet "
                               f"({served.fetch_error if served else 'no worker offered it'})")
        # a multimodal processor builds the prompt (and fetches the images) itself
        takes_messages = any(i.runtime.get("input") == "messages" for i in self.instances.serving(name))
        card = served.card
        return ServedModel(model or name, card.context_length, adapter=adapter, tokenizer=served.tokenizer,
                           takes_messages=takes_messages,
                           parsers=ChatParsers(card.tool_call_parser, card.reasoning_parser))

    async def models(self) -> list[dict[str, Any]]:
        now = int(time.time())
        data: list[dict[str, Any]] = []
        for name in sorted({i.model for i in self.instances.serving_any()}):
            model = self.instances.models.get(name)
            length = model.card.context_length if model else None
            data.append({"id": name, "object": "model", "created": now, "owned_by": "llm-supervisor", "root": name,
                         "parent": None, "max_model_len": length})
            data += [{"id": a, "object": "model", "created": now, "owned_by": "llm-supervisor", "root": a,
                      "parent": name, "max_model_len": length} for a in sorted(self.instances.adapters(name))]
        return data

    @asynccontextmanager
    async def generate(self, payload: dict[str, Any], engine_id: str) -> AsyncIterator[OutputStream]:
        trace = structlog.contextvars.get_contextvars().get("request_id")
        if isinstance(trace, str):  # the client's request id, for the workers' log lines too
            payload = {**payload, "request_id": trace}
        stream = RoutedStream(self, payload, engine_id)
        try:
            yield stream
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()


class RoutedStream:
    """One request's outputs, from whichever workers serve it (see the module's doc)."""

    def __init__(self, models: FrontendModels, payload: dict[str, Any], engine_id: str) -> None:
        self.models = models
        self.payload = payload
        self.engine_id = engine_id
        self.model = str(payload.get("model") or "")
        # a multimodal processor takes chat messages (it builds the prompt): no token ids here
        self.prompt: list[int] = list(payload.get("token_ids") or [])
        self.messages = "messages" in payload and "token_ids" not in payload
        self._carried = 0  # tokens the current attempt's prompt has beyond the client's (prefill, migration)
        sampling = payload.get("sampling_options") or {}
        stop = payload.get("stop_conditions") or {}
        self.max_tokens = int(stop.get("max_tokens") or 1)
        self.n = int(sampling.get("n") or 1)
        self.guided = bool(sampling.get("guided_decoding"))
        self.generated: list[int] = []  # sample 0's tokens so far (what a migration carries over)
        self.completion_tokens = 0
        self.excluded: set[str] = set()
        self.migrations = 0
        self._stack: AsyncExitStack | None = None
        self._call: Call | NatsCall | HttpCall | None = None
        self._decision: Decision | None = None
        self._pending: list[StepOutput] = []
        self._started = time.monotonic()
        self._last_token: float | None = None
        self._done = False

    def __aiter__(self) -> RoutedStream:
        return self

    def next_ready(self) -> StepOutput | None:
        return None

    # -- serving model name ------------------------------------------------------------
    def _model_name(self) -> str:
        if self.model:
            for name in {i.model for i in self.models.instances.serving_any()}:
                if self.model == name or self.model in self.models.instances.adapters(name):
                    return name
        names = sorted({i.model for i in self.models.instances.serving_any()})
        return names[0] if len(names) == 1 else self.model

    async def __anext__(self) -> StepOutput:
        if self._pending:
            return self._took(self._pending.pop(0))
        while True:
            if self._done:
                raise StopAsyncIteration
            if self._call is None:
                await self._open()
                if self._pending:
                    return self._took(self._pending.pop(0))
                if self._call is None:
                    continue  # that worker could not be reached: the next attempt
            try:
                item = await self._call.__anext__()
            except StopAsyncIteration:
                await self._close(failed=False)
                self._done = True
                raise
            except CallError as exc:
                await self._close(failed=True)
                self._migrate_or_raise(exc.code, exc.message, exc.migratable)
                continue
            except OSError as exc:  # the worker's connection broke under the call
                await self._close(failed=True)
                self._migrate_or_raise(ErrorCode.DISCONNECTED.value, f"request {self.engine_id}: {exc}", True)
                continue
            return self._took(self._fix(step_of(item)))

    def _took(self, out: StepOutput) -> StepOutput:
        now = time.monotonic()
        model = self._model_name()
        if out.token_ids:
            if self._last_token is None:
                self.models.metrics.ttft.labels(model).observe(now - self._started)
            else:
                self.models.metrics.itl.labels(model).observe(now - self._last_token)
            self._last_token = now
        if self._decision is not None and out.token_ids:
            self.models.router.first_token(self._decision)
        self.completion_tokens += len(out.token_ids)
        if out.index == 0:
            self.generated.extend(out.token_ids)
        if self._decision is not None:
            self.models.router.grew(self._decision, len(self.generated))
        if out.final:
            self.models.metrics.input_tokens.labels(model).observe(len(self.prompt))
            self.models.metrics.output_tokens.labels(model).observe(self.completion_tokens)
        return out

    def _fix(self, out: StepOutput) -> StepOutput:
        """Usage as the client sees it: its own prompt, and every token it got, whichever
        workers made them."""
        if out.final:
            # the worker counts what it was sent (images expanded to their tokens, say), less what
            # this stream added to the client's prompt
            out.prompt_tokens = max(len(self.prompt), out.prompt_tokens - self._carried)
            out.completion_tokens = self.completion_tokens + len(out.token_ids)
        return out

    def _migration_limit(self) -> int:
        """The model's workers' own ``--migration-limit`` when they set one, else the frontend's."""
        own = [int(i.runtime["migration_limit"]) for i in self.models.instances.serving(self._model_name())
               if i.runtime.get("migration_limit") is not None]
        return min(own) if own else self.models.options.migration_limit

    def _migrate_or_raise(self, code: str, message: str, migratable: bool) -> None:
        reason = code
        left = self.max_tokens - len(self.generated)
        if (migratable and self.migrations < self._migration_limit() and self.n == 1
                and not self.guided and not (self.messages and self.generated) and left > 0):
            self.migrations += 1
            self.models.metrics.migrations.labels(self._model_name(), reason).inc()
            _log.warning("request.migrating", engine_id=self.engine_id, reason=reason, error=message,
                         streamed=len(self.generated), migration=self.migrations,
                         excluded=sorted(self.excluded))
            return
        try:
            error_code = ErrorCode(code)
        except ValueError:
            error_code = ErrorCode.INTERNAL
        raise RequestError(error_code, message, migratable=migratable)

    # -- one attempt ----------------------------------------------------------------------
    def _attempt_payload(self) -> dict[str, Any]:
        payload = dict(self.payload)
        if not self.generated:
            return payload
        stop = dict(payload.get("stop_conditions") or {})
        stop["max_tokens"] = self.max_tokens - len(self.generated)
        if stop.get("min_tokens"):
            stop["min_tokens"] = max(0, int(stop["min_tokens"]) - len(self.generated))
        payload["stop_conditions"] = stop
        payload["token_ids"] = [*self.prompt, *self.generated]
        payload.pop("prefill_result", None)
        return payload

    async def _open(self) -> None:
        instances = self.models.instances
        name = self._model_name()
        payload = self._attempt_payload()
        prefill_workers = [i for i in instances.serving(name, roles=("prefill",)) if i.id not in self.excluded]
        attempt = self.migrations
        request_id = self.engine_id if attempt == 0 else f"{self.engine_id}~m{attempt}"
        if prefill_workers and not self.generated and self.n == 1 and not self.messages:
            prefilled = await self._prefill(name, payload, prefill_workers, request_id)
            if prefilled is not None:
                payload = prefilled
        elif self.models.options.enforce_disagg and not self.generated:
            raise RequestError(ErrorCode.UNAVAILABLE, f"no prefill worker serves {name!r} (--enforce-disagg)")
        if self._done:
            return
        decode_workers = instances.serving(name)
        self._carried = len(payload.get("token_ids") or []) - len(self.prompt)
        decision = self.models.router.pick(name, decode_workers, payload.get("token_ids") or [],
                                           frozenset(self.excluded))
        self._decision = decision
        self.models.metrics.router_seconds.observe(decision.seconds)
        if decision.instance.dp_size > 1:
            payload = {**payload, "routing": {**(payload.get("routing") or {}), "dp_rank": decision.dp_rank}}
        stack = AsyncExitStack()
        try:
            opened = open_call(decision.instance.record, "generate", payload,
                               nats_servers=self.models.options.nats_servers, request_id=request_id)
            call: Call | NatsCall | HttpCall = await stack.enter_async_context(opened)
        except (OSError, CallError) as exc:
            await stack.aclose()
            self.models.router.release(decision)
            self.excluded.add(decision.instance.id)
            self._decision = None
            self._migrate_or_raise(ErrorCode.DISCONNECTED.value, f"request {self.engine_id}: cannot reach worker "
                                   f"{decision.instance.id}: {exc}", True)
            return
        self._stack, self._call = stack, call
        _log.info("request.routed", engine_id=request_id, worker=decision.instance.id, dp_rank=decision.dp_rank,
                  overlap_blocks=decision.overlap_blocks, prompt_blocks=decision.prompt_blocks,
                  mode=self.models.router.config.mode)

    async def _prefill(self, name: str, payload: dict[str, Any], workers: list[Instance], request_id: str
                       ) -> dict[str, Any] | None:
        """Prefill on a prefill worker; the decode payload, or None to serve aggregated."""
        decision = self.models.router.pick(name, workers, payload["token_ids"])
        try:
            async with open_call(decision.instance.record, "generate", payload,
                                 nats_servers=self.models.options.nats_servers,
                                 request_id=f"{request_id}~prefill") as call:
                items = await call.collect()
        except (OSError, CallError) as exc:
            if self.models.options.enforce_disagg:
                raise RequestError(ErrorCode.UNAVAILABLE, f"prefill on {decision.instance.id} failed: {exc}") from None
            _log.warning("request.prefill_failed", engine_id=request_id, worker=decision.instance.id, error=str(exc))
            return None
        finally:
            self.models.router.release(decision)
        last = step_of(items[-1]) if items else None
        if last is None or not last.token_ids:
            return None
        first = last.token_ids[0]
        _log.info("request.prefilled", engine_id=request_id, worker=decision.instance.id)
        out = StepOutput(token_ids=[first], index=0)
        if self.max_tokens <= 1:
            out.finish_reason, out.final = "length", True
            out.prompt_tokens, out.completion_tokens, out.cached_tokens = len(self.prompt), 1, last.cached_tokens
            self._pending.append(out)
            self._done = True
            return None
        self._pending.append(out)  # the client's first token; the decode worker gets it with the prompt
        stop = dict(payload.get("stop_conditions") or {})
        stop["max_tokens"] = self.max_tokens - 1
        params = last.kv_transfer_params or {}
        return {**payload, "token_ids": [*self.prompt, first], "stop_conditions": stop,
                "prefill_result": {"disaggregated_params": {"kv_transfer_params": params}}}

    async def _close(self, failed: bool) -> None:
        stack, self._stack, self._call = self._stack, None, None
        decision, self._decision = self._decision, None
        if stack is not None:
            with trio.CancelScope(shield=True):
                await stack.aclose()
        if decision is not None:
            self.models.router.release(decision)
            if failed:
                self.excluded.add(decision.instance.id)

    async def aclose(self) -> None:
        await self._close(failed=False)
