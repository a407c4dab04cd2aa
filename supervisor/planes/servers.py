"""Where the distributed planes' servers are, and connecting to them.

Addresses follow what Dynamo users set:

- ``NATS_SERVER``: one or more NATS URLs, comma-separated
  (default ``nats://localhost:4222``);
- ``ETCD_ENDPOINTS``: one or more etcd client URLs, comma-separated
  (default ``http://localhost:2379``).

A config may carry ``nats_server`` / ``etcd_endpoints`` fields; they win over
the environment (see :func:`nats_servers_for` and :func:`etcd_endpoints_for`).

nats-py and aetcd are asyncio libraries: everything here is called from trio
through the process's trio-asyncio loop (:mod:`supervisor.aio`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import structlog
import trio
import trio_asyncio

from supervisor.errors import ServerUnavailable

__all__ = [
    "DEFAULT_ETCD_ENDPOINT",
    "DEFAULT_NATS_SERVER",
    "ServerUnavailable",
    "call_aio",
    "close_nats",
    "connect_nats",
    "etcd_endpoints_for",
    "nats_servers_for",
    "parse_etcd_endpoint",
    "split_urls",
]

DEFAULT_NATS_SERVER = "nats://localhost:4222"
DEFAULT_ETCD_ENDPOINT = "http://localhost:2379"
CONNECT_TIMEOUT = 5.0  # seconds to reach a server at startup before saying so

_log = structlog.get_logger("supervisor.planes.servers")




def split_urls(text: str | Sequence[str] | None) -> list[str]:
    if text is None:
        return []
    parts = text.split(",") if isinstance(text, str) else [p for chunk in text for p in chunk.split(",")]
    return [p.strip() for p in parts if p.strip()]


def nats_servers_for(config: Any = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The NATS servers: ``config.nats_server`` if set, else ``NATS_SERVER``, else the default."""
    env = os.environ if environ is None else environ
    return (split_urls(getattr(config, "nats_server", None)) or split_urls(env.get("NATS_SERVER"))
            or [DEFAULT_NATS_SERVER])


def etcd_endpoints_for(config: Any = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The etcd endpoints: ``config.etcd_endpoints`` if set, else ``ETCD_ENDPOINTS``, else the default."""
    env = os.environ if environ is None else environ
    return (split_urls(getattr(config, "etcd_endpoints", None)) or split_urls(env.get("ETCD_ENDPOINTS"))
            or [DEFAULT_ETCD_ENDPOINT])


def parse_etcd_endpoint(url: str) -> tuple[str, int]:
    """``http://host:port``, ``host:port`` or ``host`` -> (host, port). TLS is not supported."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "etcd"):
        raise ValueError(f"etcd endpoint {url!r}: only plain http:// endpoints are supported")
    if not parts.hostname:
        raise ValueError(f"etcd endpoint {url!r} has no host")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError(f"etcd endpoint {url!r} has an invalid port") from None
    return parts.hostname, port


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no answer"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def connect_nats(
    servers: Sequence[str],
    *,
    name: str,
    connect_timeout: float = CONNECT_TIMEOUT,
    closed: trio.Event | None = None,
    max_reconnect_attempts: int = 60,
    on_reconnect: Callable[[], None] | None = None,
) -> Any:
    """A connected nats-py client, or :class:`ServerUnavailable` naming the servers.

    Once connected the client reconnects by itself on its own (up to
    ``max_reconnect_attempts`` per server), calling ``on_reconnect`` each time;
    ``closed`` is set when it gives up (or is closed).
    """
    import nats

    last: list[BaseException] = []

    async def error_cb(exc: Exception) -> None:
        last.append(exc)
        _log.debug("nats.error", servers=list(servers), error=_describe(exc))

    client: list[Any] = []

    async def disconnected_cb() -> None:
        if client and not client[0].is_closed:  # not our own close()
            _log.warning("nats.disconnected", servers=list(servers))

    async def reconnected_cb() -> None:
        _log.info("nats.reconnected", servers=list(servers))
        if on_reconnect is not None:
            on_reconnect()

    async def closed_cb() -> None:
        if closed is not None:
            closed.set()

    where = ", ".join(servers)
    try:
        with trio.fail_after(connect_timeout):
            nc = await trio_asyncio.aio_as_trio(nats.connect)(
                list(servers),
                name=name,
                connect_timeout=min(2.0, connect_timeout),
                reconnect_time_wait=0.5,
                max_reconnect_attempts=max_reconnect_attempts,
                error_cb=error_cb,
                disconnected_cb=disconnected_cb,
                reconnected_cb=reconnected_cb,
                closed_cb=closed_cb,
            )
    except trio.TooSlowError:
        raise ServerUnavailable(
            f"cannot connect to NATS at {where} within {connect_timeout:g}s ({_describe(last[-1] if last else None)})"
        ) from None
    except Exception as exc:
        raise ServerUnavailable(f"cannot connect to NATS at {where}: {_describe(exc)}") from exc
    client.append(nc)
    return nc


async def close_nats(nc: Any, *, grace: float = 2.0) -> None:
    """Close a nats-py client (flushing what was published), bounded in time."""
    if nc is None or nc.is_closed:
        return
    with trio.move_on_after(grace) as scope:
        try:
            await trio_asyncio.aio_as_trio(nc.close)()
        except Exception as exc:  # closing a broken connection: nothing left to save
            _log.debug("nats.close_failed", error=_describe(exc))
    if scope.cancelled_caught:
        _log.warning("nats.close_timeout", grace_s=grace)


async def call_aio(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``await fn(*args, **kwargs)`` for an asyncio coroutine function, from trio."""
    return await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
