"""Which worker has which prompt blocks cached: the KV router's index.

Workers' KV events (vLLM's, relayed by each worker on its event plane) name blocks by
vLLM's own block hashes. The frontend does not recompute vLLM's hash function: a
``stored`` event carries the blocks' tokens and their parent, so the index gives each
block a *local* hash, chained over the token blocks (``local(parent, tokens)``), and
keeps vLLM's hash -> local hash. A request's prompt is hashed the same local way, and a
worker's overlap is how many of the prompt's leading blocks it holds.

Without events (``--no-kv-events``) the index predicts instead: a worker a request was
sent to is assumed to hold that request's prompt blocks afterwards, up to its number of
KV blocks (least recently used go first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KvIndex", "WorkerKey", "local_hashes"]

WorkerKey = tuple[str, int]  # (instance id, data-parallel rank)
_ROOT = 0


def _chain(parent: int, block: Sequence[int]) -> int:
    return hash((parent, tuple(block)))


def local_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The full blocks of ``token_ids``, as chained local hashes."""
    out: list[int] = []
    parent = _ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = _chain(parent, token_ids[start:start + block_size])
        out.append(parent)
    return out


@dataclass
class _Held:
    blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)  # local hashes, LRU order
    last_event: int | None = None  # the last KV event id applied
    capacity: int = 0  # for predictions: the worker's KV blocks


class KvIndex:
    def __init__(self) -> None:
        self.local_of: dict[int, int] = {}  # vLLM block hash -> local hash (the same tokens on every worker)
        self.workers: dict[WorkerKey, _Held] = {}
        self.events_applied = 0
        self.gaps = 0

    # -- from KV events ------------------------------------------------------------------
    def apply(self, worker: WorkerKey, event_id: int, events: Iterable[dict[str, Any]]) -> bool:
        """Apply one batch of a worker's events; False when a gap before it was seen (the
        caller then resyncs the worker from its ``kv_index``). The batch is applied anyway."""
        held = self.workers.setdefault(worker, _Held())
        gap = held.last_event is not None and event_id != held.last_event + 1
        if gap:
            self.gaps += 1
        held.last_event = event_id
        for event in events:
            self._apply_one(held, event)
        self.events_applied += 1
        return not gap

    def _apply_one(self, held: _Held, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "stored":
            hashes = [int(h) for h in event.get("block_hashes") or []]
            tokens = list(event.get("token_ids") or [])
            size = int(event.get("block_size") or 0)
            parent_vllm = event.get("parent_hash")
            parent = _ROOT if parent_vllm is None else self.local_of.get(int(parent_vllm))
            if parent is None or size <= 0 or len(tokens) < size * len(hashes):
                return  # a chain we never saw the start of: nothing reliable to index
            for i, h in enumerate(hashes):
                parent = _chain(parent, tokens[i * size:(i + 1) * size])
                self.local_of[h] = parent
                held.blocks[parent] = None
                held.blocks.move_to_end(parent)
        elif kind == "removed":
            for h in event.get("block_hashes") or []:
                local = self.local_of.get(int(h))
                if local is not None:
                    held.blocks.pop(local, None)
        elif kind == "cleared":
            held.blocks.clear()

    def resync(self, worker: WorkerKey, vllm_hashes: Iterable[int], last_event: int | None) -> None:
        """Replace a worker's blocks by what it says it holds (its ``kv_index``)."""
        held = self.workers.setdefault(worker, _Held())
        held.blocks = OrderedDict((self.local_of[h], None) for h in vllm_hashes if h in self.local_of)
        held.last_event = last_event

    # -- predictions, without events -------------------------------------------------------
    def predict(self, worker: WorkerKey, hashes: Sequence[int], capacity: int) -> None:
        held = self.workers.setdefault(worker, _Held())
        held.capacity = capacity
        for h in hashes:
            held.blocks[h] = None
            held.blocks.move_to_end(h)
        while capacity and len(held.blocks) > capacity:
            held.blocks.popitem(last=False)

    # -- queries ---------------------------------------------------------------------------
    def overlap(self, worker: WorkerKey, hashes: Sequence[int]) -> int:
        held = self.workers.get(worker)
        if held is None:
            return 0
        n = 0
        for h in hashes:
            if h not in held.blocks:
                break
            n += 1
        return n

    def forget(self, instance_id: str) -> None:
        for key in [k for k in self.workers if k[0] == instance_id]:
            del self.workers[key]

    def size(self) -> int:
        return sum(len(h.blocks) for h in self.workers.values())
