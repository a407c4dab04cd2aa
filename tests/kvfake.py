"""A stand-in for vLLM's KV event publisher (``ZmqEventPublisher``), in the test process.

It speaks vLLM 0.32's exact wire format: PUB frames ``[topic, seq u64 BE,
msgpack [ts, events, dp_rank]]`` with events as tagged maps, a replay ROUTER
answering ``[b"", start_seq]`` with ``[b"", topic, seq, payload]`` per buffered
batch and an end marker whose seq is ``0xff * 8``. ``drop=True`` buffers a
batch without sending it live (a gap), ``send_raw`` sends any frames at all.
``connect=True`` connects the PUB socket to the port instead of binding it, as
vLLM does with the worker's default ``tcp://127.0.0.1:port`` endpoint (the
worker's relay binds it); the replay socket is bound either way, as in vLLM.
"""

from __future__ import annotations

import json
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import trio
import zmq

from supervisor.planes import zmq_trio

END_SEQ = (2**64 - 1).to_bytes(8, "big")


def stored(hashes: Sequence[int | bytes], parent: int | bytes | None, tokens: Sequence[int],
           block_size: int = 4) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": list(hashes), "parent_block_hash": parent,
            "token_ids": list(tokens), "block_size": block_size, "lora_id": None, "medium": "GPU",
            "lora_name": None}


def removed(hashes: Sequence[int | bytes]) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": list(hashes), "medium": "GPU"}


def cleared() -> dict[str, Any]:
    return {"type": "AllBlocksCleared"}


def encode_batch(events: Sequence[Any], dp_rank: int | None = 0, ts: float | None = None) -> bytes:
    return msgspec.msgpack.encode([time.time() if ts is None else ts, list(events), dp_rank])


def free_port_pair(offset: int = 1000) -> int:
    """A port P with P and P + offset both free (vLLM's replay port convention)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port + offset > 49151 or port < 1024:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + offset))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


class FakeVllmPublisher:
    def __init__(self, port: int = 0, replay_port: int | None = 0, *, buffer_steps: int = 10_000,
                 topic: bytes = b"", dp_rank: int = 0, connect: bool = False) -> None:
        self.topic = topic
        self.dp_rank = dp_rank
        self.pub = zmq_trio.socket(zmq.PUB, sndhwm=100_000)
        if connect:
            assert port, "connect needs the port the other side binds"
            self.pub.connect(f"tcp://127.0.0.1:{port}")
        self.port = port if port else self.pub.bind_to_random_port("tcp://127.0.0.1")
        if port and not connect:
            self.pub.bind(f"tcp://127.0.0.1:{port}")
        self.router: zmq.Socket[Any] | None = None
        self.replay_port: int | None = None
        if replay_port is not None:
            self.router = zmq_trio.socket(zmq.ROUTER)
            if replay_port:
                self.router.bind(f"tcp://127.0.0.1:{replay_port}")
                self.replay_port = replay_port
            else:
                self.replay_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.replay_requests: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def replay_endpoint(self) -> str | None:
        return None if self.replay_port is None else f"tcp://127.0.0.1:{self.replay_port}"

    async def publish(self, events: Sequence[Any], *, drop: bool = False) -> int:
        payload = encode_batch(events, self.dp_rank)
        return await self.publish_payload(payload, drop=drop)

    async def publish_payload(self, payload: bytes, *, drop: bool = False) -> int:
        seq, self.seq = self.seq, self.seq + 1
        self.buffer.append((seq, payload))
        if not drop:
            await zmq_trio.send_multipart(self.pub, [self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    async def send_raw(self, frames: Sequence[bytes]) -> None:
        await zmq_trio.send_multipart(self.pub, list(frames))

    async def serve_replay(self) -> None:
        assert self.router is not None
        while True:
            frames = await zmq_trio.recv_multipart(self.router)
            if len(frames) != 3:
                continue
            client, _, start_bytes = frames
            start = int.from_bytes(start_bytes, "big")
            self.replay_requests.append(start)
            for seq, payload in list(self.buffer):
                if seq >= start:
                    await zmq_trio.send_multipart(self.router, [client, b"", self.topic, seq.to_bytes(8, "big"),
                                                                payload])
            await zmq_trio.send_multipart(self.router, [client, b"", b"", END_SEQ, b""])

    def close(self) -> None:
        zmq_trio.close(self.pub)
        if self.router is not None:
            zmq_trio.close(self.router)


class IndexModel:
    """What the local index must hold after a sequence of events (per rank)."""

    def __init__(self) -> None:
        self.blocks: dict[int, int | None] = {}

    def apply(self, events: Sequence[dict[str, Any]]) -> None:
        for event in events:
            if event["type"] == "BlockStored":
                parent = event["parent_block_hash"]
                for h in event["block_hashes"]:
                    self.blocks[h] = parent
                    parent = h
            elif event["type"] == "BlockRemoved":
                for h in event["block_hashes"]:
                    self.blocks.pop(h, None)
            elif event["type"] == "AllBlocksCleared":
                self.blocks.clear()


def workload(n: int, *, seed: int = 0) -> list[list[dict[str, Any]]]:
    """``n`` batches: chains of stored blocks, some removals, a clear now and then."""
    import random

    rng = random.Random(seed)
    batches: list[list[dict[str, Any]]] = []
    live: list[int] = []
    next_hash = 1000
    for i in range(n):
        if i and i % 97 == 0:
            batches.append([cleared()])
            live.clear()
            continue
        events: list[dict[str, Any]] = []
        parent = live[-1] if live and rng.random() < 0.5 else None
        hashes = list(range(next_hash, next_hash + rng.randint(1, 3)))
        next_hash += len(hashes)
        events.append(stored(hashes, parent, list(range(4 * len(hashes)))))
        live.extend(hashes)
        if len(live) > 20 and rng.random() < 0.4:
            gone = [live.pop(0) for _ in range(rng.randint(1, 3))]
            events.append(removed(gone))
        batches.append(events)
    return batches


def relayed_messages(payloads: Sequence[bytes]) -> list[dict[str, Any]]:
    return [json.loads(p) for p in payloads]


async def settle() -> None:
    """Let ZMQ connections and subscriptions reach the other side (not a timing assert)."""
    await trio.sleep(0.3)


async def wait_until(pred: Callable[[], bool], limit_s: float = 20.0) -> None:
    """Poll ``pred`` (state owned by other tasks or processes) until it holds."""
    with trio.fail_after(limit_s):
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.01)
