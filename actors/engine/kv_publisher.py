"""KV cache events in vLLM's own wire format, for engines that are not vLLM (the
synthetic engine): the worker's KV event relay, and through it a frontend's KV
router, cannot tell them from vLLM's.

vLLM 0.32's format: a PUB socket sends ``[topic, seq (u64 big-endian), msgpack
EventBatch [ts, events, dp_rank]]``, events as tagged maps (``BlockStored``,
``BlockRemoved``, ``AllBlocksCleared``); a ROUTER replay socket answers
``[b"", start_seq]`` with ``[b"", topic, seq, payload]`` for each buffered batch
from ``start_seq`` on, then an end marker whose seq is ``0xff`` x 8. Like vLLM,
the PUB socket binds a wildcard endpoint and connects to any other (the
worker's relay binds ``tcp://127.0.0.1:port``), and the replay socket binds.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog
import trio
import zmq

from supervisor.planes import zmq_trio

__all__ = ["KvEventPublisher", "all_cleared", "block_stored", "blocks_removed"]

_log = structlog.get_logger("actors.engine.kv_publisher")
END_SEQ = (2**64 - 1).to_bytes(8, "big")


def block_stored(hashes: Sequence[int], parent: int | None, token_ids: Sequence[int], block_size: int
                 ) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": list(hashes), "parent_block_hash": parent,
            "token_ids": list(token_ids), "block_size": block_size, "lora_id": None, "medium": "GPU",
            "lora_name": None}


def blocks_removed(hashes: Sequence[int]) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": list(hashes), "medium": "GPU"}


def all_cleared() -> dict[str, Any]:
    return {"type": "AllBlocksCleared"}


def _binds(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KvEventPublisher:
    def __init__(self, endpoint: str, replay_endpoint: str | None, *, dp_rank: int = 0, buffer: int = 10_000,
                 topic: bytes = b"") -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.dp_rank = dp_rank
        self.topic = topic
        self.seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer)
        self._pub = zmq_trio.socket(zmq.PUB, sndhwm=100_000)
        self._router: Any = None
        try:
            if _binds(endpoint):
                self._pub.bind(endpoint.replace("*", "0.0.0.0", 1) if endpoint.startswith("tcp://*") else endpoint)
            else:
                self._pub.connect(endpoint)
            if replay_endpoint:
                self._router = zmq_trio.socket(zmq.ROUTER)
                self._router.bind(replay_endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"KV event publisher: cannot open {endpoint} / {replay_endpoint}: {exc}") from None

    async def publish(self, events: Sequence[dict[str, Any]]) -> None:
        if not events:
            return
        payload = msgspec.msgpack.encode([time.time(), list(events), self.dp_rank])
        seq = self.seq
        self.seq += 1
        self._buffer.append((seq, payload))
        await zmq_trio.send_multipart(self._pub, [self.topic, seq.to_bytes(8, "big"), payload])

    async def serve_replay(self) -> None:
        """Answer replay requests until cancelled."""
        if self._router is None:
            await trio.sleep_forever()
        while True:
            frames = await zmq_trio.recv_multipart(self._router)
            if len(frames) < 3:
                continue
            identity, start = frames[0], int.from_bytes(frames[-1], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await zmq_trio.send_multipart(self._router, [identity, b"", self.topic,
                                                                 seq.to_bytes(8, "big"), payload])
            await zmq_trio.send_multipart(self._router, [identity, b"", self.topic, END_SEQ, b""])

    def close(self) -> None:
        zmq_trio.close(self._pub)
        if self._router is not None:
            zmq_trio.close(self._router)
