"""No descendant outlives the worker: the moment the worker process has exited, every
process it started (its reaper, vLLM's EngineCore, VLLM::Worker, resource trackers) is
already gone, on each exit path. Real vLLM, tiny model."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest

from tests.conftest import start_vllm_worker
from tests.procs import Worker

pytestmark = pytest.mark.vllm


def assert_nothing_left(worker: Worker) -> None:
    left = worker.leftovers(grace=0)  # no grace: at the moment of the exit
    assert not left, [(p.pid, p.name(), p.status()) for p in left]


def descendants(worker: Worker) -> list[str]:
    names = []
    for proc in worker.processes():
        try:
            names.append(proc.name())
        except psutil.NoSuchProcess:
            continue
    return names


def test_sigterm(tiny_model: Path, tmp_path: Path) -> None:
    gen = start_vllm_worker(tiny_model, tmp_path)
    worker = next(gen)
    try:
        worker.wait_ready(timeout=180)
        assert len(descendants(worker)) >= 3, descendants(worker)  # worker, reaper, engine core (and its worker)
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        assert_nothing_left(worker)
    finally:
        gen.close()


def test_a_start_that_fails_after_vllm_spawned_its_processes(tiny_model: Path, tmp_path: Path) -> None:
    # a KV cache too small for one block: vLLM fails in its engine core, after starting it and its worker
    gen = start_vllm_worker(tiny_model, tmp_path, "--kv-cache-memory-bytes", "4096")
    worker = next(gen)
    try:
        assert worker.wait(180) == 1
        names = {e["event"] for e in worker.events()}
        assert "worker.failed" in names and "engine.ready" not in names
        assert_nothing_left(worker)
    finally:
        gen.close()
