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
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
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
