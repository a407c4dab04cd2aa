"""The event plane: fire-and-forget messages on subjects (KV events, load metrics).

An :class:`EventPublisher` has one operation, ``await publish(subject,
payload)``. Implementations:

- :class:`ZmqEventPublisher` (the default, embedded): a PUB socket bound on
  loopback at construction; each message is two frames ``[subject, payload]``,
  so subscribers filter by subject prefix with ``zmq.SUBSCRIBE``.
- :class:`MemoryEventPublisher`: keeps what it was given, for tests.
- :class:`~supervisor.planes.events_nats.NatsEventPublisher` (``--event-plane nats``):
  NATS subjects, KV events in JetStream with ``--durable-kv-events``; its connection is
  an actor of the tree (``event_plane``).

A publisher is owned by the process, not by an actor: actors that publish
come and go, subscribers keep their connection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import trio
import zmq

from supervisor import envs
from supervisor.errors import ConfigError

from . import zmq_trio

__all__ = [
    "EventPublisher",
    "MemoryEventPublisher",
    "PublishedEvent",
    "ZmqEventPublisher",
    "make_event_publisher",
    "register_event_plane",
]

_log = structlog.get_logger("supervisor.planes.events")


class EventPublisher(Protocol):
    """Publishes opaque payloads on subjects (``{namespace}.kv-events``)."""

    name: str

    async def publish(self, subject: str, payload: bytes) -> None: ...

    def close(self) -> None: ...


class ZmqEventPublisher:
    """A PUB socket on ``host:port`` (0 picks a free port; ``port`` is the real one).

    ZMQ PUB never blocks: at the high-water mark it drops, so the mark is set
    high (a slow subscriber must not stall the KV event relay).
    """

    name = "zmq"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, hwm: int = 100_000) -> None:
        self.host = host
        self._sock = zmq_trio.socket(zmq.PUB, sndhwm=hwm)
        bind_host = f"[{host}]" if ":" in host else host
        if ":" in host:
            self._sock.setsockopt(zmq.IPV6, 1)
        try:
            if port:
                self._sock.bind(f"tcp://{bind_host}:{port}")
                self.port = port
            else:
                self.port = self._sock.bind_to_random_port(f"tcp://{bind_host}")
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise OSError(f"event plane: cannot bind tcp://{bind_host}:{port}: {exc}") from None
        self.published = 0

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    async def publish(self, subject: str, payload: bytes) -> None:
        if self._sock.closed:
            raise trio.ClosedResourceError("event publisher is closed")
        await zmq_trio.send_multipart(self._sock, [subject.encode(), payload])
        self.published += 1

    def close(self) -> None:
        zmq_trio.close(self._sock)

    def __repr__(self) -> str:
        return f"ZmqEventPublisher({self.address})"


@dataclass
class PublishedEvent:
    subject: str
    payload: bytes


@dataclass
class MemoryEventPublisher:
    """Keeps every published event, in order; ``fail_next`` makes publishes raise."""

    name: str = "memory"
    events: list[PublishedEvent] = field(default_factory=list)
    fail_next: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    async def publish(self, subject: str, payload: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ConnectionError("memory event plane told to fail")
        self.events.append(PublishedEvent(subject, payload))
        self._changed.set()
        self._changed = trio.Event()

    def on(self, subject: str) -> list[bytes]:
        return [e.payload for e in self.events if e.subject == subject]

    async def wait_for(self, predicate: Callable[[MemoryEventPublisher], bool]) -> None:
        while not predicate(self):
            await self._changed.wait()

    def close(self) -> None:
        pass


EventPlaneFactory = Callable[[Any], EventPublisher]  # (Config) -> publisher


def _zmq_factory(config: Any) -> EventPublisher:
    host = envs.get("DYN_EVENT_PLANE_HOST")
    port = envs.get("DYN_EVENT_PLANE_PORT") or 0
    publisher = ZmqEventPublisher(host, port)
    _log.info("event_plane.listening", transport="zmq", host=host, port=publisher.port)
    return publisher


def _nats_factory(config: Any) -> EventPublisher:
    from .events_nats import NatsEventPublisher
    from .servers import nats_servers_for

    return NatsEventPublisher(nats_servers_for(config), getattr(config, "namespace", "dynamo"),
                              durable=bool(getattr(config, "durable_kv_events", False)))


_FACTORIES: dict[str, EventPlaneFactory] = {"zmq": _zmq_factory, "nats": _nats_factory}


def register_event_plane(name: str, factory: EventPlaneFactory) -> None:
    """Make ``--event-plane NAME`` build its publisher with ``factory(config)``."""
    _FACTORIES[name] = factory


def make_event_publisher(config: Any) -> EventPublisher:
    plane = getattr(config, "event_plane", "zmq")
    factory = _FACTORIES.get(plane)
    if factory is None:
        raise ConfigError(f"--event-plane {plane}: not available yet ({', '.join(sorted(_FACTORIES))})")
    return factory(config)
