"""The TCP plane writes each frame straight to the socket when nothing is queued, and
through the connection's writer otherwise. A client that stops reading fills the socket:
frames then queue (up to the queue's bound, then the request waits). Either way every
frame arrives whole, once, in order, on streams that share a connection too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from actors.protocol import Data, End, Error, FrameReader, Request, encode_frame
from tests.procs import Worker, worker_fixture
from tests.synthetic import continuation


def _ready_fast_worker(tmp_path: Path, *extra: str) -> Iterator[Worker]:
    """A synthetic worker with zero step time: it streams as fast as the tree can."""
    gen = worker_fixture("--engine", "synthetic", "--synthetic-step-ms", "0", *extra,
                         env={"DYN_FILE_DISCOVERY_DIR": str(tmp_path)})
    worker = next(gen)
    worker.wait_ready()
    try:
        yield worker
    finally:
        gen.close()


@pytest.fixture
def fast_worker(tmp_path: Path) -> Iterator[Worker]:
    yield from _ready_fast_worker(tmp_path)


def expected(prompt: list[int], n: int) -> list[int]:
    return continuation(prompt, n)


async def test_a_client_that_stops_reading_gets_every_frame_in_order(fast_worker: Worker) -> None:
    port = fast_worker.wait_event("request_plane.listening")["port"]
    n = 20000  # ~1 MB of frames per stream: more than the socket buffers hold
    prompts = {"a": [1, 2, 3], "b": [7, 8, 9, 10]}
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for rid, prompt in prompts.items():  # two streams multiplexed on one connection
            payload = {"token_ids": prompt, "stop_conditions": {"max_tokens": n}}
            await stream.send_all(encode_frame(Request(rid, "generate", payload)))
        await trio.sleep(1.0)  # read nothing for a while: the socket fills, frames queue
        reader = FrameReader()
        tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
        ended: set[str] = set()
        with trio.fail_after(60):
            while len(ended) < len(prompts):
                data = await stream.receive_some(65536)
                assert data, "the worker hung up"
                for frame in reader.feed(data):
                    assert not isinstance(frame, Error), frame
                    assert frame.id not in ended, f"a frame after the end of {frame.id}"
                    if isinstance(frame, Data):
                        tokens[frame.id] += frame.payload["token_ids"]
                    elif isinstance(frame, End):
                        ended.add(frame.id)
    for rid, prompt in prompts.items():
        assert tokens[rid] == expected(prompt, n)


async def test_a_client_that_resets_its_connection_cuts_no_other_stream(fast_worker: Worker) -> None:
    """A client closing with unread data (or SO_LINGER 0) makes the worker's next read fail
    with a reset, not an end of file: that connection ends, the others stream on."""
    import socket
    import struct

    port = fast_worker.wait_event("request_plane.listening")["port"]
    n = 20000
    survivor = await trio.open_tcp_stream("127.0.0.1", port)
    async with survivor:
        await survivor.send_all(encode_frame(Request("keep", "generate",
                                                     {"token_ids": [5], "stop_conditions": {"max_tokens": n}})))
        for _ in range(5):
            doomed = await trio.open_tcp_stream("127.0.0.1", port)
            await doomed.send_all(encode_frame(Request("drop", "generate",
                                                       {"token_ids": [6], "stop_conditions": {"max_tokens": n}})))
            await doomed.receive_some(100)
            doomed.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await doomed.aclose()  # -> RST
        reader = FrameReader()
        tokens: list[int] = []
        with trio.fail_after(60):
            while True:
                data = await survivor.receive_some(65536)
                assert data, "the worker hung up on a connection that did nothing wrong"
                frames = reader.feed(data)
                tokens += [t for f in frames if isinstance(f, Data) for t in f.payload["token_ids"]]
                if any(isinstance(f, End | Error) for f in frames):
                    assert not any(isinstance(f, Error) for f in frames), frames
                    break
    assert tokens == expected([5], n)
    assert not [e for e in fast_worker.events() if e.get("event") == "actor.crashed"]


@pytest.fixture
def fast_http_worker(tmp_path: Path) -> Iterator[Worker]:
    yield from _ready_fast_worker(tmp_path, "--http-port", "0")


def test_a_stalled_sse_reader_gets_every_event_once_in_order(fast_http_worker: Worker) -> None:
    """The HTTP front writes the events that piled up for a stream that fell behind in one
    body write: a reader that stalls still sees one event per token, in order, then the
    finish, the usage and [DONE], on two streams at once."""
    import json
    import threading
    import time

    import httpx

    port = fast_http_worker.wait_event("http.listening")["port"]
    n = 4000  # within the synthetic engine's 4096-token context, as vllm serve caps max_tokens
    results: dict[str, list[str]] = {}

    def read(name: str, prompt: str) -> None:
        body = {"model": "synthetic", "prompt": prompt, "max_tokens": n, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            time.sleep(1.0)  # stop reading: the socket fills, the engine runs ahead
            results[name] = [line for line in resp.iter_lines() if line]

    threads = [threading.Thread(target=read, args=(name, name)) for name in ("ab", "xyz")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for prompt in ("ab", "xyz"):
        lines = results[prompt]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert all(line.startswith("data: ") for line in lines)
        *chunks, usage = events
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == n
        assert len(chunks) == n, "one event per token"
        texts = [c["choices"][0]["text"] for c in chunks]
        assert texts == [f" {t}" for t in continuation(list(prompt.encode()), n)]
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (n - 1) + ["length"]
