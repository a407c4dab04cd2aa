"""The KV event relay, in process, fed by a fake vLLM publisher speaking vLLM's wire format."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import trio
from structlog.testing import capture_logs

from actors.errors import RequestError
from actors.kv_events import (
    AllBlocksCleared,
    BadBatch,
    BlockRemoved,
    BlockStored,
    KvEventSource,
    KvEventsRelay,
    KvEventsState,
    decode_batch,
    kv_event_sources,
    normalize_hash,
)
from supervisor.planes.events import MemoryEventPublisher
from supervisor.tree import ActorRegistry, Backoff, ChildSpec, Restart, Supervisor, root_context
from tests.kvfake import (
    FakeVllmPublisher,
    IndexModel,
    cleared,
    encode_batch,
    removed,
    stored,
    wait_until,
    workload,
)

# -- decoding -------------------------------------------------------------------------------------


def test_decodes_vllm_tagged_map_batches() -> None:
    payload = encode_batch([stored([b"\x01" * 32, 7], None, [1, 2, 3, 4, 5, 6, 7, 8]), removed([7]), cleared()],
                           dp_rank=3, ts=12.5)
    batch = decode_batch(payload)
    assert batch.ts == 12.5 and batch.dp_rank == 3 and batch.skipped == []
    first, second, third = batch.events
    assert isinstance(first, BlockStored)
    assert first.block_hashes == (int.from_bytes(b"\x01" * 8, "big"), 7)
    assert first.parent_hash is None and first.token_ids == tuple(range(1, 9)) and first.medium == "GPU"
    assert second == BlockRemoved((7,), "GPU")
    assert isinstance(third, AllBlocksCleared)


def test_decodes_tagged_array_events_and_map_batches() -> None:
    """The spec's array form ``BlockStored [hashes, parent, tokens, block_size, lora_id, medium, lora_name]``."""
    raw = {"ts": 1.0, "events": [["BlockStored", [5, 6], 4, [1, 2], 1, None, "CPU", None], ["AllBlocksCleared"]],
           "data_parallel_rank": 0}
    batch = decode_batch(msgspec.msgpack.encode(raw))
    assert batch.events[0] == BlockStored((5, 6), 4, (1, 2), 1, None, "CPU", None)
    assert isinstance(batch.events[1], AllBlocksCleared)


def test_block_hashes_become_u64_like_vllms_int_mode() -> None:
    digest = bytes(range(32))
    assert normalize_hash(digest) == int.from_bytes(digest, "big") & (2**64 - 1)
    assert normalize_hash(2**64 + 5) == 5
    with pytest.raises(BadBatch):
        normalize_hash("abc")


@pytest.mark.parametrize(
    "payload",
    [b"\xc1\xc1", msgspec.msgpack.encode(5), msgspec.msgpack.encode([1.0]), msgspec.msgpack.encode(["x", []]),
     msgspec.msgpack.encode([1.0, {"a": 1}]), msgspec.msgpack.encode([1.0, [], "rank"])],
)
def test_payloads_that_are_not_batches_are_refused(payload: bytes) -> None:
    with pytest.raises(BadBatch):
        decode_batch(payload)


def test_bad_or_unknown_events_are_skipped_not_fatal() -> None:
    payload = encode_batch([
        {"type": "BlockTeleported", "block_hashes": [1]},
        {"type": "BlockStored", "block_hashes": "nope", "parent_block_hash": None, "token_ids": [],
         "block_size": 4},
        {"no": "tag"},
        42,
        stored([9], None, [1, 2, 3, 4]),
    ])
    batch = decode_batch(payload)
    assert [type(e) for e in batch.events] == [BlockStored]
    assert len(batch.skipped) == 4
    assert "unknown KV event type 'BlockTeleported'" in batch.skipped[0]


def test_sources_follow_vllms_port_offsets() -> None:
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:20080",
           "replay_endpoint": "tcp://*:21080"}
    first, second = kv_event_sources(cfg, [0, 1])
    assert first == KvEventSource(0, "tcp://127.0.0.1:20080", "tcp://127.0.0.1:21080", bind=False)
    assert second == KvEventSource(1, "tcp://127.0.0.1:20081", "tcp://127.0.0.1:21081", bind=False)
    # vLLM connects to a concrete address: we bind there
    (only,) = kv_event_sources({**cfg, "endpoint": "tcp://10.0.0.5:7000", "replay_endpoint": None}, [0])
    assert only == KvEventSource(0, "tcp://10.0.0.5:7000", None, bind=True)
    assert kv_event_sources({**cfg, "enable_kv_cache_events": False}, [0]) == []
    assert kv_event_sources(None, [0]) == []


# -- the relay in a tree ----------------------------------------------------------------------------


@dataclass
class Relay:
    state: KvEventsState
    publisher: MemoryEventPublisher
    registry: ActorRegistry

    @property
    def stream(self) -> Any:
        return self.state.streams[0]

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.publisher.on("ns.kv-events")]

    def event_ids(self) -> list[int]:
        return [m["event_id"] for m in self.messages()]

    def kill(self) -> bool:
        return self.registry.kill("root/kv_events")

    def restarts(self) -> int:
        cell = self.registry.get("root/kv_events")
        assert cell is not None
        return cell.restarts


@asynccontextmanager
async def relay_tree(fake: FakeVllmPublisher, *, replay: bool = True, settle_s: float = 0.2,
                     start: bool = True) -> AsyncIterator[tuple[Relay, Callable[[], Any]]]:
    publisher = MemoryEventPublisher()
    source = KvEventSource(0, fake.endpoint, fake.replay_endpoint if replay else None)
    state = KvEventsState.for_sources([source], namespace="ns", worker_id="w1")
    relay = KvEventsRelay(state, publisher, replay_timeout=1.0, settle_s=settle_s)
    registry = ActorRegistry()
    sup = Supervisor([ChildSpec("kv_events", relay.run, Restart.PERMANENT, shutdown=1.0,
                                backoff=Backoff(base=0.001, cap=0.01))],
                     intensity=1000, period=1.0)
    async with trio.open_nursery() as nursery:
        if fake.router is not None:
            nursery.start_soon(fake.serve_replay)

        async def start_tree() -> None:
            await nursery.start(sup.run, root_context(registry))

        if start:
            await start_tree()
        yield Relay(state, publisher, registry), start_tree
        nursery.cancel_scope.cancel()


@pytest.fixture
def fake() -> Any:
    pub = FakeVllmPublisher()
    yield pub
    pub.close()


async def test_relays_every_batch_in_order_and_keeps_the_index(fake: FakeVllmPublisher) -> None:
    batches = workload(150)
    model = IndexModel()
    async with relay_tree(fake) as (relay, _):
        await trio.sleep(0.3)  # let the subscription arrive (the replay would cover it anyway)
        for events in batches:
            await fake.publish(events)
            model.apply(events)
        await wait_until(lambda: relay.stream.last_seq == len(batches) - 1)
        assert relay.event_ids() == list(range(len(batches)))
        first = relay.messages()[0]
        assert first["worker_id"] == "w1" and first["dp_rank"] == 0
        assert first["events"][0]["type"] == "stored"
        assert relay.stream.blocks == model.blocks
        answers: list[Any] = []

        async def emit(item: Any) -> None:
            answers.append(item)

        await relay.state.kv_index({}, emit, "r1")
        (rank,) = answers[0]["ranks"]
        assert rank["block_hashes"] == sorted(model.blocks) and rank["last_event_id"] == len(batches) - 1
        with pytest.raises(RequestError, match="dp_rank 5 is not served here"):
            await relay.state.kv_index({"dp_rank": 5}, emit, "r2")
        assert relay.restarts() == 0


async def test_a_gap_is_filled_from_the_replay_socket(fake: FakeVllmPublisher) -> None:
    async with relay_tree(fake) as (relay, _):
        await trio.sleep(0.3)
        for i in range(30):
            await fake.publish([stored([i], None, [1, 2, 3, 4])], drop=10 <= i < 20)
        await wait_until(lambda: relay.stream.last_seq == 29)
        assert relay.event_ids() == list(range(30))
        assert relay.stream.gaps == 1 and relay.stream.lost == 0 and relay.stream.replayed >= 10
        assert set(relay.stream.blocks) == set(range(30))


async def test_a_late_relay_catches_up_from_the_replay_buffer(fake: FakeVllmPublisher) -> None:
    """Batches published before the relay subscribed come from the replay socket, in order."""
    async with relay_tree(fake, start=False) as (relay, start):
        for i in range(20):
            await fake.publish([stored([i], None, [1, 2, 3, 4])])
        await start()
        await wait_until(lambda: relay.stream.last_seq == 19)
        await fake.publish([stored([20], None, [1, 2, 3, 4])])
        await wait_until(lambda: relay.stream.last_seq == 20)
        assert relay.event_ids() == list(range(21))


async def test_what_the_replay_buffer_lost_is_logged_not_hidden() -> None:
    fake = FakeVllmPublisher(buffer_steps=5)
    try:
        with capture_logs() as logs:
            async with relay_tree(fake) as (relay, _):
                await trio.sleep(0.3)
                await fake.publish([stored([0], None, [1, 2, 3, 4])])
                await wait_until(lambda: relay.stream.last_seq == 0)
                for i in range(1, 11):
                    await fake.publish([stored([i], None, [1, 2, 3, 4])], drop=True)
                await fake.publish([stored([11], None, [1, 2, 3, 4])])
                await wait_until(lambda: relay.stream.last_seq == 11)
                # 1..6 fell out of the 5-batch buffer; 7..11 came back by replay
                assert relay.event_ids() == [0, 7, 8, 9, 10, 11]
                assert relay.stream.lost == 6
    finally:
        fake.close()
    lost = [e for e in logs if e["event"] == "kv_events.lost"]
    assert lost and lost[0]["first"] == 1 and lost[0]["last"] == 6


async def test_malformed_frames_and_unknown_events_are_survived(fake: FakeVllmPublisher) -> None:
    with capture_logs() as logs:
        async with relay_tree(fake) as (relay, _):
            await trio.sleep(0.3)
            await fake.publish([stored([1], None, [1, 2, 3, 4])])  # 0
            await fake.send_raw([b"only one frame"])
            await fake.send_raw([b"", b"short", b"payload"])
            await fake.send_raw([b"", (1).to_bytes(8, "big"), b"x", b"four frames"])
            await fake.publish_payload(b"\xc1 not msgpack")  # 1: consumed, counted, skipped
            await fake.publish_payload(msgspec.msgpack.encode({"not": "a batch"}))  # 2
            await fake.publish([{"type": "BlockTeleported"}, stored([2], 1, [5, 6, 7, 8])])  # 3
            # a frame claiming a sequence number vLLM never reached
            await fake.send_raw([b"", (10**12).to_bytes(8, "big"), encode_batch([stored([666], None, [0])])])
            await fake.publish([stored([3], 2, [9, 10, 11, 12])])  # 4
            await wait_until(lambda: relay.stream.last_seq == 4)
            assert relay.event_ids() == [0, 3, 4]
            assert set(relay.stream.blocks) == {1, 2, 3}
            assert relay.stream.skipped_events == 1
            assert relay.stream.bad_frames == 6
            assert relay.restarts() == 0
    names = {e["event"] for e in logs}
    assert {"kv_events.bad_frame", "kv_events.bad_batch", "kv_events.skipped_events"} <= names


async def test_a_failed_publish_crashes_the_relay_and_the_batch_comes_back(fake: FakeVllmPublisher) -> None:
    async with relay_tree(fake) as (relay, _):
        await trio.sleep(0.3)
        relay.publisher.fail_next = 1
        for i in range(5):
            await fake.publish([stored([i], None, [1, 2, 3, 4])])
        await wait_until(lambda: relay.stream.last_seq == 4)
        assert relay.event_ids() == list(range(5))
        assert relay.restarts() == 1


async def test_killing_the_relay_under_load_loses_and_repeats_nothing(fake: FakeVllmPublisher) -> None:
    """Killed 40 times while batches stream in: every batch is relayed exactly
    once, in order, and the index equals the one built from all of them."""
    batches = workload(800, seed=7)
    model = IndexModel()
    kills = 40
    async with relay_tree(fake, settle_s=0.05) as (relay, _):
        await trio.sleep(0.3)

        async def produce() -> None:
            for events in batches:
                await fake.publish(events)
                model.apply(events)
                await trio.sleep(0.003)

        kill_points: list[int] = []

        async def killer() -> None:
            done = 0
            while done < kills:
                await trio.sleep(0.03)
                if relay.kill():
                    kill_points.append(fake.seq)
                    done += 1
                    await wait_until(lambda n=done: relay.restarts() == n)  # type: ignore[misc]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(killer)
        assert fake.seq == len(batches)
        assert any(0 < point < len(batches) for point in kill_points)  # killed while batches streamed in
        await wait_until(lambda: relay.stream.last_seq == len(batches) - 1)
        assert relay.restarts() == kills
        assert relay.event_ids() == list(range(len(batches)))
        assert relay.stream.blocks == model.blocks
        assert relay.stream.lost == 0 and relay.stream.bad_frames == 0


async def test_without_a_replay_socket_a_gap_is_logged_as_lost(fake: FakeVllmPublisher) -> None:
    with capture_logs() as logs:
        async with relay_tree(fake, replay=False) as (relay, _):
            await trio.sleep(0.3)
            for i in range(6):
                await fake.publish([stored([i], None, [1, 2, 3, 4])], drop=i in (2, 3))
            await wait_until(lambda: relay.stream.last_seq == 5)
            assert relay.event_ids() == [0, 1, 4, 5]
            assert relay.stream.lost == 2 and relay.restarts() == 0
    assert [(e["first"], e["last"]) for e in logs if e["event"] == "kv_events.lost"] == [(2, 3)]
