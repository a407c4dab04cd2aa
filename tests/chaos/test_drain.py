"""SIGTERM drains, out of process, over the TCP request plane (synthetic engine)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor.client import Call, CallError
from tests.procs import Worker, worker_fixture


def address(worker: Worker) -> str:
    return f"127.0.0.1:{worker.wait_event('request_plane.listening')['port']}"


def payload(n: int) -> dict[str, Any]:
    return {"token_ids": [1, 2, 3], "stop_conditions": {"max_tokens": n}}


async def run_streams(addr: str, count: int, n: int, started: trio.Semaphore, results: list[Any]) -> None:
    async def one() -> None:
        try:
            async with Call(addr, "generate", payload(n)) as call:
                items = []
                async for item in call:
                    if not items:
                        started.release()
                    items.append(item)
            results.append(items[-1]["finish_reason"])
        except CallError as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)


def start(tmp_path: Path, *args: str, **env: str) -> Any:
    return worker_fixture("--engine", "synthetic", "--synthetic-step-ms", "20", *args,
                          env={"DYN_FILE_DISCOVERY_DIR": str(tmp_path), **env})


def registered(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in tmp_path.glob("*/*.json")]


async def test_sigterm_lets_8_streams_finish_and_exits_0(tmp_path: Path) -> None:
    gen = start(tmp_path)
    worker = next(gen)
    try:
        worker.wait_ready()
        addr = address(worker)
        assert len(registered(tmp_path)) == 1
        results: list[Any] = []
        started = trio.Semaphore(0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_streams, addr, 8, 60, started, results)
            for _ in range(8):
                await started.acquire()
            worker.signal(signal.SIGTERM)
            await trio.to_thread.run_sync(lambda: worker.wait_event("shutdown.started", timeout=5))
            with pytest.raises(CallError) as refused:  # new work is refused, migratably
                async with Call(addr, "generate", payload(2)) as call:
                    await call.collect()
            assert refused.value.code == "shutting_down" and refused.value.migratable
        assert results == ["length"] * 8
        assert registered(tmp_path) == []
        assert await trio.to_thread.run_sync(worker.wait, 10.0) == 0
        names = [e["event"] for e in worker.events()]
        # deregistered first, before any stream finished
        assert names.index("endpoint.deregistered") < names.index("request.finished")
    finally:
        gen.close()


async def test_grace_period_over_aborts_with_a_migratable_error(tmp_path: Path) -> None:
    gen = start(tmp_path, DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS="0.5")
    worker = next(gen)
    try:
        worker.wait_ready()
        results: list[Any] = []
        started = trio.Semaphore(0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_streams, address(worker), 4, 5000, started, results)
            for _ in range(4):
                await started.acquire()
            worker.signal(signal.SIGTERM)
        assert len(results) == 4
        for r in results:
            assert isinstance(r, CallError) and r.code == "shutting_down" and r.migratable, r
        assert await trio.to_thread.run_sync(worker.wait, 10.0) == 0
        assert any(e["event"] == "shutdown.drain_timeout" for e in worker.events())
    finally:
        gen.close()


async def test_second_signal_skips_the_drain(tmp_path: Path) -> None:
    gen = start(tmp_path, DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS="60")
    worker = next(gen)
    try:
        worker.wait_ready()
        results: list[Any] = []
        started = trio.Semaphore(0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_streams, address(worker), 2, 100000, started, results)
            for _ in range(2):
                await started.acquire()
            worker.signal(signal.SIGTERM)
            await trio.to_thread.run_sync(lambda: worker.wait_event("requests.draining", timeout=5))
            worker.signal(signal.SIGINT)
        assert all(isinstance(r, CallError) and r.migratable for r in results), results
        assert await trio.to_thread.run_sync(worker.wait, 10.0) == 0
        assert any(e["event"] == "shutdown.drain_skipped" for e in worker.events())
    finally:
        gen.close()


async def test_killing_the_listener_does_not_cut_streams(tmp_path: Path) -> None:
    gen = start(tmp_path, "--enable-chaos")
    worker = next(gen)
    try:
        worker.wait_ready()
        addr = address(worker)
        results: list[Any] = []
        started = trio.Semaphore(0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_streams, addr, 8, 50, started, results)
            for _ in range(8):
                await started.acquire()
            for _ in range(3):
                r = await trio.to_thread.run_sync(lambda: worker.post("/debug/actors/root/endpoint/listener/kill"))
                assert r.status_code == 200
        assert results == ["length"] * 8
        # and the restarted listener takes new connections on the same port
        async with Call(addr, "generate", payload(3)) as call:
            assert len(await call.collect()) == 3
    finally:
        gen.close()


def test_non_leader_dp_rank_runs_a_degraded_tree(tmp_path: Path) -> None:
    """Rank 1 of 2: engine, health, metrics; no endpoint server, nothing registered; up until signalled."""
    gen = start(tmp_path, "--data-parallel-size", "2", "--data-parallel-rank", "1")
    worker = next(gen)
    try:
        worker.wait_ready(timeout=60)
        paths = {a["path"] for a in worker.get("/debug/tree").json()}
        assert {"root/engine", "root/health", "root/metrics"} <= paths
        assert not any(p.startswith("root/endpoint") for p in paths)
        assert registered(tmp_path) == []
        names = {e["event"] for e in worker.events()}
        assert "request_plane.listening" not in names and "endpoint.registered" not in names
        assert worker.proc.poll() is None
        worker.signal(signal.SIGTERM)
        assert worker.wait(10) == 0
    finally:
        gen.close()
