"""Discovery on NATS JetStream KV (``--discovery-backend nats``).

One bucket (default ``dynamo_discovery``) whose ``max_age`` is the lease TTL;
each instance is one key::

    {namespace}.{component}.{endpoint}.{instance_id} -> {"record": InstanceRecord, "expires_at": unix time}

``register`` and ``refresh`` put the value again (a new message restarts its
age); ``deregister`` purges the key. When the owner dies, JetStream drops the
message once it is ``max_age`` old. The bucket is created on first
registration with ``max_age = ttl`` and ``history = 1``. A bucket that already
exists with a longer ``max_age`` is used as it is: ``expires_at`` in the value
then hides records whose lease lapsed before JetStream removes them; one with a
*shorter* ``max_age`` than the TTL would drop live records, so registering into
it is an error naming both values.

Servers come from ``NATS_SERVER`` (see :mod:`supervisor.planes.servers`). The
connection is opened on first use, inside the process's trio-asyncio loop;
``aclose`` closes it (a later call connects again).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import structlog
import trio
import trio_asyncio

from supervisor.errors import DiscoveryBucketError, ServerUnavailable

from .discovery import InstanceRecord, _matches
from .servers import CONNECT_TIMEOUT, close_nats, connect_nats, split_urls

__all__ = ["DEFAULT_BUCKET", "DiscoveryBucketError", "NatsDiscovery"]

DEFAULT_BUCKET = "dynamo_discovery"
LIST_TIMEOUT = 5.0

_log = structlog.get_logger("supervisor.planes.discovery_nats")




class NatsDiscovery:
    name = "nats"

    def __init__(self, servers: str | Sequence[str] | None = None, *, bucket: str = DEFAULT_BUCKET,
                 timeout: float = CONNECT_TIMEOUT) -> None:
        self.servers = split_urls(servers) or ["nats://localhost:4222"]
        self.bucket = bucket
        self.timeout = timeout
        self._nc: Any = None
        self._kv: Any = None
        self._kv_ttl: float | None = None  # the bucket's max_age (None: no limit)

    @property
    def address(self) -> str:
        return ", ".join(self.servers)

    @staticmethod
    def key(record: InstanceRecord) -> str:
        return f"{record.namespace}.{record.component}.{record.endpoint}.{record.instance_id}"

    # -- the connection --------------------------------------------------------
    async def _connection(self) -> Any:
        if self._nc is None or self._nc.is_closed:
            self._kv = None
            self._nc = await connect_nats(self.servers, name="discovery", connect_timeout=self.timeout)
        return self._nc

    async def _bucket(self, create_ttl: float | None) -> Any:
        """The KV bucket; created (max_age ``create_ttl``) when missing and a TTL is given,
        else None when missing."""
        if self._kv is not None:
            return self._kv
        import nats.js.errors

        nc = await self._connection()
        js = nc.jetstream(timeout=self.timeout)
        aio = trio_asyncio.aio_as_trio
        try:
            kv = await self._js_call(aio(js.key_value)(self.bucket))
        except nats.js.errors.BucketNotFoundError:
            if create_ttl is None:
                return None
            try:
                kv = await self._js_call(aio(js.create_key_value)(bucket=self.bucket, ttl=create_ttl, history=1))
                _log.info("discovery.bucket_created", bucket=self.bucket, ttl_s=create_ttl, servers=self.servers)
            except nats.js.errors.BadRequestError:  # created by another worker meanwhile
                kv = await self._js_call(aio(js.key_value)(self.bucket))
        status = await self._js_call(aio(kv.status)())
        self._kv_ttl = float(status.ttl) if status.ttl else None
        self._kv = kv
        return kv

    async def _js_call(self, awaitable: Any) -> Any:
        import nats.errors
        import nats.js.errors

        try:
            return await awaitable
        except nats.js.errors.ServiceUnavailableError as exc:
            raise ServerUnavailable(f"NATS at {self.address} has no JetStream (start nats-server with -js): "
                                    f"{exc}") from None
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise ServerUnavailable(f"JetStream at {self.address} did not answer "
                                    f"(is nats-server started with -js?): {type(exc).__name__}") from None
        except nats.errors.ConnectionClosedError:
            self._kv = None
            raise ServerUnavailable(f"the connection to NATS at {self.address} is closed") from None

    # -- Discovery -------------------------------------------------------------
    async def register(self, record: InstanceRecord, ttl: float) -> None:
        kv = await self._bucket(ttl)
        if self._kv_ttl is not None and self._kv_ttl < ttl:
            raise DiscoveryBucketError(
                f"NATS KV bucket {self.bucket!r} at {self.address} keeps entries for {self._kv_ttl:g}s, less than "
                f"this registration's {ttl:g}s TTL: live records would vanish between refreshes "
                "(use the same TTL everywhere, or another bucket)"
            )
        value = json.dumps({"record": record.to_json(), "expires_at": time.time() + ttl}).encode()
        await self._js_call(trio_asyncio.aio_as_trio(kv.put)(self.key(record), value))

    async def refresh(self, record: InstanceRecord, ttl: float) -> None:
        await self.register(record, ttl)

    async def deregister(self, record: InstanceRecord) -> None:
        kv = await self._bucket(None)
        if kv is None:
            return
        await self._js_call(trio_asyncio.aio_as_trio(kv.purge)(self.key(record)))

    async def list(
        self, namespace: str, component: str | None = None, endpoint: str | None = None
    ) -> list[InstanceRecord]:
        """The live records under the prefix. Which keys exist comes from the bucket's stream
        (its subjects, by filter), then each key's last value: a KV watch is racy here, as
        nats-py may mark "no more values" before a value the server already sent has been
        handled, which lists nothing under load."""
        import nats.js.errors

        kv = await self._bucket(None)
        if kv is None:
            return []
        pattern = ".".join([namespace, *(p for p in (component, endpoint) if p is not None)])
        pattern += ".*" if endpoint is not None else ".>"
        prefix = f"$KV.{self.bucket}."
        aio = trio_asyncio.aio_as_trio
        js = (await self._connection()).jetstream(timeout=self.timeout)
        found: list[InstanceRecord] = []
        try:
            with trio.fail_after(LIST_TIMEOUT):
                info = await self._js_call(aio(js.stream_info)(f"KV_{self.bucket}",
                                                               subjects_filter=prefix + pattern))
                now = time.time()
                for subject in sorted(info.state.subjects or {}):
                    try:
                        entry = await self._js_call(aio(kv.get)(subject[len(prefix):]))
                    except nats.js.errors.KeyNotFoundError:  # deregistered (purged) meanwhile
                        continue
                    rec = _decode(entry.value, now)
                    if rec is not None and _matches(rec, namespace, component, endpoint):
                        found.append(rec)
        except trio.TooSlowError:
            raise ServerUnavailable(f"listing {pattern} in bucket {self.bucket!r} at {self.address} "
                                    f"timed out after {LIST_TIMEOUT:g}s") from None
        return sorted(found, key=lambda r: r.instance_id)

    async def aclose(self) -> None:
        nc, self._nc, self._kv = self._nc, None, None
        await close_nats(nc)


def _decode(value: bytes | None, now: float) -> InstanceRecord | None:
    if not value:
        return None
    try:
        data = json.loads(value)
        if float(data.get("expires_at", now + 1)) <= now:
            return None
        return InstanceRecord.from_json(data["record"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # a foreign or half-written value
