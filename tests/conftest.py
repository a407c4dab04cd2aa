"""Shared fixtures: the tiny test model and one real-vLLM worker per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import VllmServe, Worker, free_port, ready_worker, worker_fixture

# vLLM's default CPU binding ("auto") pins the model runner to one core; on a two-core virtual
# machine every other process (a test client among them) then waits seconds at a time for a CPU
# while a request generates (README, known limits). Every vLLM the tests start (our workers,
# vllm serve, offline vLLM) inherits this, so they all run alike.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

VLLM_TEST_ARGS = (
    "--max-model-len", "2048",
    "--block-size", "32",
    "--enforce-eager",
    "--seed", "0",
    "--kv-cache-memory-bytes", str(16 * 2**20),
    # compact JSON under a JSON constraint: the random model then closes what it opens (vLLM 0.32 takes
    # this from the engine's config only, not per request)
    "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from actors.engine.models import build_tiny_llama, default_cache_dir

    return build_tiny_llama(default_cache_dir() / "tiny-llama-test")


@pytest.fixture(scope="session")
def tiny_llava() -> Path:
    from actors.engine.models import build_tiny_llava, default_cache_dir

    return build_tiny_llava(default_cache_dir() / "tiny-llava-test")


def vllm_worker_args(model: Path, *extra: str) -> list[str]:
    return ["--engine", "vllm", "--model", str(model), *VLLM_TEST_ARGS, "--system-port", "0", *extra]


def start_vllm_worker(model: Path, tmp: Path, *extra: str, engine_args: tuple[str, ...] = VLLM_TEST_ARGS,
                      kv_port: int | None = None) -> Iterator[Worker]:
    """``kv_port``: vLLM's KV event port, and its replay port 1000 above (as
    ``tests.kvfake.free_port_pair`` finds them); by default two free ports."""
    env: dict[str, str | None] = {
        "DYN_FILE_DISCOVERY_DIR": str(tmp / "discovery"),
        "VLLM_CPU_KVCACHE_SPACE": None,  # it would override --kv-cache-memory-bytes
        # parallel workers must not fight over vLLM's KV event ports
        "DYN_VLLM_KV_EVENT_PORT": str(kv_port if kv_port is not None else free_port()),
        "DYN_VLLM_KV_EVENT_REPLAY_PORT": str(kv_port + 1000 if kv_port is not None else free_port()),
    }
    yield from worker_fixture("--engine", "vllm", "--model", str(model), *engine_args, "--system-port", "0", *extra,
                              env=env)


@pytest.fixture(scope="session")
def vllm_worker(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One real vLLM worker (tiny model) shared by the tests that do not kill it."""
    yield from ready_worker(start_vllm_worker(tiny_model, tmp_path_factory.mktemp("vllm-worker"), "--http-port", "0"),
                            timeout=180)


def start_vllm_serve(model: Path, *extra: str, engine_args: tuple[str, ...] = VLLM_TEST_ARGS) -> Iterator[VllmServe]:
    """``vllm serve`` on ``model`` with the engine flags our test workers use: the reference."""
    # the same AMX permission fix our worker applies (actors/engine/vllm_worker.py): without it
    # vllm serve's worker dies with SIGILL on its first request on AMX machines
    server = VllmServe("--model", str(model), *engine_args,
                       "--worker-extension-cls", "actors.engine.vllm_worker.WorkerSetup", *extra,
                       env={"VLLM_CPU_KVCACHE_SPACE": None, "DYN_VLLM_KV_EVENT_PORT": None,
                            "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})  # as our worker runs it
    try:
        server.wait_ready()
        yield server
    finally:
        left = server.stop()
        assert not left, f"vllm serve left processes behind: {[p.pid for p in left]}"


@pytest.fixture(scope="session")
def vllm_serve(tiny_model: Path) -> Iterator[VllmServe]:
    """``vllm serve`` on the tiny model with the same engine flags as ``vllm_worker``: the reference."""
    yield from start_vllm_serve(tiny_model)


@pytest.fixture(scope="session")
def tiny_tool_model() -> Path:
    from actors.engine.models import build_tiny_tool_llama, default_cache_dir

    return build_tiny_tool_llama(default_cache_dir() / "tiny-tool-llama-test")


def request_address(worker: Worker) -> str:
    return f"127.0.0.1:{worker.wait_event('request_plane.listening')['port']}"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def openai_pair(model: Path, tmp: Path, serve_args: tuple[str, ...], worker_args: tuple[str, ...],
                engine_args: tuple[str, ...] = VLLM_TEST_ARGS) -> Iterator[tuple[Any, Any, str]]:
    """Our worker (its HTTP front) and ``vllm serve`` on ``model``, loading side by side; yields an
    ``openai`` client for each (ours, theirs) and the model's name."""
    import openai

    serve_gen = start_vllm_serve(model, *serve_args, engine_args=engine_args)
    worker_gen = start_vllm_worker(model, tmp, "--http-port", "0", *worker_args, engine_args=engine_args)
    try:
        worker: Worker = next(worker_gen)
        serve: VllmServe = next(serve_gen)
        worker.wait_ready(240)
        port = worker.wait_event("http.listening")["port"]
        ours = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        theirs = openai.OpenAI(base_url=f"{serve.base_url}/v1", api_key="x", max_retries=0, timeout=120)
        yield ours, theirs, str(model)
    finally:
        worker_gen.close()
        serve_gen.close()
