"""Bad input on the TCP plane never disturbs other requests (synthetic engine)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.protocol import FrameReader, Request, encode_frame
from supervisor.client import Call, CallError
from tests.procs import Worker, worker_fixture


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    gen = worker_fixture("--engine", "synthetic", "--synthetic-step-ms", "0")
    w = next(gen)
    w.wait_ready()
    yield w
    gen.close()


def addr(w: Worker) -> tuple[str, int]:
    return "127.0.0.1", int(w.wait_event("request_plane.listening")["port"])


async def raw_exchange(w: Worker, data: bytes, wait: float = 1.0) -> list[object]:
    """Send raw bytes, collect whatever frames come back until the worker hangs up or `wait` passes."""
    stream = await trio.open_tcp_stream(*addr(w))
    reader = FrameReader()
    got: list[object] = []
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(wait):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                got.extend(reader.feed(chunk))
    return got


async def ok_request(w: Worker) -> None:
    payload = {"token_ids": [1, 2], "stop_conditions": {"max_tokens": 3}}
    async with Call(f"127.0.0.1:{addr(w)[1]}", "generate", payload) as c:
        assert len(await c.collect()) == 3


async def test_garbage_gets_an_error_frame_and_a_hang_up(worker: Worker) -> None:
    got = await raw_exchange(worker, struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
    assert len(got) == 1 and got[0].code == "invalid_frame"  # type: ignore[attr-defined]
    await ok_request(worker)


async def test_oversized_frame_is_refused(worker: Worker) -> None:
    got = await raw_exchange(worker, struct.pack(">I", 1 << 30))
    assert got and "exceeds" in got[0].message  # type: ignore[attr-defined]
    await ok_request(worker)


async def test_unknown_endpoint_and_wrong_types(worker: Worker) -> None:
    host, port = addr(worker)
    with pytest.raises(CallError) as info:
        async with Call(f"{host}:{port}", "nope", {}) as c:
            await c.collect()
    assert info.value.code == "not_found" and "generate" in info.value.message
    with pytest.raises(CallError) as info:
        bad = {"token_ids": [1], "stop_conditions": {"max_tokens": "x"}}
        async with Call(f"{host}:{port}", "generate", bad) as c:
            await c.collect()
    assert info.value.code == "invalid_request" and "max_tokens" in info.value.message


async def test_truncated_frame_then_hang_up_leaves_others_alone(worker: Worker) -> None:
    frame = encode_frame(Request("half", "generate", {"token_ids": [1]}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ok_request, worker)
        await raw_exchange(worker, frame[: len(frame) // 2], wait=0.2)
        nursery.start_soon(ok_request, worker)


async def test_empty_and_wrong_kind_frames_are_errors(worker: Worker) -> None:
    got = await raw_exchange(worker, struct.pack(">I", 0), wait=0.5)
    assert got and got[0].code == "invalid_frame"  # type: ignore[attr-defined]
    data = msgspec.msgpack.encode({"type": "end", "id": "x"})  # only workers send end frames
    got = await raw_exchange(worker, struct.pack(">I", len(data)) + data, wait=0.5)
    assert got and got[0].code == "invalid_frame"  # type: ignore[attr-defined]
    await ok_request(worker)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.recursive(st.none() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=4) | st.floats(),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(
                                st.sampled_from(["token_ids", "sampling_options", "stop_conditions", "model"]),
                                c, max_size=3), max_leaves=8))
def test_fuzzed_payloads_get_an_answer(worker: Worker, payload: object) -> None:
    async def go() -> None:
        try:
            async with Call(f"127.0.0.1:{addr(worker)[1]}", "generate", payload) as c:
                with trio.fail_after(5):
                    await c.collect()
        except CallError as exc:
            assert exc.code in ("invalid_request", "not_found")
    trio.run(go)
