"""Real vLLM over the NATS request plane with etcd discovery: 8 streams survive a SIGTERM and a
listener kill during the drain (all complete, exit 0, deregistered first, nothing left behind)."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from supervisor.aio import open_asyncio_loop
from supervisor.client import CallError, NatsCall, make_discovery
from supervisor.planes.servers import close_nats, connect_nats
from tests.conftest import start_vllm_worker
from tests.kvfake import wait_until as poll_until
from tests.servers import Server, etcd_server, nats_server  # noqa: F401

pytestmark = pytest.mark.vllm

# long enough to outlast the listener kill's round trip many times over (about 10 s a round here)
TOKENS = 1000


async def test_nats_plane_etcd_discovery_listener_kill_and_sigterm_drain(
    tiny_model: Path, tmp_path: Path, nats_server: Server, etcd_server: Server  # noqa: F811
) -> None:
    namespace = f"vllm-{uuid.uuid4().hex[:8]}"
    gen = start_vllm_worker(tiny_model, tmp_path, "--request-plane", "nats", "--discovery-backend", "etcd",
                            "--namespace", namespace, "--enable-chaos", "--canary-wait-time", "3600",
                            # four sequences at a time: the 8 streams' drain lasts two rounds (about 10 s
                            # each here), long enough for the kill, sent at once, to land in it
                            "--max-num-seqs", "4")
    # start_vllm_worker's env does not carry the servers: pass them the way users do
    import os

    extra_env = {"NATS_SERVER": nats_server.url, "ETCD_ENDPOINTS": etcd_server.url,
                 "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "120"}
    os.environ.update(extra_env)
    try:
        worker = next(gen)
    finally:
        for name in extra_env:
            del os.environ[name]
    try:
        worker.wait_ready(timeout=240)
        # inside pytest's own timeout, which would leave a trio run behind for the next test
        with trio.fail_after(420):
            async with open_asyncio_loop():
                discovery = make_discovery("etcd", etcd_endpoints=etcd_server.url)
                [record] = await discovery.list(namespace, "backend", "generate")
                assert record.transport == "nats" and record.runtime_config["block_size"] == 32
                results: list[Any] = []

                async def stream(i: int) -> None:
                    payload = {"token_ids": [1, 10 + i, 20 + i], "sampling_options": {"temperature": 0.0},
                               "stop_conditions": {"max_tokens": TOKENS, "ignore_eos": True}}
                    items: list[Any] = []
                    try:
                        # a lost frame fails the test (with what each stream got) instead of hanging it
                        async with NatsCall(record.address, "generate", payload, connection=nc,
                                            silence_timeout=120) as call:
                            async for item in call:
                                items.append(item)
                        results.append((items[-1]["finish_reason"], sum(len(x["token_ids"]) for x in items)))
                    except CallError as exc:
                        results.append(f"stream {i}: {exc.code} {exc} after {len(items)} items")

                # one client connection for the 8 streams, as a frontend has (8 connects once spread
                # the requests' arrival over seconds)
                nc = await connect_nats([nats_server.url], name="test-client")
                # the kill goes out on a connection opened (and its client built) before the streams: once
                # they generate, anything new started from here has to get going on a loaded host
                async with httpx.AsyncClient(base_url=worker.url(""), timeout=30) as http:
                    assert (await http.get("/live")).status_code == 200
                    try:
                        async with trio.open_nursery() as nursery:
                            for i in range(8):
                                nursery.start_soon(stream, i)
                            # admitted, says the worker's log (polled on this loop, no helper thread)
                            await poll_until(lambda: sum(e["event"] == "request.started"
                                                         for e in worker.events()) >= 8, 120)
                            worker.signal(signal.SIGTERM)
                            # the listener (the NATS connection) dies during the drain, and comes back
                            answer = await http.post("/debug/actors/root/endpoint/listener/kill")
                            if answer.status_code != 200:
                                told = [(e["timestamp"], e["event"]) for e in worker.events() if e["event"].startswith(
                                    ("actor.crashed", "actor.stopped", "shutdown.", "requests.", "request.",
                                     "signal."))]
                                pytest.fail(f"kill: {answer.status_code} {answer.text}\nworker: {told}")
                    finally:
                        with trio.CancelScope(shield=True):
                            await close_nats(nc)
                if results != [("length", TOKENS)] * 8:  # say what the worker did meanwhile
                    told = [e for e in worker.events() if e["event"].startswith(
                        ("actor.", "nats.", "shutdown.", "request_plane.", "requests.", "endpoint."))]
                    pytest.fail(f"streams: {results}\nworker: {told}")
                with trio.fail_after(60):
                    assert await discovery.list(namespace, "backend", "generate") == []  # deregistered
                    await discovery.aclose()
        assert await trio.to_thread.run_sync(worker.wait, 60.0) == 0
        events = worker.events()
        names = [e["event"] for e in events]
        # on SIGTERM the record goes first, then the 8 streams in flight finish
        after = names[names.index("shutdown.started"):]
        [draining] = [e for e in events if e["event"] == "requests.draining"]
        assert draining["inflight"] == 8
        assert after.index("endpoint.deregistered") < after.index("requests.draining") < after.index("request.finished")
        assert after.count("request.finished") == 8
        restarted = [e for e in events if e["event"] == "actor.restarted"]
        assert [e["actor"] for e in restarted] == ["root/endpoint/listener"]  # it came back during the drain
    finally:
        gen.close()
