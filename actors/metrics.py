"""Metrics: the Prometheus page on the system port and the load metrics on the event plane.

:class:`WorkerMetrics` holds every metric of the worker in its own
``CollectorRegistry`` (never prometheus_client's global one, so nothing a
library registers there can clash with ours). It is built once per process, in
``roles.build_tree``, and handed to whoever records into it: the endpoint
server (per-request counters), the actor registry (the tree's own metrics), the
engine's stat logger (KV usage). Killing the metrics actor therefore resets
nothing: counters never go backwards.

The page (``GET /metrics``) also carries vLLM's own ``vllm:*`` families, read
from where vLLM registers them (prometheus_client's global registry, or the
multiprocess directory when ``PROMETHEUS_MULTIPROC_DIR`` is in effect, through
a separate registry so the two never clash), with Dynamo's labels added:
``dynamo_namespace``, ``dynamo_component``, ``dynamo_endpoint``, ``worker_id``,
``model``. A label vLLM already has keeps vLLM's value.

The metrics actor itself serves nothing (the system server serves the page);
it publishes ``kv_used_blocks`` per data-parallel rank on the event plane
(``{namespace}.kv_metrics``) when it changes, at most once per ``debounce_s``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import values as prometheus_values
from prometheus_client.metrics_core import Metric
from starlette.requests import Request
from starlette.responses import Response

from supervisor.planes.events import EventPublisher
from supervisor.tree import ActorCell, ActorContext, ActorState, TaskStatus

from .engine.actor import EngineRef
from .engine.base import EngineInfo
from .kv_events import KvEventsState
from .system import SystemRoutes

__all__ = [
    "DYNAMO_LABELS",
    "LabelInjector",
    "LoadMetrics",
    "MetricsActor",
    "WorkerMetrics",
    "vllm_metrics_source",
]

_log = structlog.get_logger("actors.metrics")

PREFIX = "dynamo_component"
DYNAMO_LABELS = ("dynamo_namespace", "dynamo_component", "dynamo_endpoint", "worker_id", "model")
_REQ = ("dynamo_namespace", "dynamo_component", "dynamo_endpoint")
_ENGINE = (*_REQ, "worker_id", "model", "dp_rank")
_TREE = ("dynamo_namespace", "dynamo_component", "actor")
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
DEBOUNCE_S = 0.05


class _Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


def vllm_metrics_source() -> _Collector:
    """Where vLLM's metrics are read from in this process.

    In prometheus_client's multiprocess mode the values live in files under
    ``PROMETHEUS_MULTIPROC_DIR``: a ``MultiProcessCollector`` reads them, in a
    registry of its own (registered in the global one, its families would
    clash with the live collectors vLLM put there). Otherwise vLLM's
    collectors are in the global registry.
    """
    if getattr(prometheus_values.ValueClass, "_multiprocess", False):
        import os

        from prometheus_client import multiprocess

        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if path and os.path.isdir(path):
            registry = CollectorRegistry(auto_describe=False)
            multiprocess.MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
            return registry
    return REGISTRY


class LabelInjector:
    """Re-exposes ``source``'s families named ``prefix*`` with ``labels()`` added
    (labels a sample already has win)."""

    def __init__(self, source: _Collector, prefix: str, labels: Callable[[], Mapping[str, str]]) -> None:
        self.source = source
        self.prefix = prefix
        self.labels = labels

    def collect(self) -> Iterable[Metric]:
        extra = dict(self.labels())
        for family in self.source.collect():
            if not family.name.startswith(self.prefix):
                continue
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(s.name, {**extra, **s.labels}, s.value, s.timestamp, s.exemplar, s.native_histogram)
            yield out


@dataclass
class RankLoad:
    kv_total_blocks: int = 0
    kv_usage: float = 0.0  # fraction of the KV cache in use
    num_running: int = 0
    num_waiting: int = 0

    @property
    def kv_used_blocks(self) -> int:
        return round(self.kv_total_blocks * self.kv_usage)


@dataclass
class LoadMetrics:
    """The engine's latest load per dp rank and what was last published.
    Owned above the metrics actor."""

    ranks: dict[int, RankLoad] = field(default_factory=dict)
    published: dict[int, int] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)
    publications: int = 0
    engine_known: bool = False

    def rank(self, dp_rank: int) -> RankLoad:
        load = self.ranks.get(dp_rank)
        if load is None:
            load = self.ranks[dp_rank] = RankLoad()
        return load

    def pending(self) -> dict[int, RankLoad]:
        return {r: load for r, load in self.ranks.items() if self.published.get(r) != load.kv_used_blocks}

    def signal(self) -> None:
        try:
            self.changed.set()
        except RuntimeError:  # not on the trio thread: the actor's periodic check catches up
            pass


class WorkerMetrics:
    """Every metric of one worker process; see the module docstring."""

    def __init__(
        self,
        *,
        namespace: str,
        component: str,
        endpoint: str,
        worker_id: str,
        model: Callable[[], str] = lambda: "",
        vllm_source: _Collector | None = None,
        kv_events: KvEventsState | None = None,
    ) -> None:
        self.namespace = namespace
        self.component = component
        self.endpoint = endpoint
        self.worker_id = worker_id
        self.model = model
        self.load = LoadMetrics()
        self.kv_events = kv_events
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Requests received, per endpoint", _REQ, registry=r)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds", "Time from request to its last item",
                                  _REQ, buckets=DURATION_BUCKETS, registry=r)
        self.inflight = Gauge(f"{PREFIX}_inflight_requests", "Requests being served now", _REQ, registry=r,
                              multiprocess_mode="livesum")
        self.errors = Counter(f"{PREFIX}_errors", "Requests that ended with an error", (*_REQ, "error_type"),
                              registry=r)
        self.cancellations = Counter(f"{PREFIX}_cancellation", "Requests cancelled (client cancel, disconnect, "
                                     "shutdown)", _REQ, registry=r)
        self.total_blocks = Gauge(f"{PREFIX}_total_blocks", "KV cache blocks of the engine", _ENGINE, registry=r,
                                  multiprocess_mode="mostrecent")
        self.cache_usage = Gauge(f"{PREFIX}_gpu_cache_usage_percent",
                                 "Fraction of the KV cache in use (0-1, as Dynamo and vLLM report it)", _ENGINE,
                                 registry=r, multiprocess_mode="mostrecent")
        self.load_time = Gauge(f"{PREFIX}_model_load_time_seconds", "Seconds the engine took to load",
                               (*_REQ, "worker_id", "model"), registry=r, multiprocess_mode="mostrecent")
        self.actor_restarts = Counter(f"{PREFIX}_actor_restarts", "Restarts of each actor of the tree", _TREE,
                                      registry=r)
        self.actor_up = Gauge(f"{PREFIX}_actor_up", "1 while the actor is running (ready), else 0", _TREE,
                              registry=r, multiprocess_mode="mostrecent")
        self.escalations = Counter(f"{PREFIX}_actor_escalations", "Supervisors that gave up and escalated", _TREE,
                                   registry=r)
        self.kv_events_counter: _KvEventsCollector | None = None
        if kv_events is not None:
            self.kv_events_counter = _KvEventsCollector(self, kv_events)
            r.register(self.kv_events_counter)
        self.vllm: LabelInjector | None = None
        if vllm_source is not None:
            self.vllm = LabelInjector(vllm_source, "vllm:", self.dynamo_labels)
            r.register(self.vllm)

    # -- labels ------------------------------------------------------------------------------------
    def dynamo_labels(self) -> dict[str, str]:
        return {"dynamo_namespace": self.namespace, "dynamo_component": self.component,
                "dynamo_endpoint": self.endpoint, "worker_id": self.worker_id, "model": self.model()}

    def _req(self, endpoint: str) -> tuple[str, str, str]:
        return self.namespace, self.component, endpoint

    # -- requests (called by the endpoint server) ----------------------------------------------------
    def started(self, endpoint: str) -> None:
        labels = self._req(endpoint)
        self.requests.labels(*labels).inc()
        self.inflight.labels(*labels).inc()

    def finished(self, endpoint: str, status: str, seconds: float, code: str | None = None) -> None:
        labels = self._req(endpoint)
        self.inflight.labels(*labels).dec()
        self.duration.labels(*labels).observe(max(0.0, seconds))
        if status == "aborted":
            self.cancellations.labels(*labels).inc()
        elif status == "error":
            self.errors.labels(*labels, code or "internal").inc()

    # -- the tree (ActorRegistry.subscribe) ------------------------------------------------------------
    def on_actor_event(self, event: str, cell: ActorCell) -> None:
        labels = (self.namespace, self.component, cell.path)
        if event == "started":
            self.actor_restarts.labels(*labels)  # shows 0 before the first restart
            self.escalations.labels(*labels)
            self.actor_up.labels(*labels).set(0)
        elif event == "ready":
            self.actor_up.labels(*labels).set(1)
        elif event == "stopped":
            self.actor_up.labels(*labels).set(0)
            if cell.state is ActorState.CRASHED and (cell.last_error or "").startswith("Escalation"):
                self.escalations.labels(*labels).inc()
        elif event == "restarted":
            self.actor_restarts.labels(*labels).inc()

    # -- the engine ----------------------------------------------------------------------------------
    def _engine_labels(self, dp_rank: int) -> tuple[str, ...]:
        return (self.namespace, self.component, self.endpoint, self.worker_id, self.model(), str(dp_rank))

    def engine_ready(self, info: EngineInfo, ranks: Iterable[int] = (0,)) -> None:
        """Static engine facts; a rank nobody reported on yet shows usage 0.
        (The synthetic engine never reports: its usage stays 0.)"""
        self.load.engine_known = True
        self.load_time.labels(self.namespace, self.component, self.endpoint, self.worker_id,
                              self.model()).set(info.load_time_s)
        for rank in ranks:
            load = self.load.rank(rank)
            load.kv_total_blocks = info.total_kv_blocks
            self.total_blocks.labels(*self._engine_labels(rank)).set(info.total_kv_blocks)
            self.cache_usage.labels(*self._engine_labels(rank)).set(load.kv_usage)
        self.load.signal()

    def engine_stats(self, scheduler_stats: Any, iteration_stats: Any, engine_idx: int) -> None:
        """vLLM's stat logger hook: once per engine step, on the engine's loop."""
        if scheduler_stats is None:
            return
        load = self.load.rank(int(engine_idx))
        before = load.kv_used_blocks
        load.kv_usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0) or 0.0)
        load.num_running = int(getattr(scheduler_stats, "num_running_reqs", 0) or 0)
        load.num_waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0) or 0)
        self.cache_usage.labels(*self._engine_labels(int(engine_idx))).set(load.kv_usage)
        if load.kv_used_blocks != before:
            self.load.signal()

    # -- the page ------------------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def metrics_page(self, _: Request) -> Response:
        return Response(self.render(), media_type=CONTENT_TYPE_LATEST)


class _KvEventsCollector:
    """The KV event relay's counters (kept in its state, so never reset)."""

    def __init__(self, metrics: WorkerMetrics, state: KvEventsState) -> None:
        self.metrics = metrics
        self.state = state

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        family = Metric(f"{PREFIX}_kv_events", "KV event batches from vLLM, by what became of them", "counter")
        for rank, stream in sorted(self.state.streams.items()):
            for outcome, count in stream.counters().items():
                family.add_sample(f"{PREFIX}_kv_events_total",
                                  {"dynamo_namespace": m.namespace, "dynamo_component": m.component,
                                   "worker_id": m.worker_id, "dp_rank": str(rank), "outcome": outcome},
                                  float(count))
        yield family


class MetricsActor:
    """``ChildSpec("metrics", MetricsActor(...).run)``: publishes load metrics.

    Build it with the process's :class:`WorkerMetrics`; :meth:`install` adds
    ``/metrics`` to the system server at build time.
    """

    def __init__(
        self,
        metrics: WorkerMetrics,
        engine: EngineRef,
        publisher: EventPublisher | None,
        *,
        ranks: Iterable[int] = (0,),
        debounce_s: float = DEBOUNCE_S,
        recheck_s: float = 1.0,
    ) -> None:
        self.metrics = metrics
        self.engine = engine
        self.publisher = publisher
        self.ranks = tuple(ranks)
        self.debounce_s = debounce_s
        self.recheck_s = recheck_s

    def install(self, routes: SystemRoutes) -> None:
        routes.add("/metrics", self.metrics.metrics_page, ["GET"])

    @property
    def subject(self) -> str:
        return f"{self.metrics.namespace}.kv_metrics"

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        info = await self.engine.wait_ready()
        load = self.metrics.load
        if not load.engine_known:  # normally done by the engine actor's on_ready hook
            self.metrics.engine_ready(info, self.ranks)
        task_status.started()
        while True:
            await self._publish_changes()
            with trio.move_on_after(self.recheck_s):
                await load.changed.wait()
            await trio.sleep(self.debounce_s)

    async def _publish_changes(self) -> None:
        load = self.metrics.load
        load.changed = trio.Event()  # changes from now on wake the next round
        if self.publisher is None:
            return
        for rank, rank_load in sorted(load.pending().items()):
            used = rank_load.kv_used_blocks
            payload = json.dumps({
                "worker_id": self.metrics.worker_id,
                "dp_rank": rank,
                "kv_used_blocks": used,
                "kv_total_blocks": rank_load.kv_total_blocks,
                "gpu_cache_usage_perc": rank_load.kv_usage,
                "num_requests_running": rank_load.num_running,
                "num_requests_waiting": rank_load.num_waiting,
                "ts": time.time(),
            }, separators=(",", ":")).encode()
            with trio.CancelScope(shield=True), trio.fail_after(5.0):
                await self.publisher.publish(self.subject, payload)
                load.published[rank] = used
                load.publications += 1

