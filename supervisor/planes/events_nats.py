"""The NATS event plane (``--event-plane nats``): events on NATS subjects, KV events
durably in a JetStream stream with ``--durable-kv-events``.

The publisher is owned by the process, like the ZMQ one: ``publish`` never waits; it
queues (bounded: at the bound the newest event is dropped and counted, as a ZMQ PUB drops
at its high-water mark; a subscriber that misses a KV event resynchronises from the
worker's ``kv_index``). An actor (:meth:`NatsEventPublisher.run`, the tree's
``event_plane`` child) owns the connection and forwards the queue; killed, it comes back
and nothing queued is lost. Durable KV events go to the stream ``{namespace}_kv_events``
(subject ``{namespace}.kv-events``, created if missing, bounded by count and age), so a
frontend that starts later replays them and knows what the workers cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
import trio
import trio_asyncio

from supervisor.tree import ActorContext, TaskStatus

from .servers import close_nats, connect_nats

__all__ = ["KV_EVENTS_SUBJECT", "NatsEventPublisher", "kv_events_stream"]

_log = structlog.get_logger("supervisor.planes.events_nats")

KV_EVENTS_SUBJECT = "{namespace}.kv-events"
STREAM_MAX_MSGS = 1_000_000
STREAM_MAX_AGE_S = 3600.0


def kv_events_stream(namespace: str) -> str:
    """The JetStream stream that keeps a namespace's KV events (names may not hold dots)."""
    return f"{namespace}_kv_events"


async def ensure_kv_stream(js: Any, namespace: str) -> None:
    """The namespace's KV event stream, created if missing (workers and frontends alike)."""
    import nats.js.errors
    from nats.js.api import StreamConfig

    name = kv_events_stream(namespace)
    try:
        await trio_asyncio.aio_as_trio(js.stream_info)(name)
    except nats.js.errors.NotFoundError:
        config = StreamConfig(name=name, subjects=[KV_EVENTS_SUBJECT.format(namespace=namespace)],
                              max_msgs=STREAM_MAX_MSGS, max_age=STREAM_MAX_AGE_S)
        try:
            await trio_asyncio.aio_as_trio(js.add_stream)(config)
        except nats.js.errors.BadRequestError:  # another process created it meanwhile
            await trio_asyncio.aio_as_trio(js.stream_info)(name)


class NatsEventPublisher:
    name = "nats"

    def __init__(self, servers: Sequence[str], namespace: str, *, durable: bool = False,
                 max_queued: int = 100_000) -> None:
        self.servers = list(servers)
        self.namespace = namespace
        self.durable = durable
        self._send, self._receive = trio.open_memory_channel[tuple[str, bytes]](max_queued)
        self.published = 0
        self.dropped = 0
        self._pending: tuple[str, bytes] | None = None  # taken from the queue, not yet published

    @property
    def address(self) -> str:
        return "nats"

    async def publish(self, subject: str, payload: bytes) -> None:
        await trio.lowlevel.checkpoint()
        try:
            self._send.send_nowait((subject, payload))
        except trio.WouldBlock:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                _log.warning("event_plane.dropped", transport="nats", dropped=self.dropped,
                             hint="NATS is unreachable or slower than the events")

    def close(self) -> None:
        self._send.close()

    async def run(self, ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        closed = trio.Event()
        nc = await connect_nats(self.servers, name=f"events {self.namespace}", closed=closed)
        try:
            js = nc.jetstream() if self.durable else None
            if js is not None:
                await ensure_kv_stream(js, self.namespace)
            kv_subject = KV_EVENTS_SUBJECT.format(namespace=self.namespace)
            ctx.log.info("event_plane.listening", transport="nats", servers=self.servers, durable=self.durable,
                         stream=kv_events_stream(self.namespace) if js is not None else None)
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_closed, closed)
                while True:
                    if self._pending is None:
                        try:
                            self._pending = await self._receive.receive()
                        except trio.EndOfChannel:
                            return
                    subject, payload = self._pending
                    if js is not None and subject == kv_subject:
                        await trio_asyncio.aio_as_trio(js.publish)(subject, payload)
                    else:
                        await trio_asyncio.aio_as_trio(nc.publish)(subject, payload)
                    self._pending = None
                    self.published += 1
        finally:
            with ctx.cleanup_scope():
                await close_nats(nc)

    async def _watch_closed(self, closed: trio.Event) -> None:
        await closed.wait()
        raise ConnectionError(f"the connection to NATS at {', '.join(self.servers)} was closed "
                              "(reconnect attempts exhausted)")
