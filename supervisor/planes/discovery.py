"""Discovery: where workers announce themselves and clients find them.

A registration is an :class:`InstanceRecord` kept alive by a lease: the owner
refreshes it every ``ttl / 3`` seconds; a record whose lease lapsed is gone.
Backends: ``mem`` (in-process, for tests), ``file`` (the embedded default: one
JSON file per instance in a shared directory), ``etcd``
(:mod:`.discovery_etcd`, keys on a lease) and ``nats`` (:mod:`.discovery_nats`,
a JetStream KV bucket with a TTL).

``aclose`` releases what the backend holds (a server connection); the object
stays usable and connects again on its next call. The registrar calls it each
time it stops.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

__all__ = ["Discovery", "FileDiscovery", "InstanceRecord", "MemDiscovery", "default_discovery_dir"]


@dataclass(frozen=True)
class InstanceRecord:
    namespace: str
    component: str
    endpoint: str
    instance_id: str
    transport: str  # "tcp" | "nats"
    address: str  # host:port for tcp, a subject for nats
    model: str
    runtime_config: dict[str, Any] = field(default_factory=dict)
    pid: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}.{self.component}.{self.endpoint}.{self.instance_id}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Discovery(Protocol):
    name: str

    async def register(self, record: InstanceRecord, ttl: float) -> None: ...

    async def refresh(self, record: InstanceRecord, ttl: float) -> None: ...

    async def deregister(self, record: InstanceRecord) -> None: ...

    async def list(
        self, namespace: str, component: str | None = None, endpoint: str | None = None
    ) -> list[InstanceRecord]: ...

    async def aclose(self) -> None: ...


def _matches(rec: InstanceRecord, namespace: str, component: str | None, endpoint: str | None) -> bool:
    return (
        rec.namespace == namespace
        and (component is None or rec.component == component)
        and (endpoint is None or rec.endpoint == endpoint)
    )


class MemDiscovery:
    """In-process registry (tests, single-process setups)."""

    name = "mem"

    def __init__(self) -> None:
        self._records: dict[str, tuple[InstanceRecord, float]] = {}

    async def register(self, record: InstanceRecord, ttl: float) -> None:
        self._records[record.key] = (record, trio.current_time() + ttl)

    async def refresh(self, record: InstanceRecord, ttl: float) -> None:
        await self.register(record, ttl)

    async def deregister(self, record: InstanceRecord) -> None:
        self._records.pop(record.key, None)

    async def list(
        self, namespace: str, component: str | None = None, endpoint: str | None = None
    ) -> list[InstanceRecord]:
        now = trio.current_time()
        return [r for r, exp in self._records.values() if exp > now and _matches(r, namespace, component, endpoint)]

    async def aclose(self) -> None:
        return None  # nothing to release; the records belong to the process


def default_discovery_dir() -> Path:
    base = os.environ.get("DYN_FILE_DISCOVERY_DIR")
    if base:
        return Path(base).expanduser()
    return Path(tempfile.gettempdir()) / f"llm-supervisor-discovery-{os.getuid()}"


class FileDiscovery:
    """One JSON file per instance; ``expires_at`` (wall clock) is the lease."""

    name = "file"

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_discovery_dir()

    def _path(self, record: InstanceRecord) -> Path:
        return self.directory / record.namespace / f"{record.key}.json"

    def _write(self, record: InstanceRecord, ttl: float) -> None:
        path = self._path(record)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"record": record.to_json(), "expires_at": time.time() + ttl}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    async def register(self, record: InstanceRecord, ttl: float) -> None:
        await trio.to_thread.run_sync(self._write, record, ttl)

    async def refresh(self, record: InstanceRecord, ttl: float) -> None:
        await self.register(record, ttl)

    async def deregister(self, record: InstanceRecord) -> None:
        await trio.to_thread.run_sync(lambda: self._path(record).unlink(missing_ok=True))

    def _read_all(self, namespace: str) -> list[InstanceRecord]:
        folder = self.directory / namespace
        if not folder.is_dir():
            return []
        now = time.time()
        found = []
        for path in folder.glob("*.json"):
            try:
                data = json.loads(path.read_text())
                if float(data["expires_at"]) <= now:
                    continue
                found.append(InstanceRecord.from_json(data["record"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # half-written or foreign file
        return found

    async def list(
        self, namespace: str, component: str | None = None, endpoint: str | None = None
    ) -> list[InstanceRecord]:
        records = await trio.to_thread.run_sync(self._read_all, namespace)
        return sorted(
            (r for r in records if _matches(r, namespace, component, endpoint)), key=lambda r: r.instance_id
        )

    async def aclose(self) -> None:
        return None
