"""End to end on the distributed planes: ``python -m supervisor --request-plane nats``
registering in NATS KV or etcd, clients finding it through discovery.

Real nats-server and etcd (tests/servers.py), a real worker process with the
synthetic engine; clients run both as ``python -m supervisor.client`` and in
process (pytest-trio + the trio-asyncio loop).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio_asyncio

from supervisor.aio import open_asyncio_loop
from supervisor.client import CallError, NatsCall, make_discovery, open_call
from supervisor.planes.discovery import InstanceRecord
from tests.procs import REPO, TAG_VAR, Worker, tagged_processes, worker_fixture
from tests.servers import Server, free_port

pytestmark = pytest.mark.servers

STEP_MS = "20"  # synthetic engine: one token per 20 ms
LONG = {"token_ids": [1, 2, 3], "stop_conditions": {"max_tokens": 100_000}}


@dataclass
class Deployment:
    worker: Worker
    backend: str
    namespace: str
    nats_url: str
    etcd_url: str

    @property
    def env(self) -> dict[str, str]:
        return {"NATS_SERVER": self.nats_url, "ETCD_ENDPOINTS": self.etcd_url}

    def discovery(self) -> Any:
        return make_discovery(self.backend, nats_servers=self.nats_url, etcd_endpoints=self.etcd_url)

    async def records(self) -> list[InstanceRecord]:
        d = self.discovery()
        try:
            return list(await d.list(self.namespace, "backend", "generate"))
        finally:
            await d.aclose()

    async def wait_event(self, name: str, **fields: Any) -> dict[str, Any]:
        return await trio.to_thread.run_sync(lambda: self.worker.wait_event(name, 30.0, **fields))


def start(backend: str, nats: Server, etcd: Server, *extra: str) -> Iterator[Deployment]:
    namespace = f"e2e-{uuid.uuid4().hex[:10]}"
    env = {"NATS_SERVER": nats.url, "ETCD_ENDPOINTS": etcd.url}
    gen = worker_fixture("--engine", "synthetic", "--synthetic-step-ms", STEP_MS, "--request-plane", "nats",
                         "--discovery-backend", backend, "--namespace", namespace, "--system-port", "0",
                         *extra, env=env)
    worker = next(gen)
    try:
        worker.wait_ready()
        yield Deployment(worker, backend, namespace, nats.url, etcd.url)
    finally:
        gen.close()  # SIGTERM if still running; asserts no process is left behind


@pytest.fixture(params=["nats", "etcd"])
def deployment(request: pytest.FixtureRequest, nats_server: Server, etcd_server: Server) -> Iterator[Deployment]:
    yield from start(request.param, nats_server, etcd_server)


def run_client(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    tag = uuid.uuid4().hex
    env = {**os.environ, **dep.env, TAG_VAR: tag}
    try:
        return subprocess.run([sys.executable, "-m", "supervisor.client", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    finally:
        assert not tagged_processes(tag)


# -- tests ------------------------------------------------------------------------------------------


async def test_registered_with_the_nats_subject(deployment: Deployment) -> None:
    async with open_asyncio_loop():
        [rec] = await deployment.records()
    assert rec.transport == "nats"
    assert rec.address == f"{deployment.namespace}.backend.generate-{rec.instance_id}"
    assert rec.pid == deployment.worker.proc.pid
    assert rec.model == "synthetic" and rec.runtime_config["total_kv_blocks"] > 0
    listening = deployment.worker.wait_event("request_plane.listening")
    assert (listening["transport"], listening["subject"]) == ("nats", rec.address)


def test_cli_client_finds_the_worker_and_streams(deployment: Deployment) -> None:
    payload = {"token_ids": [1, 2, 3], "stop_conditions": {"max_tokens": 4}}
    run = run_client(deployment, "--endpoint", f"{deployment.namespace}.backend.generate",
                     "--discovery-backend", deployment.backend, "--payload", json.dumps(payload))
    assert run.returncode == 0, run.stderr
    items = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(items) == 4
    assert all(len(item["token_ids"]) == 1 for item in items)
    assert items[-1]["finish_reason"] == "length"
    assert items[-1]["completion_usage"]["completion_tokens"] == 4
    [started] = [e for e in deployment.worker.events() if e.get("event") == "request.started"]
    assert started["endpoint"] == "generate" and started["actor"] == "root/endpoint/requests"


def test_cli_client_errors(deployment: Deployment) -> None:
    run = run_client(deployment, "--endpoint", f"{deployment.namespace}.backend.nope",
                     "--discovery-backend", deployment.backend, "--payload", "{}")
    assert run.returncode == 1
    assert "no instance" in run.stderr and deployment.backend in run.stderr
    bad = f"nats://127.0.0.1:{free_port()}"
    run = run_client(deployment, "--endpoint", f"{deployment.namespace}.backend.generate",
                     "--discovery-backend", "nats", "--nats-server", bad, "--payload", "{}")
    assert run.returncode == 1 and bad in run.stderr


async def test_cancel_mid_stream_aborts_the_request(deployment: Deployment) -> None:
    request_id = f"cancel-{uuid.uuid4().hex[:8]}"
    async with open_asyncio_loop():
        [rec] = await deployment.records()
        got = []
        async with open_call(rec, "generate", LONG, nats_servers=deployment.nats_url,
                             request_id=request_id) as call:
            async for item in call:
                got.append(item)
                if len(got) == 3:
                    break  # leaving the block publishes a cancel frame
        assert len(got) == 3 and "finish_reason" not in got[-1]
        # the endpoint saw the cancel, and the engine aborted the request
        await deployment.wait_event("request.aborted", request_id=request_id, reason="client cancelled")
        await deployment.wait_event("engine.aborted", request_id=request_id,
                                    message=f"Aborted Request ID: {request_id}")
        finished = await deployment.wait_event("request.finished", request_id=request_id)
        assert (finished["status"], finished["code"], finished["reason"]) == (
            "aborted", "cancelled", "client cancelled")
        # the worker carries on
        async with open_call(rec, "generate", {"token_ids": [5], "stop_conditions": {"max_tokens": 2}},
                             nats_servers=deployment.nats_url) as call:
            items = await call.collect()
        assert [i.get("finish_reason") for i in items] == [None, "length"]


async def test_structured_errors_over_nats(deployment: Deployment) -> None:
    async with open_asyncio_loop():
        [rec] = await deployment.records()
        with pytest.raises(CallError) as unknown:
            async with NatsCall(rec.address, "nope", {}, servers=deployment.nats_url) as call:
                await call.collect()
        assert unknown.value.code == "not_found" and "generate" in unknown.value.message
        with pytest.raises(CallError) as bad:
            async with NatsCall(rec.address, "generate", {"token_ids": "x"}, servers=deployment.nats_url) as call:
                await call.collect()
        assert bad.value.code == "invalid_request" and not bad.value.migratable
        with pytest.raises(CallError) as nobody:
            async with NatsCall(f"{rec.address}-gone", "generate", LONG, servers=deployment.nats_url) as call:
                await call.collect()
        assert nobody.value.code == "unavailable" and nobody.value.migratable
        async with NatsCall(rec.address, "clear_kv_blocks", {}, servers=deployment.nats_url) as call:
            assert (await call.collect())[0]["status"] == "success"


async def test_concurrent_streams_share_the_subject(deployment: Deployment) -> None:
    async with open_asyncio_loop():
        [rec] = await deployment.records()
        results: dict[int, list[Any]] = {}

        async def one(i: int) -> None:
            payload = {"token_ids": [i + 1], "stop_conditions": {"max_tokens": 5 + i}}
            async with open_call(rec, "generate", payload, nats_servers=deployment.nats_url) as call:
                results[i] = await call.collect()

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
    assert {i: len(items) for i, items in results.items()} == {i: 5 + i for i in range(8)}


async def test_sigterm_deregisters_first_drains_and_exits_0(deployment: Deployment) -> None:
    payload = {"token_ids": [1], "stop_conditions": {"max_tokens": 40}}  # ~0.8 s, within the 5 s grace
    async with open_asyncio_loop():
        [rec] = await deployment.records()
        async with open_call(rec, "generate", payload, nats_servers=deployment.nats_url) as call:
            items = [await call.__anext__()]
            deployment.worker.signal(signal.SIGTERM)
            items += await call.collect()
        assert len(items) == 40 and items[-1]["finish_reason"] == "length"  # drained, not cut
        assert await trio.to_thread.run_sync(deployment.worker.wait) == 0
        # the record is gone now, long before its 10 s lease could lapse
        assert await deployment.records() == []
    events = [e["event"] for e in deployment.worker.events()]
    deregistered = events.index("endpoint.deregistered")
    assert deregistered < events.index("actor.stopped")
    assert deregistered < len(events) - 1 - events[::-1].index("request.finished")
    assert not deployment.worker.leftovers()


def test_killing_the_nats_listener_keeps_streams(nats_server: Server, etcd_server: Server) -> None:
    """The listener owns the NATS connection; killed, it comes back and in-flight replies go on."""
    gen = start("nats", nats_server, etcd_server, "--enable-chaos")
    dep = next(gen)
    try:
        async def scenario() -> list[Any]:
            async with open_asyncio_loop():
                [rec] = await dep.records()
                payload = {"token_ids": [1], "stop_conditions": {"max_tokens": 30}}
                async with open_call(rec, "generate", payload, nats_servers=dep.nats_url) as call:
                    items = [await call.__anext__()]
                    kill = "/debug/actors/root/endpoint/listener/kill"
                    r = await trio.to_thread.run_sync(lambda: dep.worker.post(kill))
                    assert r.status_code == 200, r.text
                    items += await call.collect()
                return items

        items = trio.run(scenario)
        assert len(items) == 30 and items[-1]["finish_reason"] == "length"
        crashed = [e for e in dep.worker.events() if e.get("event") == "actor.crashed"]
        assert [e["actor"] for e in crashed] == ["root/endpoint/listener"]
        dep.worker.wait_event("actor.ready", actor="root/endpoint/listener", restarts=1)
    finally:
        gen.close()


@pytest.mark.parametrize("backend", ["nats", "etcd"])
def test_unreachable_discovery_server_fails_clearly(backend: str, nats_server: Server) -> None:
    bad_etcd = f"http://127.0.0.1:{free_port()}"
    bad_nats = f"nats://127.0.0.1:{free_port()}"
    env = {"ETCD_ENDPOINTS": bad_etcd, "NATS_SERVER": bad_nats if backend == "nats" else nats_server.url}
    gen = worker_fixture("--engine", "synthetic", "--request-plane", "nats", "--discovery-backend", backend,
                         "--system-port", "0", env=env)
    worker = next(gen)
    try:
        assert worker.wait(timeout=60) == 1
        failed = worker.wait_event("worker.failed")
        assert (bad_etcd.removeprefix("http://") if backend == "etcd" else bad_nats) in failed["error"]
    finally:
        gen.close()


async def test_a_client_that_dies_without_cancelling_is_noticed(nats_server: Server, etcd_server: Server) -> None:
    """NATS has no connection to lose: the worker asks the client's reply inbox every
    CLIENT_PROBE_INTERVAL whether anybody listens. A raw client that subscribes, reads a
    little and vanishes without a cancel gets its request aborted as a disconnect; a raw
    client that listens but never answers a probe, and our NatsCall, stream to the end."""
    from actors.nats_plane import CLIENT_PROBE_INTERVAL
    from actors.protocol import Data, End, Request, decode_body, encode_body
    from supervisor.planes.servers import close_nats, connect_nats

    aio = trio_asyncio.aio_as_trio
    gen = start("nats", nats_server, etcd_server)
    dep = next(gen)
    try:
        async with open_asyncio_loop():
            [rec] = await dep.records()
            nc = await connect_nats([dep.nats_url], name="raw test client")
            try:
                async def raw_call(request_id: str, max_tokens: int, read: int | None) -> list[Any]:
                    """Publish a request and read its frames; after ``read`` frames, unsubscribe."""
                    got: list[Any] = []
                    send, recv = trio.open_memory_channel[Any](math.inf)

                    async def on_message(msg: Any) -> None:
                        send.send_nowait(msg)  # probes included: this client never answers them

                    inbox = nc.new_inbox()
                    sub = await aio(nc.subscribe)(inbox, cb=on_message)
                    payload = {"token_ids": [4], "stop_conditions": {"max_tokens": max_tokens}}
                    await aio(nc.publish)(rec.address, encode_body(Request(request_id, "generate", payload)),
                                          reply=inbox)
                    async for msg in recv:
                        if msg.headers and msg.headers.get("Dyn-Probe") == request_id:
                            got.append("probe")
                            continue
                        frame = decode_body(msg.data)
                        got.append(frame)
                        if isinstance(frame, End) or len([f for f in got if isinstance(f, Data)]) == read:
                            break
                    await aio(sub.unsubscribe)()
                    return got

                # gone after 3 tokens, without a cancel
                await raw_call("vanishes", 100_000, read=3)
                gone = await dep.wait_event("request.client_gone", request_id="vanishes")
                assert gone["transport"] == "nats"
                await dep.wait_event("request.aborted", request_id="vanishes", reason="client disconnected")
                await dep.wait_event("engine.aborted", request_id="vanishes")

                # listening for over two probe intervals, never answering: not cut
                tokens = int(2.5 * CLIENT_PROBE_INTERVAL * 1000 / int(STEP_MS))
                results: dict[str, Any] = {}

                async def silent() -> None:
                    results["silent"] = await raw_call("silent", tokens, read=None)

                async def ours() -> None:
                    payload = {"token_ids": [6], "stop_conditions": {"max_tokens": tokens}}
                    async with open_call(rec, "generate", payload, nats_servers=dep.nats_url,
                                         request_id="ours") as call:
                        results["ours"] = await call.collect()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(silent)
                    nursery.start_soon(ours)
            finally:
                await close_nats(nc)
        frames = [f for f in results["silent"] if f != "probe"]
        assert "probe" in results["silent"], "the worker never asked after the silent client"
        assert sum(len(f.payload["token_ids"]) for f in frames if isinstance(f, Data)) == tokens
        assert isinstance(frames[-1], End)
        assert len(results["ours"]) == tokens and results["ours"][-1]["finish_reason"] == "length"
        gone = [e["request_id"] for e in dep.worker.events() if e.get("event") == "request.client_gone"]
        assert gone == ["vanishes"]
    finally:
        gen.close()
