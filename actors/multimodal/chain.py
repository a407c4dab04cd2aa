"""The processor's engine: the multimodal workers behind it.

A processor's requests come prepared (:mod:`.prompt`: token ids with one image marker
per image, and the images' bytes). :class:`MultimodalChain` runs each one down a chain
of workers it finds in discovery, in the processor's namespace:

- embeddings (``--multimodal-processor``, when encode workers are registered): the
  images go to an encode worker (``encode``; another one is tried when a worker fails
  or goes away mid-request), and the request with their embeddings to a PD worker;
- images (``--multimodal-processor`` in front of encode+prefill workers): the images go
  with the request to the worker whose vLLM encodes them itself;
- encoder cache (``--ec-processor``): the images go to a vLLM-native encoder first
  (an ECConnector producer: it stores their encoder outputs, named by content), then
  with the request to a PD worker that loads them (``--ec-consumer-mode``).

The last step is routed as the frontend routes (:class:`~actors.frontend.models.RoutedStream`):
prefill on a prefill-role PD worker and decode on a decode worker when both are
registered, migration to another worker when one dies mid-stream. Embeddings sent
through shared memory are removed when the request ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from supervisor.client import CallError, open_call

from ..engine.base import EngineInfo, EngineRequest, NoEngineControl, StepOutput, Stream
from ..errors import EngineDead, ErrorCode, RequestError, RequestFailed, as_request_error
from ..frontend.instances import Instance, Instances
from ..frontend.models import FrontendModels, RoutedStream
from .tensors import release

__all__ = ["ENCODER_ROLES", "GENERATOR_ROLES", "ChainOptions", "MultimodalChain"]

_log = structlog.get_logger("actors.multimodal.chain")

# multimodal roles (``runtime_config["multimodal_role"]``) a processor sends work to
ENCODER_ROLES = ("encode_worker", "native_encoder")
GENERATOR_ROLES = ("pd_worker", "decode_worker", "encode_prefill_worker")
ENCODE_ATTEMPTS = 3
ENCODE_TIMEOUT = 60.0


@dataclass(frozen=True)
class ChainOptions:
    served_name: str
    max_model_len: int
    vocab_size: int = 0
    eos_token_ids: tuple[int, ...] = ()
    transfer_mode: str = "inline"
    encoder_cache: bool = False  # --ec-processor: vLLM's native encoder and an ECConnector
    nats_servers: Sequence[str] = ()


def multimodal_role(instance: Instance) -> str | None:
    role = instance.runtime.get("multimodal_role")
    return str(role) if role else None


class MultimodalChain(NoEngineControl):
    """A processor's engine (see the module's doc)."""

    name = "multimodal-chain"
    kind = "a processor"

    def __init__(self, models: FrontendModels, encoders: Instances, options: ChainOptions) -> None:
        self.models = models
        self.encoders = encoders
        self.options = options
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, trio.CancelScope] = {}
        self._next_encoder = 0

    @property
    def generators(self) -> Instances:
        return self.models.instances

    async def run(self, *, task_status: trio.TaskStatus[EngineInfo] = trio.TASK_STATUS_IGNORED) -> None:
        o = self.options
        info = EngineInfo(model=o.served_name, total_kv_blocks=0, block_size=0, max_model_len=o.max_model_len,
                          max_num_seqs=0, max_num_batched_tokens=0, load_time_s=0.0, backend=self.name,
                          eos_token_ids=o.eos_token_ids, vocab_size=o.vocab_size)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(info)
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for scope in self._scopes.values():
                    scope.cancel()

    async def submit(self, request: EngineRequest) -> Stream:
        if self._nursery is None:
            raise EngineDead("the processor's chain is not running")
        if request.payload is None:
            raise RequestFailed("the processor's chain forwards requests as they came (no payload given)")
        send, recv = trio.open_memory_channel[StepOutput | BaseException](math.inf)
        scope = trio.CancelScope()
        self._scopes[request.request_id] = scope
        self._nursery.start_soon(self._serve, request.request_id, request.payload, send, scope)
        return recv

    async def _serve(self, request_id: str, payload: dict[str, Any], send: trio.MemorySendChannel[Any],
                     scope: trio.CancelScope) -> None:
        wire: Any = None
        started = time.monotonic()
        try:
            with scope:
                try:
                    payload, wire = await self._prepare(request_id, payload)
                    stream = RoutedStream(self.models, payload, request_id)
                    try:
                        async for out in stream:
                            send.send_nowait(out)
                    finally:
                        with trio.CancelScope(shield=True):
                            await stream.aclose()
                except Exception as exc:
                    send.send_nowait(as_request_error(exc))
        finally:
            self._scopes.pop(request_id, None)
            send.close()
            if wire is not None:
                release(wire)
            _log.debug("chain.done", engine_id=request_id, took_s=round(time.monotonic() - started, 3))

    async def _prepare(self, request_id: str, payload: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The request as the generating worker takes it, and the embeddings' transfer form
        (to release at the end), if any."""
        if not self.generators.by_id:
            raise RequestError(ErrorCode.UNAVAILABLE, "no worker to generate with (--multimodal-worker or "
                               "--multimodal-encode-prefill-worker) is registered yet", migratable=True,
                               retry_after=1.0)
        section = payload.get("multi_modal")
        if not isinstance(section, Mapping) or "images" not in section:
            return payload, None  # text only, or embeddings already: straight to a PD worker
        images = section["images"]
        if self.options.encoder_cache:
            await self._call_encoder(request_id, "generate", {**payload, "stop_conditions": {"max_tokens": 1}})
            return payload, None  # the PD worker loads their encoder outputs by content hash
        if any(multimodal_role(i) == "encode_prefill_worker" for i in self.generators.by_id.values()):
            return payload, None  # its vLLM encodes them
        item = await self._call_encoder(request_id, "encode", {"images": images,
                                                                "transfer": self.options.transfer_mode})
        wire = item.get("embeddings")
        out = {**payload, "multi_modal": {"embeddings": wire, "uuids": item.get("uuids")}}
        return out, wire

    def _encoder_kind(self) -> str:
        return "vLLM-native encoder (--vllm-native-encoder-worker)" if self.options.encoder_cache \
            else "encode worker (--multimodal-encode-worker)"

    def _pick_encoder(self, excluded: set[str]) -> Instance:
        candidates = [i for i in sorted(self.encoders.by_id.values(), key=lambda i: i.id) if i.id not in excluded]
        if not candidates:
            raise RequestError(ErrorCode.UNAVAILABLE, f"no {self._encoder_kind()} is available", migratable=True,
                               retry_after=1.0)
        self._next_encoder += 1
        return candidates[self._next_encoder % len(candidates)]

    async def _call_encoder(self, request_id: str, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One answer from an encoder; another encoder is tried when one fails or goes away."""
        excluded: set[str] = set()
        last: Exception | None = None
        for attempt in range(ENCODE_ATTEMPTS):
            try:
                instance = self._pick_encoder(excluded)
            except RequestError:
                if last is None:
                    raise
                break
            try:
                with trio.fail_after(ENCODE_TIMEOUT):
                    async with open_call(instance.record, endpoint, payload, nats_servers=self.options.nats_servers,
                                         request_id=f"{request_id}~encode{attempt}") as call:
                        items = await call.collect()
            except CallError as exc:
                if not exc.migratable:  # the request's own fault (a bad image): no other encoder helps
                    try:
                        code = ErrorCode(exc.code)
                    except ValueError:
                        code = ErrorCode.INTERNAL
                    raise RequestError(code, f"encoder {instance.id}: {exc.message}") from None
                last = exc
            except (OSError, trio.TooSlowError) as exc:
                last = exc
            else:
                if items:
                    return dict(items[-1])
                last = RuntimeError("no answer")
            excluded.add(instance.id)
            _log.warning("chain.encoder_failed", engine_id=request_id, encoder=instance.id, attempt=attempt,
                         error=f"{type(last).__name__}: {last}")
        raise RequestError(ErrorCode.UNAVAILABLE, f"no {self._encoder_kind()} could encode the images: "
                           f"{len(excluded)} tried, the last said {type(last).__name__}: {last}",
                           migratable=True, retry_after=1.0)

    async def abort(self, request_id: str) -> None:
        scope = self._scopes.pop(request_id, None)
        if scope is not None:
            scope.cancel()

    async def check_health(self) -> None:
        if self._nursery is None:
            raise EngineDead("the processor's chain is not running")

    async def encode(self, images: list[Any]) -> Any:
        raise RequestFailed("a processor does not encode images (its encode workers do)")
