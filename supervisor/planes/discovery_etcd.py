"""Discovery on etcd (``--discovery-backend etcd``), through aetcd.

Each instance is one key, attached to a lease of the registration's TTL::

    v1/instances/{namespace}/{component}/{endpoint}/{instance_id} -> InstanceRecord as JSON

``register`` grants a lease and puts the key on it; ``refresh`` is a lease
keep-alive (a lease that already lapsed is replaced: new lease, key put again);
``deregister`` deletes the key and revokes the lease. When the owner dies, etcd
deletes the key when the lease runs out.

Endpoints come from ``ETCD_ENDPOINTS`` (see :mod:`supervisor.planes.servers`);
they are tried in order, moving to the next on a connection failure. The
client connects on first use, inside the process's trio-asyncio loop, and
``aclose`` drops the connection (a later call connects again).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog
import trio_asyncio

from .discovery import InstanceRecord, _matches
from .servers import ServerUnavailable, parse_etcd_endpoint, split_urls

__all__ = ["KEY_PREFIX", "EtcdDiscovery"]

KEY_PREFIX = "v1/instances"
RPC_TIMEOUT = 5  # seconds per etcd call (aetcd wants an int)

_log = structlog.get_logger("supervisor.planes.discovery_etcd")
T = TypeVar("T")


class EtcdDiscovery:
    name = "etcd"

    def __init__(self, endpoints: str | Sequence[str] | None = None, *, prefix: str = KEY_PREFIX,
                 timeout: int = RPC_TIMEOUT) -> None:
        self.endpoints = split_urls(endpoints) or ["http://localhost:2379"]
        self._targets = [parse_etcd_endpoint(e) for e in self.endpoints]  # ValueError early
        self.prefix = prefix.strip("/")
        self.timeout = timeout
        self._client: Any = None
        self._target = 0
        self._leases: dict[str, int] = {}  # record key -> lease id

    # -- keys ------------------------------------------------------------------
    def key(self, record: InstanceRecord) -> str:
        return (f"{self.prefix}/{record.namespace}/{record.component}/{record.endpoint}/"
                f"{record.instance_id}")

    def _list_prefix(self, namespace: str, component: str | None, endpoint: str | None) -> str:
        parts = [self.prefix, namespace]
        if component is not None:
            parts.append(component)
            if endpoint is not None:
                parts.append(endpoint)
        return "/".join(parts) + "/"

    # -- the connection --------------------------------------------------------
    @property
    def address(self) -> str:
        host, port = self._targets[self._target]
        return f"{host}:{port}"

    async def _call(self, what: str, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``op(client)`` on the current endpoint, moving on to the next one
        when it cannot be reached. ServerUnavailable names every endpoint tried."""
        import aetcd

        failures: list[str] = []
        for _ in self._targets:
            if self._client is None:
                host, port = self._targets[self._target]
                self._client = aetcd.Client(host=host, port=port, timeout=self.timeout)
            client = self._client

            async def run(c: Any = client) -> T:
                return await op(c)

            try:
                return await trio_asyncio.aio_as_trio(run)()  # type: ignore[no-any-return]
            except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError) as exc:
                failures.append(f"{self.address}: {exc}")
                await self._drop_client()
                self._target = (self._target + 1) % len(self._targets)
        raise ServerUnavailable(
            f"cannot {what}: etcd at {', '.join(self.endpoints)} is unreachable ({'; '.join(failures)})"
        )

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await trio_asyncio.aio_as_trio(client.close)()
            except Exception as exc:
                _log.debug("etcd.close_failed", error=repr(exc))

    # -- Discovery -------------------------------------------------------------
    async def register(self, record: InstanceRecord, ttl: float) -> None:
        key = self.key(record)
        value = json.dumps(record.to_json()).encode()
        lease_ttl = max(1, math.ceil(ttl))

        async def op(client: Any) -> int:
            lease = await client.lease(lease_ttl)
            await client.put(key.encode(), value, lease=lease)
            return int(lease.id)

        lease_id = await self._call(f"register {key}", op)
        old = self._leases.get(record.key)
        self._leases[record.key] = lease_id
        if old is not None and old != lease_id:
            await self._revoke(old)

    async def refresh(self, record: InstanceRecord, ttl: float) -> None:
        lease_id = self._leases.get(record.key)
        if lease_id is None:
            await self.register(record, ttl)
            return

        async def op(client: Any) -> int:
            reply = await client.refresh_lease(lease_id)
            return int(reply.TTL) if reply is not None else 0

        remaining = await self._call(f"refresh the lease of {self.key(record)}", op)
        if remaining <= 0:
            _log.warning("discovery.lease_lapsed", key=self.key(record), backend=self.name)
            self._leases.pop(record.key, None)
            await self.register(record, ttl)

    async def deregister(self, record: InstanceRecord) -> None:
        key = self.key(record)

        async def op(client: Any) -> None:
            await client.delete(key.encode())

        await self._call(f"deregister {key}", op)
        lease_id = self._leases.pop(record.key, None)
        if lease_id is not None:
            await self._revoke(lease_id)

    async def _revoke(self, lease_id: int) -> None:
        async def op(client: Any) -> None:
            await client.revoke_lease(lease_id)

        try:
            await self._call(f"revoke lease {lease_id:x}", op)
        except Exception as exc:  # lapsed already, or etcd gone: the lease runs out anyway
            _log.debug("etcd.revoke_failed", lease=f"{lease_id:x}", error=repr(exc))

    async def list(
        self, namespace: str, component: str | None = None, endpoint: str | None = None
    ) -> list[InstanceRecord]:
        prefix = self._list_prefix(namespace, component, endpoint)

        async def op(client: Any) -> list[bytes]:
            result = await client.get_prefix(prefix.encode())
            return [kv.value for kv in result]

        found: list[InstanceRecord] = []
        for value in await self._call(f"list {prefix}", op):
            try:
                rec = InstanceRecord.from_json(json.loads(value))
            except (ValueError, KeyError, TypeError):
                continue  # a foreign or half-written value
            if _matches(rec, namespace, component, endpoint):
                found.append(rec)
        return sorted(found, key=lambda r: r.instance_id)

    async def aclose(self) -> None:
        await self._drop_client()
