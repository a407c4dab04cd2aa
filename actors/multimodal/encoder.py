"""The encode worker (``--multimodal-encode-worker``): images -> embeddings.

Its engine is :class:`VisionEncoder`: the model's image processor, vision tower and
projector, run with transformers in a worker thread (one at a time), so the event loop
keeps serving while a batch encodes. Its endpoint is :class:`EncodeEndpoint`
(``encode``): a request's images, each decoded and named by the SHA-256 of its bytes,
are looked up in a bounded cache first; the misses are encoded in one batch. The answer
is one item, ``{"embeddings": <transfer form>, "cached": <hits>}``, in the transfer
mode the request asks for (:mod:`.tensors`).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import structlog
import trio
from prometheus_client import CollectorRegistry, Counter

from ..engine.actor import EngineRef
from ..engine.base import EngineInfo, EngineRequest, NoEngineControl, Stream
from ..errors import EngineDead, RequestFailed, invalid
from .inputs import MAX_IMAGES
from .media import open_image
from .tensors import TRANSFER_MODES, pack, release

__all__ = ["EmbeddingCache", "EncodeEndpoint", "VisionEncoder"]

_log = structlog.get_logger("actors.multimodal.encoder")
CACHE_BYTES = 256 * 1024 * 1024  # embeddings kept for images seen again


class VisionEncoder(NoEngineControl):
    """An engine that encodes images (see the module's doc); it does not generate."""

    name = "vision-encoder"
    kind = "an encode worker"

    def __init__(self, model_dir: str, served_name: str | None = None) -> None:
        self.model_dir = model_dir
        self.served_name = served_name or model_dir
        self._model: Any = None
        self._processor: Any = None
        self._limiter = trio.CapacityLimiter(1)
        self._options: dict[str, Any] = {}

    def _load(self) -> EngineInfo:
        import torch
        import transformers

        started = time.monotonic()
        config = transformers.AutoConfig.from_pretrained(self.model_dir)
        dtype = getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        auto_processor: Any = transformers.AutoImageProcessor  # transformers' annotations are partial
        self._processor = auto_processor.from_pretrained(self.model_dir)
        model: Any = transformers.AutoModelForImageTextToText.from_pretrained(self.model_dir, dtype=dtype)
        self._model = model.eval()
        self._options = {"vision_feature_layer": getattr(config, "vision_feature_layer", -2),
                         "vision_feature_select_strategy": getattr(config, "vision_feature_select_strategy",
                                                                   "default")}
        text = config.text_config
        return EngineInfo(model=self.served_name, total_kv_blocks=0, block_size=0,
                          max_model_len=int(getattr(text, "max_position_embeddings", 2048)), max_num_seqs=1,
                          max_num_batched_tokens=0, load_time_s=round(time.monotonic() - started, 3),
                          backend=self.name, vocab_size=int(getattr(text, "vocab_size", 0)))

    async def run(self, *, task_status: trio.TaskStatus[EngineInfo] = trio.TASK_STATUS_IGNORED) -> None:
        info = await trio.to_thread.run_sync(self._load)
        _log.info("engine.loaded", backend=self.name, load_time_s=info.load_time_s, model=self.model_dir)
        task_status.started(info)
        try:
            await trio.sleep_forever()
        finally:
            self._model = None

    def _encode(self, images: list[Any]) -> Any:
        import torch

        model = self._model
        if model is None:
            raise EngineDead("the vision encoder is not loaded")
        pixels = self._processor(images, return_tensors="pt")["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            features = model.get_image_features(pixel_values=pixels, **self._options)
        out = getattr(features, "pooler_output", features)
        if isinstance(out, list | tuple):
            out = torch.stack(list(out))
        return out.detach().contiguous()

    async def encode(self, images: list[Any]) -> Any:
        if self._model is None:
            raise EngineDead("the vision encoder is not loaded")
        return await trio.to_thread.run_sync(self._encode, images, limiter=self._limiter)

    async def submit(self, request: EngineRequest) -> Stream:
        raise RequestFailed("an encode worker does not generate: its endpoint is encode")

    async def abort(self, request_id: str) -> None:
        return None

    async def check_health(self) -> None:
        if self._model is None:
            raise EngineDead("the vision encoder is not loaded")


class EmbeddingCache:
    """Embeddings by image hash, least recently used out first, bounded in bytes."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: str, tensor: Any) -> None:
        size = int(tensor.numel() * tensor.element_size())
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = tensor
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= int(old.numel() * old.element_size())

    def __len__(self) -> int:
        return len(self._items)


class EncodeEndpoint:
    """The encode worker's ``encode`` endpoint (see the module's doc). Owned by the tree,
    above the actors: the cache outlives a restart of the engine."""

    def __init__(self, engine: EngineRef, registry: CollectorRegistry, *, transfer_mode: str = "inline",
                 cache: EmbeddingCache | None = None) -> None:
        self.engine = engine
        self.transfer_mode = transfer_mode
        self.cache = cache or EmbeddingCache()
        self.hits = Counter("dynamo_component_encoder_cache_hits", "Images whose embeddings came from the cache",
                            registry=registry)
        self.misses = Counter("dynamo_component_encoder_cache_misses", "Images the vision tower encoded",
                              registry=registry)

    async def encode(self, payload: Any, emit: Any, request_id: str) -> None:
        import torch

        if not isinstance(payload, Mapping):
            raise invalid("an encode request is an object {images: [{data}], transfer}")
        items = payload.get("images")
        if not isinstance(items, list) or not items:
            raise invalid("images must be a non-empty list of {data: <image bytes>}")
        if len(items) > MAX_IMAGES:
            raise invalid(f"{len(items)} images in one request (at most {MAX_IMAGES})")
        mode = payload.get("transfer") or self.transfer_mode
        if mode not in TRANSFER_MODES:
            raise invalid(f"transfer {mode!r}: expected one of {', '.join(TRANSFER_MODES)}")
        keys: list[str] = []
        rows: list[Any] = [None] * len(items)
        missing: dict[str, list[int]] = {}
        raw: dict[str, bytes] = {}
        for i, item in enumerate(items):
            data = item.get("data") if isinstance(item, Mapping) else None
            if not isinstance(data, bytes | bytearray):
                raise invalid(f"images[{i}].data must be the image's bytes")
            key = hashlib.sha256(data).hexdigest()
            keys.append(key)
            found = self.cache.get(key)
            if found is not None:
                rows[i] = found
            else:
                missing.setdefault(key, []).append(i)
                raw[key] = bytes(data)
        hits = len(items) - sum(len(v) for v in missing.values())
        if missing:
            order = list(missing)
            pictures = [await trio.to_thread.run_sync(open_image, raw[k], f"images[{missing[k][0]}]") for k in order]
            encoded = await self.engine.encode(pictures)
            for row, key in enumerate(order):
                tensor = encoded[row]
                self.cache.put(key, tensor)
                for i in missing[key]:
                    rows[i] = tensor
        self.hits.inc(hits)
        self.misses.inc(len(items) - hits)
        embeddings = torch.stack(rows)
        wire = await trio.to_thread.run_sync(pack, embeddings, mode)
        _log.info("encoder.encoded", images=len(items), cached=hits, shape=list(embeddings.shape), transfer=mode)
        try:
            await emit({"embeddings": wire, "uuids": keys, "cached": hits})
        except BaseException:  # not handed over (cancelled, client gone): nobody else will remove it
            release(wire)
            raise
