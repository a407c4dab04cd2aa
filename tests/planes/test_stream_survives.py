"""A stream survives its infrastructure: real nats-server and etcd, a real worker (synthetic
engine) on the NATS request plane with etcd discovery.

- nats-server restarted (SIGTERM, started again on the same port) during 16 streams, 20 times:
  every stream either completes with every item or ends with an explicit migratable error;
  none hangs (each call has a silence timeout, each round a deadline) and none reports success
  with items missing.
- etcd stopped for longer than the registration's lease, and etcd coming back with its data
  lost: the worker is findable again within seconds, and serves.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor.aio import open_asyncio_loop
from supervisor.client import CallError, NatsCall, make_discovery
from supervisor.planes.discovery import InstanceRecord
from tests.procs import Worker, wait_until, worker_fixture
from tests.servers import Server, running_etcd, running_nats

pytestmark = pytest.mark.servers

ITEMS = 600  # per stream: 3 s at 5 ms per step
STREAMS = 16
ROUNDS = 20


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[Server]:
    with running_nats(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Server]:
    with running_etcd(tmp_path / "etcd") as server:
        yield server


def start_worker(nats: Server, etcd: Server, namespace: str) -> Iterator[Worker]:
    return worker_fixture("--engine", "synthetic", "--synthetic-step-ms", "5", "--request-plane", "nats",
                          "--discovery-backend", "etcd", "--namespace", namespace, "--system-port", "0",
                          env={"NATS_SERVER": nats.url, "ETCD_ENDPOINTS": etcd.url})


async def registered(etcd: Server, namespace: str) -> list[InstanceRecord]:
    discovery = make_discovery("etcd", etcd_endpoints=etcd.url)
    try:
        return list(await discovery.list(namespace, "backend", "generate"))
    finally:
        await discovery.aclose()


async def test_streams_through_nats_server_restarts(nats: Server, etcd: Server) -> None:
    namespace = f"survive-{uuid.uuid4().hex[:8]}"
    gen = start_worker(nats, etcd, namespace)
    worker = next(gen)
    tally = {"complete": 0, "migratable": 0}
    try:
        worker.wait_ready()
        async with open_asyncio_loop():
            [record] = await registered(etcd, namespace)
            for round_no in range(ROUNDS):
                results: list[tuple[str, Any]] = []
                streaming = trio.Semaphore(0)

                async def one(i: int, results: list[tuple[str, Any]] = results,
                              streaming: trio.Semaphore = streaming) -> None:
                    payload = {"token_ids": [i + 1], "stop_conditions": {"max_tokens": ITEMS}}
                    items: list[Any] = []
                    try:
                        async with NatsCall(record.address, "generate", payload, servers=nats.url,
                                            silence_timeout=10.0) as call:
                            async for item in call:
                                items.append(item)
                                if len(items) == 50:
                                    streaming.release()
                        results.append(("complete", items))
                    except CallError as exc:
                        if len(items) < 50:
                            streaming.release()
                        results.append(("error", exc))

                with trio.fail_after(90):  # no hang: a round either ends or fails the test
                    async with trio.open_nursery() as nursery:
                        for i in range(STREAMS):
                            nursery.start_soon(one, i)
                        for _ in range(STREAMS):
                            await streaming.acquire()
                        await trio.to_thread.run_sync(nats.restart)
                assert len(results) == STREAMS, f"round {round_no}: {len(results)} streams ended"
                for kind, value in results:
                    if kind == "complete":
                        # success means every item, in order, ending as the engine ended it
                        assert len(value) == ITEMS, f"round {round_no}: success with {len(value)} items"
                        assert value[-1]["finish_reason"] == "length"
                        tally["complete"] += 1
                    else:
                        assert value.migratable, f"round {round_no}: {value.code}: {value.message}"
                        assert value.request_id and value.request_id in value.message
                        tally["migratable"] += 1
                        tally[value.code] = tally.get(value.code, 0) + 1
        assert tally["complete"] + tally["migratable"] == ROUNDS * STREAMS
        # the worker lived through it all and still serves
        assert worker.proc.poll() is None
        gone = [e for e in worker.events() if e["event"] == "request.client_gone"]
        assert not gone, f"live clients taken for gone after a reconnect: {gone[:3]}"
        print(f"\n{ROUNDS} nats-server restarts x {STREAMS} streams: {tally}")
    finally:
        gen.close()


async def _serves(nats: Server, record: InstanceRecord) -> bool:
    payload = {"token_ids": [3], "stop_conditions": {"max_tokens": 5}}
    async with NatsCall(record.address, "generate", payload, servers=nats.url) as call:
        return len(await call.collect()) == 5


@pytest.mark.parametrize("data_lost", [False, True], ids=["outage", "data-lost"])
async def test_etcd_outage_and_data_loss(nats: Server, etcd: Server, data_lost: bool) -> None:
    namespace = f"etcd-{uuid.uuid4().hex[:8]}"
    gen = start_worker(nats, etcd, namespace)
    worker = next(gen)
    try:
        worker.wait_ready()
        async with open_asyncio_loop():
            [record] = await registered(etcd, namespace)
            await trio.to_thread.run_sync(etcd.stop)
            # the outage outlasts the registration's lease (10 s): the registrar fails to refresh
            # it, again and again, while the worker keeps serving over NATS
            await trio.to_thread.run_sync(lambda: worker.wait_event("actor.crashed", timeout=30,
                                                                     actor="root/endpoint/registrar"))
            await trio.to_thread.run_sync(
                lambda: wait_until(lambda: sum(1 for e in worker.events() if e["event"] == "actor.crashed"
                                               and e["actor"] == "root/endpoint/registrar") >= 3, 60,
                                   "three failed registrations during the outage"))
            assert await _serves(nats, record)
            if data_lost:
                shutil.rmtree(etcd.data_dir)
                etcd.data_dir.mkdir()
            await trio.to_thread.run_sync(etcd.start_again)
            with trio.fail_after(15):  # findable again within seconds
                while not await registered(etcd, namespace):  # noqa: ASYNC110 (etcd, polled as a client would)
                    await trio.sleep(0.2)
            [again] = await registered(etcd, namespace)
            assert again.address == record.address
            assert await _serves(nats, again)
        assert worker.proc.poll() is None
    finally:
        gen.close()
