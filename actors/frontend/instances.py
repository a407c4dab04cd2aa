"""The workers a frontend serves over, as discovery knows them, and their models' cards.

:class:`Instances` is the frontend's view (owned above its actors, so a restart of the
watcher loses nothing); :class:`DiscoveryWatcher` is the actor that keeps it current:
it lists discovery every ``interval`` seconds, so a worker appears once it registered
and disappears once it deregistered or its lease lapsed. A model seen for the first
time has its card's tokenizer files fetched from one of its workers (``model_card``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from supervisor.client import open_call
from supervisor.planes.discovery import Discovery, InstanceRecord
from supervisor.tree import ActorContext, TaskStatus

from ..model_card import ModelCard, write_card_files
from ..openai.tokenizer import ByteTokenizer, HfTokenizer, Tokenizer

__all__ = ["DiscoveryWatcher", "Instance", "Instances", "Model"]

_log = structlog.get_logger("actors.frontend.instances")


@dataclass(eq=False)
class Instance:
    """One worker, and what the router keeps about it."""

    record: InstanceRecord
    active_requests: int = 0
    active_blocks: int = 0  # KV blocks its running requests (routed from here) hold, predicted
    prefill_tokens: int = 0  # prompt tokens routed to it that have no first token yet
    kv_used_blocks: int | None = None  # what it last reported (load metrics)

    @property
    def id(self) -> str:
        return self.record.instance_id

    @property
    def model(self) -> str:
        return self.record.model

    @property
    def runtime(self) -> dict[str, Any]:
        return self.record.runtime_config

    @property
    def role(self) -> str:
        return str(self.runtime.get("role") or ("prefill" if self.record.component == "prefill" else "agg"))

    @property
    def total_blocks(self) -> int:
        return int(self.runtime.get("total_kv_blocks") or 0)

    @property
    def block_size(self) -> int:
        return int(self.runtime.get("block_size") or 16)

    @property
    def dp_size(self) -> int:
        return int(self.runtime.get("data_parallel_size") or 1)

    @property
    def endpoint_types(self) -> tuple[str, ...]:
        types = self.runtime.get("endpoint_types")
        return tuple(types) if isinstance(types, list) else ("chat", "completions")

    @property
    def event_plane(self) -> str | None:
        address = self.runtime.get("event_plane")
        return str(address) if address else None

    def card(self) -> ModelCard | None:
        data = self.runtime.get("model_card")
        return ModelCard.from_json(data) if isinstance(data, dict) else None


@dataclass
class Model:
    """A served model: its card and tokenizer (once fetched)."""

    card: ModelCard
    tokenizer: Tokenizer | None = None
    fetch_error: str | None = None
    ready: trio.Event = field(default_factory=trio.Event)


class Instances:
    """The instances discovery lists that ``accept`` takes (all by default); with
    ``fetch_cards``, their models' cards and tokenizers are fetched too."""

    def __init__(self, accept: Callable[[InstanceRecord], bool] | None = None, *, fetch_cards: bool = True) -> None:
        self.accept = accept
        self.fetch_cards = fetch_cards
        self.by_id: dict[str, Instance] = {}
        self.models: dict[str, Model] = {}
        self.changed = trio.Event()
        self.listed = trio.Event()  # discovery answered at least once
        self.on_removed: list[Callable[[Instance], None]] = []

    def update(self, records: Sequence[InstanceRecord]) -> tuple[list[Instance], list[Instance]]:
        accept = self.accept
        seen = {r.instance_id: r for r in records if accept is None or accept(r)}
        added: list[Instance] = []
        for iid, record in seen.items():
            found = self.by_id.get(iid)
            if found is None:
                found = self.by_id[iid] = Instance(record)
                added.append(found)
            else:
                found.record = record  # e.g. LoRA adapters changed
        removed = [inst for iid, inst in self.by_id.items() if iid not in seen]
        for inst in removed:
            del self.by_id[inst.id]
            for hook in self.on_removed:
                hook(inst)
        self.listed.set()
        if added or removed:
            self.changed.set()
            self.changed = trio.Event()
        return added, removed

    def serving(self, model: str, roles: Sequence[str] = ("agg", "decode", "processor")) -> list[Instance]:
        """The instances that answer ``model``'s requests (a multimodal processor does, for its workers)."""
        return sorted((i for i in self.by_id.values() if i.model == model and i.role in roles), key=lambda i: i.id)

    def serving_any(self) -> list[Instance]:
        return list(self.by_id.values())

    def adapters(self, model: str) -> set[str]:
        names: set[str] = set()
        for inst in self.serving(model):
            names.update(inst.runtime.get("lora_adapters") or [])
        return names


class DiscoveryWatcher:
    """``ChildSpec("watcher", DiscoveryWatcher(...).run)``."""

    def __init__(self, instances: Instances | Sequence[Instances], discovery: Discovery, namespace: str, *,
                 interval: float = 1.0, nats_servers: Sequence[str] = (), cache_dir: Path | None = None) -> None:
        self.views = [instances] if isinstance(instances, Instances) else list(instances)
        self.discovery = discovery
        self.namespace = namespace
        self.interval = interval
        self.nats_servers = list(nats_servers)
        self.cache_dir = cache_dir

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await self._poll(ctx, nursery)
                task_status.started()
                while True:
                    await trio.sleep(self.interval)
                    await self._poll(ctx, nursery)
        finally:
            with ctx.cleanup_scope():
                await self.discovery.aclose()

    async def _poll(self, ctx: ActorContext, nursery: trio.Nursery) -> None:
        records = [r for r in await self.discovery.list(self.namespace) if r.endpoint == "generate" and r.model]
        for view in self.views:
            added, removed = view.update(records)
            for inst in added:
                ctx.log.info("frontend.worker_added", instance=inst.id, model=inst.model, role=inst.role,
                             multimodal_role=inst.runtime.get("multimodal_role"), address=inst.record.address,
                             transport=inst.record.transport)
            for inst in removed:
                ctx.log.info("frontend.worker_removed", instance=inst.id, model=inst.model)
            if not view.fetch_cards:
                continue
            for inst in view.by_id.values():  # a model not known yet (or whose fetch failed)
                if inst.model not in view.models:
                    card = inst.card()
                    if card is not None:
                        model = view.models[inst.model] = Model(card)
                        nursery.start_soon(self._fetch, ctx, view, model, inst)

    async def _fetch(self, ctx: ActorContext, view: Instances, model: Model, inst: Instance) -> None:
        """The model's tokenizer: the worker's own files, fetched once."""
        card = model.card
        try:
            if card.tokenizer == "bytes":
                model.tokenizer = ByteTokenizer()
            else:
                with trio.fail_after(60):
                    async with open_call(inst.record, "model_card", {}, nats_servers=self.nats_servers) as call:
                        items = await call.collect()
                fetched, directory = await trio.to_thread.run_sync(write_card_files, items, self.cache_dir)
                model.card = fetched
                model.tokenizer = await trio.to_thread.run_sync(HfTokenizer, str(directory))
            ctx.log.info("frontend.model_ready", model=card.name, tokenizer=card.tokenizer,
                         context_length=card.context_length, from_instance=inst.id)
        except Exception as exc:  # the next poll tries again
            model.fetch_error = f"{type(exc).__name__}: {exc}"
            ctx.log.warning("frontend.model_card_failed", model=card.name, error=model.fetch_error, instance=inst.id)
        finally:
            if model.tokenizer is None and view.models.get(card.name) is model:
                del view.models[card.name]  # failed or cancelled: fetched again next time
            model.ready.set()

