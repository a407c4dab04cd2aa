"""Discovery backends against real servers: etcd (leases) and NATS (JetStream KV with a TTL).

In process, under pytest-trio with the trio-asyncio loop the worker uses.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import trio

from supervisor.aio import open_asyncio_loop
from supervisor.planes.discovery import Discovery, InstanceRecord
from supervisor.planes.discovery_etcd import EtcdDiscovery
from supervisor.planes.discovery_nats import DiscoveryBucketError, NatsDiscovery
from supervisor.planes.servers import ServerUnavailable
from tests.servers import Server, free_port

pytestmark = pytest.mark.servers

BACKENDS = ("etcd", "nats")
SHORT_TTL = 2.0  # etcd's smallest lease is about 2 s
LAPSE_DEADLINE = 30.0  # generous: how long a lapsed record may take to vanish (not a timing assert)


@pytest.fixture
def make_discovery(request: pytest.FixtureRequest) -> Callable[[str], Discovery]:
    """backend name -> a discovery client on the session's server; NATS gets a bucket per test
    so that each test chooses its own TTL."""
    bucket = f"test_{uuid.uuid4().hex[:12]}"

    def make(backend: str) -> Discovery:
        if backend == "etcd":
            server: Server = request.getfixturevalue("etcd_server")
            return EtcdDiscovery(server.url)
        server = request.getfixturevalue("nats_server")
        return NatsDiscovery(server.url, bucket=bucket)

    return make


def record(namespace: str, *, component: str = "backend", endpoint: str = "generate",
           instance_id: str | None = None) -> InstanceRecord:
    iid = instance_id or uuid.uuid4().hex[:16]
    return InstanceRecord(
        namespace=namespace, component=component, endpoint=endpoint, instance_id=iid, transport="nats",
        address=f"{namespace}.{component}.{endpoint}-{iid}", model="synthetic",
        runtime_config={"total_kv_blocks": 512, "block_size": 16, "context_length": 4096}, pid=1234,
    )


def ns() -> str:
    return f"ns-{uuid.uuid4().hex[:10]}"


async def wait_until_listed(d: Discovery, namespace: str, expected: set[str]) -> None:
    with trio.fail_after(LAPSE_DEADLINE):
        while True:
            if {r.instance_id for r in await d.list(namespace)} == expected:
                return
            await trio.sleep(0.1)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_register_list_and_filters(backend: str, make_discovery: Callable[[str], Discovery]) -> None:
    namespace = ns()
    a = record(namespace, instance_id="a" * 16)
    b = record(namespace, instance_id="b" * 16)
    prefill = record(namespace, component="prefill")
    clear = record(namespace, endpoint="clear_kv_blocks")
    other = record(ns())
    async with open_asyncio_loop():
        d = make_discovery(backend)
        try:
            assert await d.list(namespace) == []
            for rec in (b, a, prefill, clear, other):
                await d.register(rec, 10.0)
            assert await d.list(namespace, "backend", "generate") == [a, b]  # sorted, fields intact
            assert {r.instance_id for r in await d.list(namespace)} == {a.instance_id, b.instance_id,
                                                                         prefill.instance_id, clear.instance_id}
            assert await d.list(namespace, "prefill") == [prefill]
            assert await d.list(namespace, "backend", "clear_kv_blocks") == [clear]
            assert await d.list(other.namespace) == [other]
            # a second client sees the same
            d2 = make_discovery(backend)
            try:
                assert await d2.list(namespace, "backend", "generate") == [a, b]
            finally:
                await d2.aclose()
        finally:
            for rec in (a, b, prefill, clear, other):
                await d.deregister(rec)
            await d.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_deregister_removes_at_once(backend: str, make_discovery: Callable[[str], Discovery]) -> None:
    namespace = ns()
    keep, gone = record(namespace), record(namespace)
    async with open_asyncio_loop():
        d = make_discovery(backend)
        try:
            await d.register(keep, 30.0)
            await d.register(gone, 30.0)
            await d.deregister(gone)
            assert await d.list(namespace) == [keep]  # long before the 30 s lease could lapse
            await d.deregister(gone)  # idempotent
            await d.deregister(keep)
            assert await d.list(namespace) == []
        finally:
            await d.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_lease_lapse_removes_the_record(backend: str, make_discovery: Callable[[str], Discovery]) -> None:
    """Refreshed, a record outlives its TTL; no longer refreshed (owner dead), it vanishes."""
    namespace = ns()
    alive, dead = record(namespace), record(namespace)
    async with open_asyncio_loop():
        d = make_discovery(backend)
        try:
            await d.register(alive, SHORT_TTL)
            await d.register(dead, SHORT_TTL)

            async def keep_alive() -> None:
                while True:
                    await trio.sleep(SHORT_TTL / 4)
                    await d.refresh(alive, SHORT_TTL)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_alive)
                await wait_until_listed(d, namespace, {alive.instance_id})  # dead's lease lapsed
                await trio.sleep(2 * SHORT_TTL)  # alive, refreshed, outlives more TTLs
                assert [r.instance_id for r in await d.list(namespace)] == [alive.instance_id]
                nursery.cancel_scope.cancel()
            # a refresh after the lease lapsed registers again
            await d.refresh(dead, SHORT_TTL)
            assert {r.instance_id for r in await d.list(namespace)} == {alive.instance_id, dead.instance_id}
            await wait_until_listed(d, namespace, set())  # no more refreshes: both lapse
        finally:
            await d.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_aclose_then_use_again_reconnects(backend: str, make_discovery: Callable[[str], Discovery]) -> None:
    namespace = ns()
    rec = record(namespace)
    async with open_asyncio_loop():
        d = make_discovery(backend)
        await d.register(rec, 10.0)
        await d.aclose()
        await d.refresh(rec, 10.0)
        assert await d.list(namespace) == [rec]
        await d.deregister(rec)
        await d.aclose()


async def test_unreachable_etcd_names_the_address() -> None:
    port = free_port()  # nothing listens there
    async with open_asyncio_loop():
        d = EtcdDiscovery(f"http://127.0.0.1:{port}")
        with pytest.raises(ServerUnavailable, match=f"127.0.0.1:{port}"):
            await d.register(record(ns()), 10.0)
        with pytest.raises(ServerUnavailable, match=f"127.0.0.1:{port}"):
            await d.list("x")
        await d.aclose()


async def test_etcd_moves_on_to_the_next_endpoint(etcd_server: Server) -> None:
    namespace = ns()
    rec = record(namespace)
    async with open_asyncio_loop():
        d = EtcdDiscovery([f"http://127.0.0.1:{free_port()}", etcd_server.url])
        try:
            await d.register(rec, 10.0)
            assert await d.list(namespace) == [rec]
            await d.deregister(rec)
        finally:
            await d.aclose()


async def test_unreachable_nats_names_the_address() -> None:
    port = free_port()
    async with open_asyncio_loop():
        d = NatsDiscovery(f"nats://127.0.0.1:{port}", timeout=1.0)
        with pytest.raises(ServerUnavailable, match=f"nats://127.0.0.1:{port}"):
            await d.register(record(ns()), 10.0)
        await d.aclose()


async def test_nats_bucket_keeping_records_too_briefly_is_an_error(nats_server: Server) -> None:
    bucket = f"test_{uuid.uuid4().hex[:12]}"
    async with open_asyncio_loop():
        short = NatsDiscovery(nats_server.url, bucket=bucket)
        long = NatsDiscovery(nats_server.url, bucket=bucket)
        try:
            await short.register(record(ns()), SHORT_TTL)  # creates the bucket with max_age 2 s
            with pytest.raises(DiscoveryBucketError, match=bucket):
                await long.register(record(ns()), 30.0)
        finally:
            await short.aclose()
            await long.aclose()


async def test_nats_longer_lived_bucket_still_hides_lapsed_records(nats_server: Server) -> None:
    """A bucket created with a long max_age: a record's own TTL still ends its listing."""
    bucket = f"test_{uuid.uuid4().hex[:12]}"
    namespace = ns()
    async with open_asyncio_loop():
        creator = NatsDiscovery(nats_server.url, bucket=bucket)
        d = NatsDiscovery(nats_server.url, bucket=bucket)
        try:
            await creator.register(record(ns()), 600.0)
            rec = record(namespace)
            await d.register(rec, SHORT_TTL)
            assert await d.list(namespace) == [rec]
            await wait_until_listed(d, namespace, set())
        finally:
            await creator.aclose()
            await d.aclose()
