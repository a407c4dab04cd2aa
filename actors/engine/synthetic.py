"""A deterministic stand-in engine: for benchmarks of the tree's own cost, for chaos tests,
and for routing and migration tests over many workers. Every behaviour it fakes is also
tested on real vLLM.

It batches like a real engine: every ``step_s`` one step advances every running request
by one token per sample. The next token of sample ``j`` is a function of the whole
history (prompt plus what the sample generated so far)::

    next = (sum(history) + len(history) + 7 * j) % vocab

so a request moved to another worker with its history continues with exactly the
tokens it would have had (a migration is checkable token by token).

It keeps a prefix cache like vLLM's: the prompt's full blocks (``block_size`` tokens),
hashed as a chain, live in an LRU of ``total_kv_blocks`` blocks. A request's first token
waits ``prefill_s_per_token`` for every prompt token not found in the cache, and its
usage reports the cached ones. With ``kv_events`` it publishes what it stores and evicts
in vLLM's own KV event format (:mod:`actors.engine.kv_publisher`).

It can be told to die (all streams fail, ``run`` raises :class:`EngineDead`), to hang
(steps and health checks stop answering), or to fail one request (the annotation
``synthetic:fail``).
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from ..errors import EngineDead, RequestFailed
from .base import EngineInfo, EngineRequest, LoraAdapter, MultiModalInput, StepOutput, Stream
from .kv_publisher import KvEventPublisher, all_cleared, block_stored, blocks_removed

__all__ = ["SyntheticEngine", "block_hashes", "next_token"]

_log = structlog.get_logger("actors.engine.synthetic")


def next_token(history_sum: int, history_len: int, sample: int, vocab: int) -> int:
    return (history_sum + history_len + 7 * sample) % vocab


def _image_salt(mm: MultiModalInput | None) -> int:
    """Images change the answer as a real model's would: the same images (by content, in any
    form) give the same tokens on any worker."""
    if mm is None:
        return 0
    digest = hashlib.sha256()
    if mm.uuids:  # the images' content hashes
        for uuid in mm.uuids:
            digest.update(uuid.encode())
    elif mm.embeddings is not None:
        import torch

        digest.update(mm.embeddings.detach().to(torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:4], "big")


def block_hashes(token_ids: list[int], block_size: int) -> list[tuple[int, list[int]]]:
    """The prompt's full blocks as (chained hash, tokens), the first block's parent being none."""
    out: list[tuple[int, list[int]]] = []
    parent = b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start:start + block_size]
        digest = hashlib.blake2b(parent + struct.pack(f"<{len(block)}q", *block), digest_size=8).digest()
        out.append((int.from_bytes(digest, "big") >> 1, block))  # non-negative, fits msgpack's int64
        parent = digest
    return out


@dataclass
class _Sample:
    history_sum: int
    history_len: int
    finished: bool = False


@dataclass
class _Running:
    request: EngineRequest
    send: trio.MemorySendChannel[StepOutput | BaseException]
    samples: list[_Sample]
    ready_at: float  # trio clock: when its prefill is done
    cached_tokens: int = 0
    produced: int = 0


@dataclass
class _PrefixCache:
    capacity: int
    blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def lookup(self, hashes: list[int]) -> int:
        """How many leading blocks are cached (and mark them used)."""
        hit = 0
        for h in hashes:
            if h not in self.blocks:
                break
            self.blocks.move_to_end(h)
            hit += 1
        return hit

    def store(self, hashes: list[int]) -> tuple[list[int], list[int]]:
        """Insert ``hashes``; returns (the newly stored, the evicted)."""
        new = [h for h in hashes if h not in self.blocks]
        for h in hashes:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        evicted = []
        while len(self.blocks) > self.capacity:
            h, _ = self.blocks.popitem(last=False)
            evicted.append(h)
        return new, evicted


class SyntheticEngine:
    name = "synthetic"

    def __init__(
        self,
        *,
        step_s: float = 0.01,
        vocab_size: int = 32000,
        max_model_len: int = 4096,
        block_size: int = 32,
        total_kv_blocks: int = 1024,
        max_num_seqs: int = 256,
        load_s: float = 0.0,
        die_after_s: float | None = None,
        hang_after_s: float | None = None,
        model: str = "synthetic",
        prefill_s_per_token: float = 0.0,
        kv_events: tuple[str, str | None] | None = None,
        dp_rank: int = 0,
    ) -> None:
        self.step_s = step_s
        self.vocab_size = vocab_size
        self.prefill_s_per_token = prefill_s_per_token
        self.info = EngineInfo(
            model=model,
            total_kv_blocks=total_kv_blocks,
            block_size=block_size,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(max_model_len, 2048),
            load_time_s=load_s,
            bos_token_id=1,
            eos_token_ids=(2,),
            vocab_size=vocab_size,
        )
        self._load_s = load_s
        self._die_after_s = die_after_s
        self._hang_after_s = hang_after_s
        self._kv_events = kv_events
        self._dp_rank = dp_rank
        self._publisher: KvEventPublisher | None = None
        self._pending_events: list[dict[str, Any]] = []
        self._cache = _PrefixCache(total_kv_blocks)
        self._running: dict[str, _Running] = {}
        self._wakeup = trio.Event()
        self._dead: EngineDead | None = None
        self._hung = False
        self._paused = False
        self._alive = False
        self.aborted: list[str] = []
        self.loras: dict[int, LoraAdapter] = {}
        self.steps = 0
        self.prefix_cache_resets = 0

    # -- chaos controls ----------------------------------------------------
    def die(self, reason: str = "synthetic engine told to die") -> None:
        self._dead = EngineDead(reason)
        self._wakeup.set()

    def hang(self) -> None:
        self._hung = True

    # -- backend protocol --------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[EngineInfo] = trio.TASK_STATUS_IGNORED) -> None:
        started = time.monotonic()
        if self._load_s:
            await trio.sleep(self._load_s)
        if self._kv_events is not None:
            self._publisher = KvEventPublisher(*self._kv_events, dp_rank=self._dp_rank)
        self._alive = True
        task_status.started(self.info)
        _log.info("engine.loaded", backend=self.name, load_time_s=round(time.monotonic() - started, 3))
        try:
            async with trio.open_nursery() as nursery:
                if self._die_after_s is not None:
                    nursery.start_soon(self._die_later, self._die_after_s)
                if self._hang_after_s is not None:
                    nursery.start_soon(self._hang_later, self._hang_after_s)
                if self._publisher is not None:
                    nursery.start_soon(self._publisher.serve_replay)
                await self._step_loop()
        finally:
            self._alive = False
            error: BaseException = self._dead or EngineDead("engine shut down")
            self._fail_all(error)
            if self._publisher is not None:
                self._publisher.close()

    async def _die_later(self, delay: float) -> None:
        await trio.sleep(delay)
        self.die(f"synthetic engine died after {delay}s (--synthetic-die-after)")

    async def _hang_later(self, delay: float) -> None:
        await trio.sleep(delay)
        _log.warning("engine.hanging", backend=self.name)
        self.hang()

    async def _step_loop(self) -> None:
        while True:
            if self._dead is not None:
                raise self._dead
            if self._hung:
                await trio.sleep_forever()
            await self._flush_events()
            if not self._running or self._paused:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            if self.step_s > 0:
                await trio.sleep(self.step_s)
            else:
                await trio.lowlevel.checkpoint()
            if self._dead is not None or self._hung:
                continue
            self._step()

    async def _flush_events(self) -> None:
        if self._publisher is not None and self._pending_events:
            events, self._pending_events = self._pending_events, []
            await self._publisher.publish(events)

    def _step(self) -> None:
        self.steps += 1
        now = trio.current_time()
        finished: list[str] = []
        for request_id, run in self._running.items():
            if run.ready_at > now:
                continue  # still prefilling
            req = run.request
            run.produced += 1
            done = run.produced >= req.max_tokens
            outs: list[StepOutput] = []
            for j, sample in enumerate(run.samples):
                token = next_token(sample.history_sum, sample.history_len, j, self.vocab_size)
                sample.history_sum += token
                sample.history_len += 1
                outs.append(StepOutput(token_ids=[token], index=j, finish_reason="length" if done else None))
            if done:
                last = outs[-1]
                last.final = True
                last.prompt_tokens = len(req.token_ids)
                last.completion_tokens = run.produced * len(run.samples)
                last.cached_tokens = run.cached_tokens
                finished.append(request_id)
            try:
                for out in outs:
                    run.send.send_nowait(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                finished.append(request_id)  # consumer went away without abort
            if done:
                run.send.close()
        for request_id in finished:
            self._running.pop(request_id, None)

    def _prefill(self, token_ids: list[int]) -> int:
        """Look the prompt up in the prefix cache and store its blocks; the cached tokens."""
        bs = self.info.block_size
        blocks = block_hashes(token_ids, bs)
        hashes = [h for h, _ in blocks]
        hit = self._cache.lookup(hashes)
        new, evicted = self._cache.store(hashes)
        if self._publisher is not None:
            if evicted:
                self._pending_events.append(blocks_removed(evicted))
            if new:
                first = hashes.index(new[0])
                parent = hashes[first - 1] if first > 0 else None
                tokens = [t for _, block in blocks[first:] for t in block]
                self._pending_events.append(block_stored(hashes[first:], parent, tokens, bs))
        return hit * bs

    async def submit(self, request: EngineRequest) -> Stream:
        send, recv = trio.open_memory_channel[StepOutput | BaseException](math.inf)
        if self._dead is not None or not self._alive:
            send.send_nowait(self._dead or EngineDead("engine is not running"))
            send.close()
            return recv
        if request.request_id in self._running:
            send.send_nowait(RequestFailed(f"request id {request.request_id!r} is already running"))
            send.close()
            return recv
        if "synthetic:fail" in request.annotations:
            send.send_nowait(RequestFailed("synthetic engine told to fail this request"))
            send.close()
            return recv
        if "synthetic:die" in request.annotations:
            self.die("synthetic engine told to die by a request")
        cached = self._prefill(request.token_ids)
        uncached = len(request.token_ids) - cached
        total = sum(request.token_ids) + _image_salt(request.multi_modal)
        samples = [_Sample(total, len(request.token_ids)) for _ in range(max(1, request.n))]
        ready_at = trio.current_time() + uncached * self.prefill_s_per_token
        self._running[request.request_id] = _Running(request, send, samples, ready_at, cached)
        self._wakeup.set()
        return recv

    async def abort(self, request_id: str) -> None:
        run = self._running.pop(request_id, None)
        if run is not None:
            self.aborted.append(request_id)
            run.send.close()

    async def check_health(self) -> None:
        if self._hung:
            await trio.sleep_forever()
        if self._dead is not None:
            raise self._dead
        if not self._alive:
            raise EngineDead("engine is not running")

    async def reset_prefix_cache(self) -> None:
        self.prefix_cache_resets += 1
        self._cache.blocks.clear()
        if self._publisher is not None:
            self._pending_events.append(all_cleared())
            self._wakeup.set()

    async def sleep(self, level: int) -> None:
        """Like vLLM on CPU: pause scheduling, drop the prefix cache."""
        self._paused = True
        await self.reset_prefix_cache()

    async def wake_up(self, tags: list[str] | None) -> None:
        self._paused = False
        self._wakeup.set()

    async def add_lora(self, adapter: LoraAdapter) -> None:
        self.loras[adapter.lora_id] = adapter

    async def encode(self, images: list[Any]) -> Any:
        raise RequestFailed("this worker does not encode images (an encode worker does: "
                            "--multimodal-encode-worker)")

    async def remove_lora(self, lora_id: int) -> None:
        self.loras.pop(lora_id, None)

    def _fail_all(self, error: BaseException) -> None:
        for run in self._running.values():
            try:
                run.send.send_nowait(error)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            run.send.close()
        self._running.clear()
