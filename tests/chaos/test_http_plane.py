"""The HTTP request plane (``--request-plane http``), synthetic engine, real processes: the
same checked streams, cancels and frontend routing as the other planes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import trio

from supervisor.client import CallError, FileDiscovery, open_call
from tests.procs import REPO, Worker, worker_fixture
from tests.synthetic import continuation, text


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    gen = worker_fixture("--engine", "synthetic", "--synthetic-step-ms", "5", "--request-plane", "http",
                         env={"DYN_FILE_DISCOVERY_DIR": str(tmp_path / "discovery")})
    w = next(gen)
    w.wait_ready()
    yield w
    gen.close()


async def test_registered_over_http_streams_and_cancels(worker: Worker, tmp_path: Path) -> None:
    [record] = await FileDiscovery(tmp_path / "discovery").list("dynamo", "backend", "generate")
    assert record.transport == "http" and record.address.startswith("http://127.0.0.1:")
    payload = {"token_ids": [4, 2], "stop_conditions": {"max_tokens": 6}}
    async with open_call(record, "generate", payload) as call:
        items = await call.collect()
    assert [t for item in items for t in item["token_ids"]] == continuation([4, 2], 6)
    assert items[-1]["finish_reason"] == "length"
    # leaving early cancels it on the worker, and the engine drops it
    async with open_call(record, "generate", {"token_ids": [1], "stop_conditions": {"max_tokens": 100_000}},
                         request_id="leaves-early") as call:
        async for _ in call:
            break
    aborted = await trio.to_thread.run_sync(lambda: worker.wait_event("request.aborted", request_id="leaves-early"))
    assert aborted["reason"] == "client cancelled"
    # a bad request is a structured error, and the worker goes on
    with pytest.raises(CallError) as bad:
        async with open_call(record, "generate", {"token_ids": "nope"}) as call:
            await call.collect()
    assert bad.value.code == "invalid_request" and not bad.value.migratable


def test_the_cli_client_over_http(worker: Worker, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "supervisor.client", "--discovery-dir", str(tmp_path / "discovery"),
                          "--payload", '{"token_ids": [7], "stop_conditions": {"max_tokens": 3}}'],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.splitlines()) == 3


def test_the_frontend_serves_an_http_plane_worker(worker: Worker, tmp_path: Path) -> None:
    gen = worker_fixture("--role", "frontend", "--engine", "synthetic", "--http-port", "0",
                         env={"DYN_FILE_DISCOVERY_DIR": str(tmp_path / "discovery")})
    frontend = next(gen)
    try:
        frontend.wait_ready(30)
        port = frontend.wait_event("http.listening")["port"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        reply = client.completions.create(model="synthetic", prompt="over http", max_tokens=5)
        assert reply.choices[0].text == text(b"over http", 5)
    finally:
        gen.close()
