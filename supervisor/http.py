"""Serving an ASGI app (Starlette) on trio with hypercorn, on a socket that
outlives the actor serving it.

The listening socket is bound once, by whoever owns the actor (a supervisor or
the process), and handed in: a restarted server comes back on the same port and
connections that arrive while it restarts wait in the kernel's backlog instead
of being refused.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Closed, RawData
from hypercorn.trio.run import worker_serve
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.utils import wrap_app

__all__ = ["BoundSocket", "serve_asgi"]


class BoundSocket:
    """A listening TCP socket bound at construction; ``port`` is the real port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, backlog: int = 512) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise OSError(exc.errno, f"cannot bind {host}:{port}: {exc.strerror}") from None
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        self.host = host
        self.port: int = self.sock.getsockname()[1]

    def dup(self) -> socket.socket:
        """A new socket object on the same listening socket, for one server run
        (hypercorn closes what it is given when it stops)."""
        fd = os.dup(self.sock.fileno())
        dup = socket.socket(self.sock.family, socket.SOCK_STREAM, fileno=fd)
        dup.setblocking(False)
        return dup

    def close(self) -> None:
        self.sock.close()

    def __repr__(self) -> str:
        return f"BoundSocket({self.host}:{self.port})"


def _direct_protocol_send() -> Callable[[Any, Any], Awaitable[None]]:
    """hypercorn's ``TCPServer.protocol_send`` takes a lock and goes through trio's
    ``send_all`` for every write: two trips through the scheduler per SSE chunk, the
    largest share of the HTTP front's cost per streamed token (bench/RESULTS.md). This
    one, when no write is in progress on a plain TCP connection, writes straight to the
    non-blocking socket under the same lock, and gives what the socket does not take
    (full, or broken: ``send_all`` then raises as before) to ``send_all``, still under
    the lock, so order, shielding and error handling are hypercorn's. Written against
    hypercorn 0.18 (tests/unit/test_http_direct_send.py)."""
    original = TCPServer.protocol_send

    async def protocol_send(self: Any, event: Any) -> None:
        stream = self.stream
        if type(event) is not RawData or type(stream) is not trio.SocketStream or self.send_lock.locked():
            await original(self, event)
            return
        await trio.lowlevel.checkpoint_if_cancelled()  # as the lock's acquire did
        self.send_lock.acquire_nowait()
        try:
            data = event.data
            try:
                sent = os.write(stream.socket.fileno(), data)
            except OSError:
                sent = 0
            if sent < len(data):
                try:
                    with trio.CancelScope(shield=True):
                        await stream.send_all(data[sent:])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.protocol.handle(Closed())
        finally:
            self.send_lock.release()

    protocol_send.original = original  # type: ignore[attr-defined]
    return protocol_send


if not hasattr(TCPServer.protocol_send, "original"):
    TCPServer.protocol_send = _direct_protocol_send()  # type: ignore[method-assign,assignment]


def hypercorn_config(graceful_timeout: float = 1.0) -> HypercornConfig:
    config = HypercornConfig()
    config.graceful_timeout = graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    return config


async def serve_asgi(
    app: Any,
    bound: BoundSocket,
    *,
    graceful_timeout: float = 1.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``bound`` until cancelled."""
    config = hypercorn_config(graceful_timeout)
    sockets = Sockets(secure_sockets=[], insecure_sockets=[bound.dup()], quic_sockets=[])

    async with trio.open_nursery() as nursery:
        wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
        await nursery.start(partial(worker_serve, wrapped, config, sockets=sockets))
        task_status.started()
