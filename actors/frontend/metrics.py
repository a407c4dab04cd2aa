"""The frontend's Prometheus metrics (``dynamo_frontend_*``), in a registry of its own.

Requests (by endpoint and how they ended, in flight, duration, errors by type), time to
first token and between tokens, prompt and output lengths, migrations, clients that hung
up, each worker's active KV blocks as the router counts them, the router's own time per
decision and its KV hit rate (prompt blocks found cached / prompt blocks).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from starlette.requests import Request
from starlette.responses import Response

from ..pipeline import Status
from .instances import Instances
from .router import Router

__all__ = ["FrontendMetrics"]

PREFIX = "dynamo_frontend"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
ROUTER_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025)


class FrontendMetrics:
    def __init__(self, instances: Instances, router: Router) -> None:
        self.instances = instances
        self.router = router
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.requests = Counter(f"{PREFIX}_requests", "Requests, by endpoint and how they ended",
                                ("endpoint", "status"), registry=r)
        self.inflight = Gauge(f"{PREFIX}_inflight_requests", "Requests being served now", ("endpoint",), registry=r)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds", "Time from request to its end",
                                  ("endpoint",), buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "Requests that ended with an error", ("endpoint", "error_type"),
                              registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to the first token", ("model",),
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between two tokens of a stream",
                             ("model",), buckets=LATENCY_BUCKETS, registry=r)
        self.input_tokens = Histogram(f"{PREFIX}_input_sequence_tokens", "Prompt length", ("model",),
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.output_tokens = Histogram(f"{PREFIX}_output_sequence_tokens", "Generated length", ("model",),
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.migrations = Counter(f"{PREFIX}_migrations", "Requests moved to another worker mid-stream",
                                  ("model", "reason"), registry=r)
        self.disconnects = Counter(f"{PREFIX}_disconnected_clients", "Clients that hung up mid-request",
                                   registry=r)
        self.router_seconds = Histogram(f"{PREFIX}_router_decision_seconds", "The router's time per decision",
                                        buckets=ROUTER_BUCKETS, registry=r)
        r.register(_LiveCollector(self))

    # -- the request pipeline's observer ------------------------------------------------
    def started(self, endpoint: str) -> None:
        self.inflight.labels(endpoint).inc()

    def finished(self, endpoint: str, status: Status, seconds: float, code: str | None = None) -> None:
        self.inflight.labels(endpoint).dec()
        self.requests.labels(endpoint, str(status)).inc()
        self.duration.labels(endpoint).observe(max(0.0, seconds))
        if status is Status.ERROR:
            self.errors.labels(endpoint, code or "internal").inc()
        elif status is Status.ABORTED and code is None:
            self.disconnects.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def metrics_page(self, _: Request) -> Response:
        return Response(self.render(), media_type=CONTENT_TYPE_LATEST)


class _LiveCollector:
    """Values read at scrape time: each worker's active blocks and requests, the KV hit rate."""

    def __init__(self, metrics: FrontendMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        blocks = Metric(f"{PREFIX}_worker_active_blocks", "KV blocks of the requests a worker runs (router's count)",
                        "gauge")
        requests = Metric(f"{PREFIX}_worker_active_requests", "Requests a worker runs (router's count)", "gauge")
        for inst in self.metrics.instances.by_id.values():
            labels = {"worker_id": inst.id, "model": inst.model, "role": inst.role}
            blocks.add_sample(f"{PREFIX}_worker_active_blocks", labels, float(inst.active_blocks))
            requests.add_sample(f"{PREFIX}_worker_active_requests", labels, float(inst.active_requests))
        yield blocks
        yield requests
        stats = self.metrics.router.stats
        hit = Metric(f"{PREFIX}_router_kv_hit_rate", "Prompt blocks found cached on the chosen worker / prompt "
                     "blocks (kv mode)", "gauge")
        hit.add_sample(f"{PREFIX}_router_kv_hit_rate", {}, stats.hit_rate)
        yield hit
