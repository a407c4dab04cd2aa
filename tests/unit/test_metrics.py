"""The worker's Prometheus metrics and the load-metrics publisher, in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from actors.engine.actor import EngineActor, EngineRef
from actors.engine.synthetic import SyntheticEngine
from actors.metrics import MetricsActor, WorkerMetrics
from supervisor.planes.events import MemoryEventPublisher
from supervisor.prometheus_env import prepare_multiproc_dir
from supervisor.tree import (
    ActorContext,
    ActorRegistry,
    Backoff,
    ChildSpec,
    Restart,
    Strategy,
    Supervisor,
    TaskStatus,
    root_context,
)
from tests.kvfake import wait_until

REPO = Path(__file__).resolve().parents[2]


def samples(page: bytes | str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = page.decode() if isinstance(page, bytes) else page
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(page: bytes | str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples(page).items() if n == name and want <= ls]
    assert found, f"no sample {name}{labels}"
    return sum(found)


def make_metrics(**kw: Any) -> WorkerMetrics:
    return WorkerMetrics(namespace="ns", component="backend", endpoint="generate", worker_id="w1",
                         model=lambda: "tiny", **kw)


def test_request_metrics_count_what_the_endpoint_server_reports() -> None:
    m = make_metrics()
    for _ in range(3):
        m.started("generate")
        m.finished("generate", "ok", 0.2)
    m.started("generate")
    m.finished("generate", "error", 0.01, "invalid_request")
    m.started("generate")
    m.finished("generate", "aborted", 1.5)
    m.started("clear_kv_blocks")
    m.started("generate")  # still running
    page = m.render()
    req = {"dynamo_namespace": "ns", "dynamo_component": "backend", "dynamo_endpoint": "generate"}
    assert value(page, "dynamo_component_requests_total", **req) == 6
    assert value(page, "dynamo_component_requests_total", dynamo_endpoint="clear_kv_blocks") == 1
    assert value(page, "dynamo_component_inflight_requests", **req) == 1
    assert value(page, "dynamo_component_inflight_requests", dynamo_endpoint="clear_kv_blocks") == 1
    assert value(page, "dynamo_component_errors_total", error_type="invalid_request", **req) == 1
    assert value(page, "dynamo_component_cancellation_total", **req) == 1
    assert value(page, "dynamo_component_request_duration_seconds_count", **req) == 5
    assert value(page, "dynamo_component_request_duration_seconds_bucket", le="0.25", **req) == 4


def test_vllm_families_get_dynamo_labels_and_keep_their_own() -> None:
    source = CollectorRegistry()
    tokens = Counter("vllm:prompt_tokens", "Prompt tokens", ["model_name", "engine"], registry=source)
    tokens.labels("tiny", "0").inc(42)
    running = Gauge("vllm:num_requests_running", "Running", ["model_name", "model"], registry=source)
    running.labels("tiny", "vllm-says").set(2)
    Counter("process_unrelated", "not vLLM's", registry=source).inc()
    m = make_metrics(vllm_source=source)
    page = m.render()
    dynamo = {"dynamo_namespace": "ns", "dynamo_component": "backend", "dynamo_endpoint": "generate",
              "worker_id": "w1"}
    assert value(page, "vllm:prompt_tokens_total", model="tiny", model_name="tiny", engine="0", **dynamo) == 42
    # a label vLLM already has keeps vLLM's value
    assert value(page, "vllm:num_requests_running", model="vllm-says", **dynamo) == 2
    assert not [k for k in samples(page) if k[0].startswith("process_unrelated")]
    tokens.labels("tiny", "0").inc(8)
    assert value(m.render(), "vllm:prompt_tokens_total", **dynamo) == 50


async def test_tree_metrics_count_restarts_up_and_escalations() -> None:
    m = make_metrics()
    registry = ActorRegistry()
    registry.subscribe(m.on_actor_event)

    async def idle(ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    fast = Backoff(base=0.001, cap=0.002)
    inner = Supervisor([ChildSpec("leaf", idle, backoff=fast)], Strategy.ONE_FOR_ONE, intensity=0, period=5.0)
    root = Supervisor([ChildSpec("worker", idle, backoff=fast),
                       ChildSpec("sub", inner.run, shutdown="infinity", backoff=fast)],
                      intensity=100, period=1.0)
    tree = {"dynamo_namespace": "ns", "dynamo_component": "backend"}
    async with trio.open_nursery() as nursery:
        await nursery.start(root.run, root_context(registry))
        for i in range(5):
            assert registry.kill("root/worker")
            await wait_until(lambda n=i + 1: registry.get("root/worker").restarts == n)  # type: ignore[union-attr,misc]
        assert registry.kill("root/sub/leaf")  # intensity 0: the inner supervisor escalates
        await wait_until(lambda: registry.get("root/sub").restarts == 1)  # type: ignore[union-attr]
        await wait_until(lambda: registry.all_ready())
        page = m.render()
        assert value(page, "dynamo_component_actor_restarts_total", actor="root/worker", **tree) == 5
        assert value(page, "dynamo_component_actor_restarts_total", actor="root/sub", **tree) == 1
        assert value(page, "dynamo_component_actor_escalations_total", actor="root/sub", **tree) == 1
        assert value(page, "dynamo_component_actor_escalations_total", actor="root/worker", **tree) == 0
        assert value(page, "dynamo_component_actor_up", actor="root/worker", **tree) == 1
        assert value(page, "dynamo_component_actor_up", actor="root/sub/leaf", **tree) == 1
        nursery.cancel_scope.cancel()
    assert value(m.render(), "dynamo_component_actor_up", actor="root/worker", **tree) == 0


@dataclass
class Stats:
    kv_cache_usage: float
    num_running_reqs: int = 1
    num_waiting_reqs: int = 0


@asynccontextmanager
async def metrics_tree(m: WorkerMetrics, publisher: MemoryEventPublisher) -> AsyncIterator[ActorRegistry]:
    registry = ActorRegistry()
    registry.subscribe(m.on_actor_event)
    engine = EngineRef("root/engine", registry)
    actor = MetricsActor(m, engine, publisher, debounce_s=0.05)
    fast = Backoff(base=0.001, cap=0.01)
    root = Supervisor([
        ChildSpec("engine", EngineActor(SyntheticEngine(total_kv_blocks=1000), engine,
                                        on_ready=lambda info: m.engine_ready(info, [0])).run,
                  Restart.TEMPORARY, significant=True),
        ChildSpec("metrics", actor.run, backoff=fast),
    ], intensity=1000, period=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(root.run, root_context(registry))
        yield registry
        nursery.cancel_scope.cancel()


def load_messages(publisher: MemoryEventPublisher) -> list[dict[str, Any]]:
    return [json.loads(p) for p in publisher.on("ns.kv_metrics")]


async def test_load_metrics_are_published_when_they_change_debounced() -> None:
    m = make_metrics()
    publisher = MemoryEventPublisher()
    async with metrics_tree(m, publisher):
        await wait_until(lambda: len(load_messages(publisher)) == 1)
        first = load_messages(publisher)[0]
        # the synthetic engine: its fixed block count, nothing in use
        assert first["kv_used_blocks"] == 0 and first["kv_total_blocks"] == 1000
        assert first["worker_id"] == "w1" and first["dp_rank"] == 0
        page = m.render()
        assert value(page, "dynamo_component_total_blocks", dp_rank="0", model="tiny") == 1000
        assert value(page, "dynamo_component_gpu_cache_usage_percent", dp_rank="0") == 0
        assert value(page, "dynamo_component_model_load_time_seconds", model="tiny") == 0
        # a burst of engine steps within the debounce window: one message, the last value
        for usage in (0.1, 0.2, 0.3, 0.25):
            m.engine_stats(Stats(usage), None, 0)
        await wait_until(lambda: len(load_messages(publisher)) == 2)
        m.engine_stats(Stats(0.25), None, 0)  # unchanged: nothing to say
        m.engine_stats(None, None, 0)
        m.engine_stats(Stats(0.0), None, 0)
        await wait_until(lambda: len(load_messages(publisher)) == 3)
        used = [msg["kv_used_blocks"] for msg in load_messages(publisher)]
        assert used == [0, 250, 0]
        assert value(m.render(), "dynamo_component_gpu_cache_usage_percent", dp_rank="0") == 0


async def test_killing_the_metrics_actor_resets_no_counter_and_loses_no_change() -> None:
    """Killed 30 times while requests and engine steps keep coming: every scrape
    sees counters that only grow, and the last load value is published."""
    m = make_metrics()
    publisher = MemoryEventPublisher()
    sent = 0
    async with metrics_tree(m, publisher) as registry:
        await wait_until(lambda: len(load_messages(publisher)) == 1)
        done = trio.Event()

        async def load() -> None:
            nonlocal sent
            step = 0
            while not done.is_set():
                m.started("generate")
                sent += 1
                step += 1
                m.engine_stats(Stats((step % 10) / 10), None, 0)
                await trio.sleep(0.001)
                m.finished("generate", "ok", 0.001)

        async def scrape() -> None:
            last = 0.0
            while not done.is_set():
                page = m.render()
                # the labelled series exists once the first request finished
                has = any(n == "dynamo_component_requests_total" for n, _ in samples(page))
                now = value(page, "dynamo_component_requests_total") if has else 0.0
                assert now >= last
                last = now
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            nursery.start_soon(scrape)
            for i in range(30):
                await trio.sleep(0.02)
                assert registry.kill("root/metrics")
                await wait_until(lambda n=i + 1: registry.get("root/metrics").restarts == n)  # type: ignore[union-attr,misc]
            done.set()
        m.engine_stats(Stats(0.7), None, 0)
        await wait_until(lambda: load_messages(publisher)[-1]["kv_used_blocks"] == 700)
        page = m.render()
        assert value(page, "dynamo_component_requests_total") == sent
        assert value(page, "dynamo_component_request_duration_seconds_count") == sent
        assert value(page, "dynamo_component_inflight_requests") == 0
        assert value(page, "dynamo_component_actor_restarts_total", actor="root/metrics") == 30
        assert len(load_messages(publisher)) > 2


def test_multiproc_dir_is_made_when_unset_or_missing(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    made = prepare_multiproc_dir(env, cleanup_at_exit=False)
    try:
        assert made.temporary and made.created and made.path.is_dir()
        assert env["PROMETHEUS_MULTIPROC_DIR"] == str(made.path)
    finally:
        made.path.rmdir()
    missing = tmp_path / "a" / "b"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(missing)}
    made = prepare_multiproc_dir(env, cleanup_at_exit=False)
    assert missing.is_dir() and made.created and not made.temporary
    again = prepare_multiproc_dir(env, cleanup_at_exit=False)
    assert again.path == missing and not again.created


MULTIPROC_SCRIPT = textwrap.dedent("""
    import sys
    from supervisor.prometheus_env import prepare_multiproc_dir
    prepare_multiproc_dir()
    from prometheus_client import Counter, Gauge
    from actors.metrics import WorkerMetrics, vllm_metrics_source
    # what vLLM does in the worker process: collectors in the global registry
    Counter("vllm:request_success", "ok", ["model_name", "engine"]).labels("tiny", "0").inc(3)
    Gauge("vllm:num_requests_waiting", "w", ["model_name", "engine"],
          multiprocess_mode="mostrecent").labels("tiny", "0").set(4)
    m = WorkerMetrics(namespace="ns", component="backend", endpoint="generate", worker_id="w1",
                      model=lambda: "tiny", vllm_source=vllm_metrics_source())
    m.started("generate")
    m.finished("generate", "ok", 0.1)
    sys.stdout.write(m.render().decode())
""")


def test_multiprocess_mode_page_has_vllm_and_our_metrics_once(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR in effect vLLM's values are read from the
    directory through a registry of their own; ours stay in ours; no family twice."""
    directory = tmp_path / "prom"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", MULTIPROC_SCRIPT], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert directory.is_dir() and list(directory.glob("*.db"))
    names = [f.name for f in text_string_to_metric_families(out.stdout)]
    assert len(names) == len(set(names))
    dynamo = {"dynamo_namespace": "ns", "dynamo_component": "backend", "worker_id": "w1", "model": "tiny"}
    assert value(out.stdout, "vllm:request_success_total", model_name="tiny", **dynamo) == 3
    assert value(out.stdout, "vllm:num_requests_waiting", **dynamo) == 4
    assert value(out.stdout, "dynamo_component_requests_total", dynamo_endpoint="generate") == 1
