"""Every line a real-vLLM worker (and everything it started) prints is a structured event:
with --log-format json, the combined stdout and stderr of a worker that loads vLLM, serves,
cancels, has an actor killed and is stopped parses line by line as JSON objects with an actor
and a timestamp (a worker whose engine core is killed mid-stream is checked the same way in
test_vllm_engine.py). With --log-format console, vLLM's own lines are rendered like ours
(checked under a pseudo-terminal)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from supervisor.client import Call
from tests.conftest import request_address, start_vllm_worker, vllm_worker_args
from tests.procs import REPO, Worker

pytestmark = pytest.mark.vllm


def lines_of(worker: Worker) -> list[str]:
    return [line for line in worker.log_path.read_text(errors="replace").splitlines() if line.strip()]


def assert_every_line_is_an_event(worker: Worker) -> list[dict[str, object]]:
    events = []
    for n, line in enumerate(lines_of(worker), 1):
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {n} is not JSON: {line[:300]!r}") from None
        assert isinstance(event, dict), f"line {n} is not an object: {line[:300]!r}"
        assert event.get("actor") and event.get("timestamp"), f"line {n} lacks actor or timestamp: {line[:300]!r}"
        events.append(event)
    return events


async def stream(address: str, n: int, request_id: str) -> None:
    payload = {"token_ids": [1, 5, 9], "stop_conditions": {"max_tokens": n, "ignore_eos": True}}
    async with Call(address, "generate", payload, request_id=request_id) as call:
        await call.collect()


def test_a_worker_lifetime_is_json_line_by_line(tiny_model: Path, tmp_path: Path) -> None:
    gen = start_vllm_worker(tiny_model, tmp_path, "--enable-chaos", "--http-port", "0",
                            "--log-level", "info,vllm=warning,hypercorn.error=warning")
    worker = next(gen)
    try:
        worker.wait_ready(180)
        address = request_address(worker)
        trio.run(stream, address, 8, "logged-1")

        async def cancel_one() -> None:
            payload = {"token_ids": [2, 3], "stop_conditions": {"max_tokens": 1500, "ignore_eos": True}}
            async with Call(address, "generate", payload, request_id="logged-cancel") as call:
                async for _ in call:
                    break

        trio.run(cancel_one)
        assert worker.post("/debug/actors/root/health/kill").status_code == 200
        port = worker.wait_event("http.listening")["port"]
        httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": str(tiny_model), "prompt": "x",
                                                                     "max_tokens": 2}, timeout=60)
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    finally:
        gen.close()
    events = assert_every_line_is_an_event(worker)
    names = {e["event"] for e in events}
    # what used to leave as raw text is there, as events: vLLM's import-time notice, native
    # warnings, the progress bar of the weights loading
    assert "model.loading" in names, sorted(names)[:50]
    loading = [e for e in events if e["event"] == "model.loading"]
    assert loading[-1]["done"] == loading[-1]["total"]
    assert any("Triton" in str(e["event"]) for e in events)
    # one request id through the request's events in the worker, the engine's own included
    logged = {e["event"] for e in events if e.get("request_id") == "logged-cancel"}
    assert {"request.started", "request.aborted", "engine.aborted"} <= logged
    # per-module levels, vLLM's loggers (in all of its processes) included
    assert not [e for e in events if str(e.get("logger", "")).startswith("vllm") and e["level"] == "info"]
    assert not [e for e in events if e.get("logger") == "hypercorn.error" and e["level"] == "info"]
    # the engine's processes wrote with their own pid and place in the tree
    core = [e for e in events if str(e.get("actor", "")).startswith("root/engine/core")]
    assert core and all(e.get("pid") not in (None, worker.proc.pid) for e in core)


def test_console_format_renders_vllm_lines_like_ours(tiny_model: Path, tmp_path: Path) -> None:
    """Under a pseudo-terminal, --log-format console: no JSON object lines at all (vLLM's
    included), and our own events and vLLM's both appear, rendered."""
    env = {**os.environ, "DYN_FILE_DISCOVERY_DIR": str(tmp_path), "VLLM_CPU_KVCACHE_SPACE": "",
           "DYN_VLLM_KV_EVENT_PORT": str(_port()), "DYN_VLLM_KV_EVENT_REPLAY_PORT": str(_port())}
    env.pop("VLLM_CPU_KVCACHE_SPACE")
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "--log-format", "console",
                             *vllm_worker_args(tiny_model)], stdin=subprocess.DEVNULL, stdout=terminal,
                            stderr=terminal, cwd=REPO, env=env, start_new_session=True)
    os.close(terminal)
    output = b""
    try:
        deadline = time.monotonic() + 240
        while b"endpoint.registered" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    output += os.read(controller, 65536)
                except OSError:
                    break
        assert b"endpoint.registered" in output, output[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < end:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    output += os.read(controller, 65536)
                except OSError:
                    break
        proc.wait(10)
        os.close(controller)
    text = output.decode(errors="replace")
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    assert not [line for line in lines if line.lstrip().startswith("{")], "JSON lines in console mode"
    assert any("vllm" in line and "[info" in line.lower() for line in lines), "vLLM's lines, rendered"
    assert any("actor.ready" in line for line in lines)


def _port() -> int:
    from tests.procs import free_port

    return free_port()
