"""Chaos, out of process: the metrics and KV event actors of a real worker
(synthetic engine) killed again and again while requests and KV events flow.

The worker's KV event relay is fed by a fake vLLM publisher in this process
(vLLM's exact frames and replay socket), which connects to DYN_VLLM_KV_EVENT_PORT
where the relay listens, as vLLM does; the test subscribes to the worker's ZMQ
event plane like a KV router would.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import trio
import zmq
from prometheus_client.parser import text_string_to_metric_families

from supervisor.client import Call
from supervisor.planes import zmq_trio
from tests.kvfake import FakeVllmPublisher, IndexModel, free_port_pair, settle, wait_until, workload
from tests.procs import Worker, worker_fixture

KILLS_PER_ACTOR = 10
BATCHES = 600


@pytest.fixture
def kv_port() -> int:
    return free_port_pair()


@pytest.fixture
def worker(kv_port: int) -> Iterator[Worker]:
    yield from worker_fixture("--engine", "synthetic", "--enable-chaos", "--system-port", "0",
                              "--synthetic-step-ms", "2", env={"DYN_VLLM_KV_EVENT_PORT": str(kv_port)})


def metric(page: str, name: str, **labels: str) -> float:
    total = 0.0
    found = False
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    assert found, f"no {name}{labels} on the page"
    return total


async def scrape(worker: Worker) -> str:
    response = await trio.to_thread.run_sync(worker.get, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return str(response.text)


async def restarts(worker: Worker, path: str) -> int:
    tree = (await trio.to_thread.run_sync(worker.get, "/debug/tree")).json()
    return int(next(a["restarts"] for a in tree if a["path"] == path))


async def test_killing_metrics_and_kv_events_under_load_loses_nothing(worker: Worker, kv_port: int) -> None:
    await trio.to_thread.run_sync(worker.wait_ready)
    plane_port = worker.wait_event("event_plane.listening")["port"]
    address = f"127.0.0.1:{worker.wait_event('request_plane.listening')['port']}"
    fake = FakeVllmPublisher(port=kv_port, replay_port=kv_port + 1000, connect=True)
    sub = zmq_trio.socket(zmq.SUB, rcvhwm=100_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"dynamo.kv-events")
    sub.connect(f"tcp://127.0.0.1:{plane_port}")
    relayed: list[dict[str, Any]] = []
    batches = workload(BATCHES, seed=3)
    model = IndexModel()
    sent = 0
    finished = 0
    scrapes: list[float] = []
    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(fake.serve_replay)

            async def receive() -> None:
                while True:
                    topic, payload = await zmq_trio.recv_multipart(sub)
                    assert topic == b"dynamo.kv-events"
                    relayed.append(json.loads(payload))

            outer.start_soon(receive)
            await settle()
            done = trio.Event()

            async def produce() -> None:
                for events in batches:
                    await fake.publish(events)
                    model.apply(events)
                    await trio.sleep(0.005)

            async def requests() -> None:
                nonlocal sent, finished
                while not done.is_set():
                    sent += 1
                    async with Call(address, "generate", {"token_ids": [1, 2, 3],
                                                          "stop_conditions": {"max_tokens": 4}}) as call:
                        items = await call.collect()
                    assert items[-1]["finish_reason"] == "length"
                    finished += 1

            async def scraper() -> None:
                while not done.is_set():
                    scrapes.append(metric(await scrape(worker), "dynamo_component_requests_total",
                                          dynamo_endpoint="generate"))
                    await trio.sleep(0.02)

            async def killer() -> None:
                for i in range(KILLS_PER_ACTOR):
                    for path in ("root/kv_events", "root/metrics"):
                        r = await trio.to_thread.run_sync(partial(worker.post, f"/debug/actors/{path}/kill"))
                        assert r.status_code == 200, r.text
                        with trio.fail_after(10):
                            while await restarts(worker, path) != i + 1:  # noqa: ASYNC110
                                await trio.sleep(0.01)
                    await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                nursery.start_soon(requests)
                nursery.start_soon(scraper)
                await killer()
                done.set()
            # every batch reached the index and the event plane, once, in order
            async def index() -> dict[str, Any]:
                async with Call(address, "kv_index", {}) as call:
                    (answer,) = await call.collect()
                    rank: dict[str, Any] = answer["ranks"][0]
                    return rank

            with trio.fail_after(30):
                while (await index())["last_event_id"] != BATCHES - 1:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            await wait_until(lambda: len(relayed) >= BATCHES)
            assert [m["event_id"] for m in relayed] == list(range(BATCHES))
            assert (await index())["block_hashes"] == sorted(model.blocks)
            outer.cancel_scope.cancel()
    finally:
        zmq_trio.close(sub)
        fake.close()

    assert scrapes == sorted(scrapes), "a counter went backwards"
    page = await scrape(worker)
    assert metric(page, "dynamo_component_requests_total", dynamo_endpoint="generate") == sent == finished
    assert metric(page, "dynamo_component_inflight_requests", dynamo_endpoint="generate") == 0
    for path in ("root/kv_events", "root/metrics"):
        assert metric(page, "dynamo_component_actor_restarts_total", actor=path) == KILLS_PER_ACTOR
        assert metric(page, "dynamo_component_actor_up", actor=path) == 1
    assert metric(page, "dynamo_component_kv_events_total", outcome="relayed") == BATCHES
    assert metric(page, "dynamo_component_kv_events_total", outcome="lost") == 0
    assert metric(page, "dynamo_component_total_blocks", dp_rank="0") == 1024
    worker.signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(worker.wait) == 0
    assert not worker.leftovers()
