"""Real vLLM over the NATS request plane with etcd discovery: 8 streams survive a listener
kill and a SIGTERM (all complete, exit 0, deregistered first, nothing left behind)."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor.aio import open_asyncio_loop
from supervisor.client import CallError, make_discovery, open_call
from tests.conftest import start_vllm_worker
from tests.servers import Server, etcd_server, nats_server  # noqa: F401

pytestmark = pytest.mark.vllm

# long enough to outlast the listener kill's round trip on a busy machine (max-model-len 2048)
TOKENS = 2000


async def test_nats_plane_etcd_discovery_listener_kill_and_sigterm_drain(
    tiny_model: Path, tmp_path: Path, nats_server: Server, etcd_server: Server  # noqa: F811
) -> None:
    namespace = f"vllm-{uuid.uuid4().hex[:8]}"
    gen = start_vllm_worker(tiny_model, tmp_path, "--request-plane", "nats", "--discovery-backend", "etcd",
                            "--namespace", namespace, "--enable-chaos", "--canary-wait-time", "3600")
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
        async with open_asyncio_loop():
            discovery = make_discovery("etcd", etcd_endpoints=etcd_server.url)
            [record] = await discovery.list(namespace, "backend", "generate")
            assert record.transport == "nats" and record.runtime_config["block_size"] == 32
            results: list[Any] = []
            streaming = trio.Semaphore(0)

            async def stream(i: int) -> None:
                payload = {"token_ids": [1, 10 + i, 20 + i], "sampling_options": {"temperature": 0.0},
                           "stop_conditions": {"max_tokens": TOKENS, "ignore_eos": True}}
                try:
                    async with open_call(record, "generate", payload, nats_servers=nats_server.url) as call:
                        items = []
                        async for item in call:
                            if not items:
                                streaming.release()
                            items.append(item)
                    results.append((items[-1]["finish_reason"], sum(len(x["token_ids"]) for x in items)))
                except CallError as exc:
                    results.append(exc)

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(stream, i)
                for _ in range(8):
                    await streaming.acquire()
                killed = await trio.to_thread.run_sync(
                    lambda: worker.post("/debug/actors/root/endpoint/listener/kill"))
                assert killed.status_code == 200
                # the drain is only tested if the streams are still running (the kill's round
                # trip took 2.7 s once, on two busy cores)
                assert results == [], "the streams ended before SIGTERM: make them longer"
                worker.signal(signal.SIGTERM)
            assert results == [("length", TOKENS)] * 8
            assert await discovery.list(namespace, "backend", "generate") == []  # deregistered
            await discovery.aclose()
        assert await trio.to_thread.run_sync(worker.wait, 60.0) == 0
        names = [e["event"] for e in worker.events()]
        # on SIGTERM the record goes first, then the streams still in flight finish
        after = names[names.index("shutdown.started"):]
        assert "request.finished" in after
        assert after.index("endpoint.deregistered") < after.index("request.finished")
        assert "actor.restarted" in names  # the listener came back while the streams ran
    finally:
        gen.close()
