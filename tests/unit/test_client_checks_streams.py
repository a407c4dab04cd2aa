"""The request-plane client never reports part of an answer as the answer: against a TCP
peer that sends exactly the frames each case needs (a gap, a wrong count, a hang-up, silence),
the call ends with a migratable error naming the request id."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from actors.protocol import Data, End, FrameReader, Heartbeat, Request, encode_frame
from supervisor.client import Call, CallError

Script = Callable[[trio.SocketStream, str], Awaitable[None]]


async def run_call(nursery: trio.Nursery, script: Script, silence_timeout: float = 10.0) -> list[object]:
    async def handler(stream: trio.SocketStream) -> None:
        reader = FrameReader()
        request = None
        while request is None:
            for frame in reader.feed(await stream.receive_some(65536)):
                if isinstance(frame, Request):
                    request = frame
        await script(stream, request.id)
        await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    port = listeners[0].socket.getsockname()[1]
    async with Call(f"127.0.0.1:{port}", "generate", {}, request_id="r-42", silence_timeout=silence_timeout) as call:
        return await call.collect()


def items(*seqs: int, request_id: str) -> bytes:
    return b"".join(encode_frame(Data(request_id, {"token_ids": [s]}, s)) for s in seqs)


async def test_a_whole_stream_with_heartbeats_between_items() -> None:
    async def script(stream: trio.SocketStream, rid: str) -> None:
        await stream.send_all(items(0, 1, request_id=rid) + encode_frame(Heartbeat(rid)) + items(2, request_id=rid)
                              + encode_frame(End(rid, 3, "length")))

    async with trio.open_nursery() as nursery:
        got = await run_call(nursery, script)
        nursery.cancel_scope.cancel()
    assert got == [{"token_ids": [0]}, {"token_ids": [1]}, {"token_ids": [2]}]


@pytest.mark.parametrize(("frames", "code", "needle"), [
    (lambda rid: items(0, 1, 3, request_id=rid), "stream_broken", "item 3 arrived where item 2 was due"),
    (lambda rid: items(0, 1, request_id=rid) + encode_frame(End(rid, 5, "length")), "stream_broken",
     "the worker sent 5 items, 2 arrived"),
    (lambda rid: items(0, 1, 1, request_id=rid), "stream_broken", "arrived again"),
], ids=["gap", "short-end", "duplicate"])
async def test_a_broken_stream_is_a_migratable_error(frames: Callable[[str], bytes], code: str, needle: str) -> None:
    async def script(stream: trio.SocketStream, rid: str) -> None:
        await stream.send_all(frames(rid))

    async with trio.open_nursery() as nursery:
        with pytest.raises(CallError) as info:
            await run_call(nursery, script)
        nursery.cancel_scope.cancel()
    assert (info.value.code, info.value.migratable, info.value.request_id) == (code, True, "r-42")
    assert needle in info.value.message and "r-42" in info.value.message


async def test_a_hang_up_before_the_end_is_a_migratable_error() -> None:
    async def script(stream: trio.SocketStream, rid: str) -> None:
        await stream.send_all(items(0, 1, request_id=rid))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        with pytest.raises(CallError) as info:
            await run_call(nursery, script)
        nursery.cancel_scope.cancel()
    assert (info.value.code, info.value.migratable) == ("disconnected", True)
    assert "after 2 items" in info.value.message


async def test_silence_ends_the_call(autojump_clock: trio.testing.MockClock) -> None:
    async def script(stream: trio.SocketStream, rid: str) -> None:
        await stream.send_all(items(0, request_id=rid))  # then nothing, not even a heartbeat

    async with trio.open_nursery() as nursery:
        with pytest.raises(CallError) as info:
            await run_call(nursery, script, silence_timeout=5.0)
        nursery.cancel_scope.cancel()
    assert (info.value.code, info.value.migratable) == ("timeout", True)
