"""Our hypercorn write path (supervisor/http.py): straight to the socket when it can,
hypercorn's own send_all otherwise. Whatever path a write takes, bytes arrive whole and
in order."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import h11
import trio

from supervisor.http import BoundSocket, serve_asgi

CHUNK = 4096


def _app(chunks: int) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for i in range(chunks):
            await send({"type": "http.response.body", "body": f"{i:08d}".encode().ljust(CHUNK, b"."),
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def _get(port: int, delay: float) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")])))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        await trio.sleep(delay)  # let the server fill the socket buffer and queue the rest
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)


def test_written_for_the_pinned_hypercorn() -> None:
    from hypercorn.trio.tcp_server import TCPServer

    assert version("hypercorn").startswith("0.18."), "re-check supervisor/http.py's protocol_send against it"
    assert hasattr(TCPServer.protocol_send, "original")


async def test_streamed_chunks_arrive_whole_and_in_order_fast_or_slow_reader() -> None:
    """A slow reader makes the socket refuse writes: those go through send_all, in order."""
    chunks = 2000  # 8 MB: more than the socket buffers hold
    bound = BoundSocket("127.0.0.1", 0)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_asgi, _app(chunks), bound)
            for delay in (0.0, 0.5):
                body = await _get(bound.port, delay)
                assert len(body) == chunks * CHUNK
                numbers = [int(body[i * CHUNK : i * CHUNK + 8]) for i in range(chunks)]
                assert numbers == list(range(chunks))
            nursery.cancel_scope.cancel()
    finally:
        bound.close()
