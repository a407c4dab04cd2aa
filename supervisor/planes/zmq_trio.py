"""pyzmq sockets driven from trio, without an asyncio loop.

A ZMQ socket exposes one file descriptor (``zmq.FD``) that becomes readable
when the socket's *state* may have changed, edge-triggered: the real state is
in ``zmq.EVENTS``, and reading ``zmq.EVENTS`` re-arms the descriptor. So every
wait checks ``zmq.EVENTS`` first and only then parks on the descriptor with
``trio.lowlevel.wait_readable``. A bounded park (``RECHECK_S``) makes a missed
edge cost a short delay instead of a hang.

Every socket made here has ``LINGER 0``: closing never blocks the process on
unsent messages (event streams are best effort on the wire; the replay socket
fills gaps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import trio
import zmq

__all__ = ["RECHECK_S", "close", "context", "recv_multipart", "send_multipart", "socket", "wait"]

RECHECK_S = 0.5

_context: zmq.Context[Any] | None = None


def context() -> zmq.Context[Any]:
    """The process's ZMQ context for the tree's own sockets."""
    global _context
    if _context is None or _context.closed:
        _context = zmq.Context()
    return _context


def socket(kind: int, **options: Any) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = context().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name.upper()), value)
    return sock


async def wait(sock: zmq.Socket[Any], flag: int) -> None:
    """Until ``sock`` can do ``flag`` (``zmq.POLLIN`` or ``zmq.POLLOUT``)."""
    while not cast(int, sock.getsockopt(zmq.EVENTS)) & flag:
        with trio.move_on_after(RECHECK_S):
            await trio.lowlevel.wait_readable(_fd(sock))


async def recv_multipart(sock: zmq.Socket[Any]) -> list[bytes]:
    while True:
        try:
            frames: list[bytes] = sock.recv_multipart(zmq.NOBLOCK)
            return frames
        except zmq.Again:
            await wait(sock, zmq.POLLIN)


async def send_multipart(sock: zmq.Socket[Any], frames: Sequence[bytes]) -> None:
    while True:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
            return
        except zmq.Again:
            await wait(sock, zmq.POLLOUT)


def _fd(sock: zmq.Socket[Any]) -> int:
    return cast(int, sock.getsockopt(zmq.FD))


def close(sock: zmq.Socket[Any]) -> None:
    """Close ``sock``, first telling trio its descriptor is going away."""
    if sock.closed:
        return
    try:
        trio.lowlevel.notify_closing(_fd(sock))
    except (RuntimeError, zmq.ZMQError):
        pass  # not in trio, or the socket is already unusable
    sock.close(linger=0)
