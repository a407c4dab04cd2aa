"""A sleeping real-vLLM worker stays up, deregistered, and left alone by its health
checks for as long as it sleeps; woken, it registers again and serves."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from supervisor.client import Call, CallError
from tests.conftest import request_address, start_vllm_worker
from tests.procs import wait_until

pytestmark = pytest.mark.vllm


async def generate(address: str, n: int) -> list[dict[str, object]]:
    payload = {"token_ids": [1, 5, 9], "sampling_options": {"temperature": 0}, "stop_conditions": {"max_tokens": n}}
    async with Call(address, "generate", payload) as call:
        return await call.collect()


def test_asleep_for_long_then_woken(tiny_model: Path, tmp_path: Path) -> None:
    # a canary after 0.5 s idle that must answer within 1 s: sent to the paused engine it would fail
    # three times within about 5 s and take the worker down
    gen = start_vllm_worker(tiny_model, tmp_path, "--canary-wait-time", "0.5", "--health-check-timeout", "1",
                            "--health-check-interval", "0.1")
    worker = next(gen)
    try:
        worker.wait_ready(timeout=180)
        address = request_address(worker)
        before = trio.run(generate, address, 4)
        wait_until(lambda: any(e["event"] == "health.canary" and e["ok"] for e in worker.events()), 30,
                   "a passing canary while awake")
        records = lambda: list((tmp_path / "discovery").glob("*/*.json"))  # noqa: E731
        assert records()
        assert worker.post("/engine/sleep", json={"level": 1}, timeout=30).status_code == 200
        assert not records()
        # 150 monitor rounds (15 s) asleep: three times what killed a sleeping worker before
        wait_until(lambda: worker.get("/health").json()["health"]["asleep_ticks"] >= 150, 120,
                   lambda: str(worker.get("/health").json()))
        assert worker.proc.poll() is None
        assert not [e for e in worker.events() if e["event"] in ("health.canary_failed", "health.engine_dead")]
        with pytest.raises(CallError) as refused:
            trio.run(generate, address, 2)
        assert refused.value.code == "unavailable" and refused.value.migratable
        assert worker.post("/engine/wake_up", json={}, timeout=30).status_code == 200
        assert records()
        worker.wait_ready(timeout=30)
        assert trio.run(generate, address, 4) == before  # greedy, same as before the sleep
    finally:
        gen.close()
