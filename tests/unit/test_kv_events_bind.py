"""The KV event relay on the worker's default endpoint: vLLM connects to
``tcp://127.0.0.1:port`` and the relay binds it, on loopback only.

The bound SUB socket belongs to the state, not the actor: killing the relay
neither frees the port nor loses a batch, and a port someone else holds delays
the relay (logged, tried again) without failing the worker.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from actors import kv_events
from actors.kv_events import KvEventsRelay, KvEventsState, kv_event_sources
from supervisor.config import parse_args
from supervisor.planes.events import MemoryEventPublisher
from supervisor.tree import ActorRegistry, Backoff, ChildSpec, Restart, Supervisor, root_context
from tests.kvfake import FakeVllmPublisher, IndexModel, free_port_pair, stored, wait_until, workload


def listening_on(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (a bind attempt fails)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_the_default_endpoints_are_loopback_and_bound_by_the_relay() -> None:
    c = parse_args(["--engine", "synthetic"], {"DYN_VLLM_KV_EVENT_PORT": "24000"})
    assert c.kv_events_config is not None
    assert (c.kv_events_config["endpoint"], c.kv_events_config["replay_endpoint"]) == (
        "tcp://127.0.0.1:24000", "tcp://127.0.0.1:25000")
    first, second = kv_event_sources(c.kv_events_config, [0, 1])
    assert (first.endpoint, first.replay_endpoint, first.bind) == ("tcp://127.0.0.1:24000",
                                                                   "tcp://127.0.0.1:25000", True)
    assert (second.endpoint, second.replay_endpoint, second.bind) == ("tcp://127.0.0.1:24001",
                                                                      "tcp://127.0.0.1:25001", True)
    # DYN_VLLM_KV_EVENT_HOST moves them; 0.0.0.0 asks for every interface
    wide = parse_args(["--engine", "synthetic"], {"DYN_VLLM_KV_EVENT_HOST": "0.0.0.0"}).kv_events_config
    assert wide is not None and wide["endpoint"] == "tcp://0.0.0.0:20080"


@asynccontextmanager
async def bound_relay(port: int, replay_port: int) -> AsyncIterator[tuple[KvEventsState, MemoryEventPublisher,
                                                                          ActorRegistry]]:
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{port}",
           "replay_endpoint": f"tcp://127.0.0.1:{replay_port}"}
    state = KvEventsState.for_sources(kv_event_sources(cfg, [0]), namespace="ns", worker_id="w1")
    publisher = MemoryEventPublisher()
    registry = ActorRegistry()
    sup = Supervisor([ChildSpec("kv_events", KvEventsRelay(state, publisher, replay_timeout=1.0, settle_s=0.05).run,
                                Restart.PERMANENT, shutdown=1.0, backoff=Backoff(base=0.001, cap=0.01))],
                     intensity=1000, period=1.0)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run, root_context(registry))
            yield state, publisher, registry
            nursery.cancel_scope.cancel()
    finally:
        state.close()


def event_ids(publisher: MemoryEventPublisher) -> list[int]:
    import json

    return [json.loads(p)["event_id"] for p in publisher.on("ns.kv-events")]


async def test_killing_the_relay_keeps_the_port_and_loses_nothing() -> None:
    port = free_port_pair()
    batches = workload(300, seed=5)
    model = IndexModel()
    async with bound_relay(port, port + 1000) as (state, publisher, registry):
        stream = state.streams[0]
        socket_before = stream.bound
        assert socket_before is not None and listening_on(port)
        fake = FakeVllmPublisher(port=port, replay_port=port + 1000, connect=True)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fake.serve_replay)
                await trio.sleep(0.3)
                kills = 0
                for i, events in enumerate(batches):
                    await fake.publish(events)
                    model.apply(events)
                    if i % 30 == 15:
                        assert registry.kill("root/kv_events")
                        kills += 1
                        assert listening_on(port), "the port was let go during a restart"
                    await trio.sleep(0.002)
                await wait_until(lambda: stream.last_seq == len(batches) - 1)
                nursery.cancel_scope.cancel()
        finally:
            fake.close()
        cell = registry.get("root/kv_events")
        assert cell is not None and cell.restarts == kills
        assert stream.bound is socket_before, "one socket for the relay's whole life"
        assert event_ids(publisher) == list(range(len(batches)))
        assert stream.blocks == model.blocks and stream.lost == 0
    # ZMQ closes a socket on its I/O thread, a moment after close() returns
    with trio.fail_after(5):
        while listening_on(port):  # noqa: ASYNC110 (the kernel has no event for a port let go)
            await trio.sleep(0.01)


async def test_a_taken_port_delays_the_relay_without_failing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_events, "BIND_RETRY_S", 0.05)
    port = free_port_pair()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen(1)
    with capture_logs() as logs:
        async with bound_relay(port, port + 1000) as (state, publisher, _):
            stream = state.streams[0]
            assert stream.bound is None  # started anyway
            await wait_until(lambda: stream.bind_failures >= 2)
            holder.close()
            await wait_until(lambda: stream.bound is not None)
            fake = FakeVllmPublisher(port=port, replay_port=port + 1000, connect=True)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(fake.serve_replay)
                    await trio.sleep(0.3)
                    await fake.publish([stored([1], None, [1, 2, 3, 4])])
                    await wait_until(lambda: stream.last_seq == 0)
                    nursery.cancel_scope.cancel()
            finally:
                fake.close()
            assert event_ids(publisher) == [0]
    failed: list[dict[str, Any]] = [e for e in logs if e["event"] == "kv_events.bind_failed"]
    assert failed and failed[0]["endpoint"] == f"tcp://127.0.0.1:{port}"
    assert "DYN_VLLM_KV_EVENT_PORT" in failed[0]["hint"]
    assert [e["endpoint"] for e in logs if e["event"] == "kv_events.listening"] == [f"tcp://127.0.0.1:{port}"]
