"""Which worker gets a request.

Modes (``--router-mode``):

- ``round-robin``: each model's workers in turn;
- ``random``;
- ``power-of-two``: two workers at random, the one with fewer requests in flight;
- ``kv``: Dynamo's cost, per worker (and data-parallel rank)::

      cost = overlap_weight * prefill_blocks + active_decode_blocks

  where ``prefill_blocks`` are the blocks the worker would still have to prefill: the
  prompt's blocks it does not hold yet (from the KV index: the workers' KV events, or
  predictions from our own decisions with ``--no-kv-events``) plus the prompt tokens
  already routed to it and not yet prefilled; ``active_decode_blocks`` are the blocks of
  the requests it runs (our own bookkeeping). The cheapest wins; with ``--router-temperature`` > 0 a softmax
  over ``-cost / temperature`` picks, so load spreads; ties are broken at random.

Busy workers (``--active-decode-blocks-threshold``, a fraction of the worker's KV
blocks; ``--active-prefill-tokens-threshold``, prompt tokens not yet prefilled) are
skipped; when all are busy the request is refused with 503 and a Retry-After.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ErrorCode, RequestError
from .instances import Instance
from .kv_index import KvIndex, WorkerKey, local_hashes

__all__ = ["ROUTER_MODES", "Decision", "Router", "RouterConfig"]

ROUTER_MODES = ("round-robin", "random", "power-of-two", "kv")
BUSY_RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class RouterConfig:
    mode: str = "round-robin"
    overlap_weight: float = 1.0
    temperature: float = 0.0
    use_kv_events: bool = True
    decode_blocks_threshold: float | None = None  # fraction of a worker's KV blocks
    prefill_tokens_threshold: int | None = None


@dataclass
class Decision:
    """Where a request went, and what it holds there until it ends."""

    instance: Instance
    dp_rank: int
    prompt_tokens: int
    blocks: int  # the KV blocks counted against the worker
    overlap_blocks: int = 0
    prompt_blocks: int = 0
    seconds: float = 0.0  # how long deciding took
    prefilled: bool = False
    released: bool = False


@dataclass
class RouterStats:
    decisions: int = 0
    overlap_blocks: int = 0
    prompt_blocks: int = 0
    overhead_s: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.overlap_blocks / self.prompt_blocks if self.prompt_blocks else 0.0


class Router:
    def __init__(self, config: RouterConfig, index: KvIndex | None = None, *, seed: int | None = None) -> None:
        if config.mode not in ROUTER_MODES:
            raise ValueError(f"router mode {config.mode!r}: expected one of {', '.join(ROUTER_MODES)}")
        self.config = config
        self.index = index if index is not None else KvIndex()
        self.rng = random.Random(seed)
        self._turn: dict[str, int] = {}
        self.stats = RouterStats()

    # -- choosing ----------------------------------------------------------------------
    def pick(self, model: str, candidates: Sequence[Instance], token_ids: Sequence[int],
             exclude: frozenset[str] = frozenset()) -> Decision:
        started = time.perf_counter()
        workers = [c for c in candidates if c.id not in exclude]
        if not workers:
            raise RequestError(ErrorCode.UNAVAILABLE,
                               f"no worker serves model {model!r}" + (" (any more: every one failed this request)"
                                                                      if candidates else ""))
        free = [w for w in workers if not self._busy(w)]
        if not free:
            raise RequestError(ErrorCode.UNAVAILABLE, f"all {len(workers)} workers of {model!r} are busy; retry "
                               "shortly", retry_after=BUSY_RETRY_AFTER_S)
        block_size = free[0].block_size
        hashes = local_hashes(token_ids, block_size) if self.config.mode == "kv" else []
        instance, rank, overlap = self._choose(model, free, hashes)
        blocks = math.ceil(len(token_ids) / max(1, instance.block_size))
        decision = Decision(instance, rank, len(token_ids), blocks, overlap, len(hashes))
        instance.active_requests += 1
        instance.active_blocks += blocks
        instance.prefill_tokens += len(token_ids) - overlap * block_size
        if self.config.mode == "kv" and not self.config.use_kv_events:
            self.index.predict((instance.id, rank), hashes, instance.total_blocks)
        decision.seconds = time.perf_counter() - started
        self.stats.decisions += 1
        self.stats.overlap_blocks += overlap
        self.stats.prompt_blocks += len(hashes)
        self.stats.overhead_s.append(decision.seconds)
        if len(self.stats.overhead_s) > 10_000:
            del self.stats.overhead_s[:5_000]
        return decision

    def _busy(self, w: Instance) -> bool:
        c = self.config
        if c.decode_blocks_threshold is not None and w.total_blocks and \
                w.active_blocks / w.total_blocks > c.decode_blocks_threshold:
            return True
        return c.prefill_tokens_threshold is not None and w.prefill_tokens > c.prefill_tokens_threshold

    def _choose(self, model: str, workers: list[Instance], hashes: list[int]) -> tuple[Instance, int, int]:
        mode = self.config.mode
        if mode == "round-robin":
            turn = self._turn.get(model, 0)
            self._turn[model] = turn + 1
            return workers[turn % len(workers)], 0, 0
        if mode == "random":
            return self.rng.choice(workers), 0, 0
        if mode == "power-of-two":
            pair = self.rng.sample(workers, 2) if len(workers) > 1 else workers
            least = min(w.active_requests for w in pair)
            return self.rng.choice([w for w in pair if w.active_requests == least]), 0, 0
        # kv: every worker and data-parallel rank is a candidate
        costs: list[tuple[float, Instance, int, int]] = []
        for w in workers:
            for rank in range(w.dp_size):
                key: WorkerKey = (w.id, rank)
                overlap = self.index.overlap(key, hashes)
                prefill_blocks = len(hashes) - overlap + w.prefill_tokens / max(1, w.block_size)
                cost = self.config.overlap_weight * prefill_blocks + w.active_blocks
                costs.append((cost, w, rank, overlap))
        if self.config.temperature > 0:
            lowest = min(c[0] for c in costs)
            weights = [math.exp(-(c[0] - lowest) / self.config.temperature) for c in costs]
            _, w, rank, overlap = self.rng.choices(costs, weights=weights)[0]
            return w, rank, overlap
        best = min(c[0] for c in costs)
        _, w, rank, overlap = self.rng.choice([c for c in costs if c[0] == best])
        return w, rank, overlap

    # -- bookkeeping -------------------------------------------------------------------
    def first_token(self, decision: Decision) -> None:
        if not decision.prefilled:
            decision.prefilled = True
            w = decision.instance
            w.prefill_tokens = max(0, w.prefill_tokens - (decision.prompt_tokens -
                                                          decision.overlap_blocks * w.block_size))

    def grew(self, decision: Decision, tokens_so_far: int) -> None:
        """The request now holds ``prompt + tokens_so_far`` tokens of KV."""
        w = decision.instance
        blocks = math.ceil((decision.prompt_tokens + tokens_so_far) / max(1, w.block_size))
        if blocks > decision.blocks and not decision.released:
            w.active_blocks += blocks - decision.blocks
            decision.blocks = blocks

    def release(self, decision: Decision) -> None:
        if decision.released:
            return
        self.first_token(decision)
        decision.released = True
        w = decision.instance
        w.active_requests -= 1
        w.active_blocks = max(0, w.active_blocks - decision.blocks)
