"""Chaos, out of process: a real ``python -m supervisor`` with the synthetic
engine, killed actor by actor through the debug route."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import httpx
import pytest

from tests.procs import Worker, wait_until, worker_fixture

KILLS_PER_ACTOR = 10
NON_ENGINE = (
    "root/health",
    "root/metrics",
    "root/kv_events",
    "root/system",
    "root/endpoint/listener",
    "root/endpoint/registrar",
    "root/endpoint/connections",
    "root/endpoint",
)
# reverse start order; a supervisor reports stopped after its own children
STOP_ORDER = [
    "root/endpoint/registrar",
    "root/endpoint/listener",
    "root/endpoint/connections",
    "root/endpoint",
    "root/kv_events",
    "root/metrics",
    "root/health",
    "root/engine",
    "root/system",
]


@pytest.fixture
def worker() -> Iterator[Worker]:
    yield from worker_fixture("--engine", "synthetic", "--enable-chaos", "--system-port", "0")


def tree(worker: Worker) -> dict[str, dict[str, object]]:
    return {a["path"]: a for a in worker.get("/debug/tree").json()}


def kill(worker: Worker, path: str) -> None:
    try:
        r = worker.post(f"/debug/actors/{path}/kill")
    except httpx.HTTPError:
        # killing the system server can cut its own answer; it must still come back
        assert path.endswith("system")
        return
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "killed", "path": path}


def test_non_engine_actors_come_back_every_time(worker: Worker) -> None:
    """Each non-engine actor, killed many times, is restarted and /ready returns to 200."""
    worker.wait_ready()
    port = worker.system_port
    for path in NON_ENGINE:
        for i in range(KILLS_PER_ACTOR):
            kill(worker, path)
            worker.wait_ready(timeout=10)
            assert worker.system_port == port  # the system server comes back on the same port
            wait_until(lambda p=path, n=i + 1: tree(worker)[p]["restarts"] == n, 5, f"{path} restarts {i + 1}")
    snapshot = tree(worker)
    assert snapshot["root/engine"]["restarts"] == 0
    assert all(a["state"] == "running" for a in snapshot.values())
    crashed = [e for e in worker.events() if e.get("event") == "actor.crashed"]
    assert len(crashed) == len(NON_ENGINE) * KILLS_PER_ACTOR
    assert {e["actor"] for e in crashed} == set(NON_ENGINE)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert not worker.leftovers()


def test_killing_the_engine_exits_1(worker: Worker) -> None:
    worker.wait_ready()
    kill(worker, "root/engine")
    assert worker.wait(timeout=10) == 1
    events = worker.events()
    names = [e["event"] for e in events]
    assert "actor.escalated" in names
    failed = next(e for e in events if e["event"] == "worker.failed")
    assert "significant child root/engine ended" in failed["error"]
    # everything else was stopped, in reverse start order, before exit
    stopped = [e["actor"] for e in events if e["event"] == "actor.stopped"]
    assert stopped == [p for p in STOP_ORDER if p != "root/engine"]
    assert not worker.leftovers()


def test_sigterm_exits_0_and_stops_in_reverse_order(worker: Worker) -> None:
    worker.wait_ready()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0
    events = worker.events()
    stopped = [e["actor"] for e in events if e["event"] == "actor.stopped"]
    assert stopped == STOP_ORDER
    assert all(e["reason"] == "SIGTERM: shutdown" for e in events if e["event"] == "actor.stopped")
    assert not worker.leftovers()


def test_unknown_actor_and_chaos_off() -> None:
    """The kill route names the actors it knows; without --enable-chaos it does not exist."""
    gen = worker_fixture("--engine", "synthetic", "--enable-chaos")
    w = next(gen)
    try:
        w.wait_ready()
        r = w.post("/debug/actors/root/nope/kill")
        assert r.status_code == 404
        assert "root/engine" in r.json()["actors"]
    finally:
        gen.close()
    gen = worker_fixture("--engine", "synthetic")
    w = next(gen)
    try:
        w.wait_ready()
        assert w.post("/debug/actors/root/health/kill").status_code in (404, 405)
        assert w.get("/live").status_code == 200
    finally:
        gen.close()


@pytest.mark.parametrize(
    ("flag", "why"),
    [("--synthetic-die-after", "synthetic engine died"),
     ("--synthetic-hang-after", "did not answer check_health within 0.5s (3 times in a row)")],
)
def test_engine_death_and_hang_exit_1(flag: str, why: str) -> None:
    """An engine that dies, or hangs until the health monitor gives up on it (three checks in a
    row unanswered: one slow answer is no verdict), ends the worker with 1."""
    gen = worker_fixture("--engine", "synthetic", flag, "0.5", "--health-check-interval", "0.2",
                         "--health-check-timeout", "0.5")
    w = next(gen)
    try:
        w.wait_ready()
        assert w.wait(timeout=30) == 1
        failed = next(e for e in w.events() if e["event"] == "worker.failed")
        assert why in failed["cause"]
        if "hang" in flag:
            slow = [e for e in w.events() if e["event"] == "health.check_slow"]
            assert [e["timeouts"] for e in slow] == [1, 2], slow
    finally:
        gen.close()


def test_ready_is_503_until_the_engine_is_up() -> None:
    gen = worker_fixture("--engine", "synthetic", "--synthetic-load-s", "2")
    w = next(gen)
    try:
        w.system_port  # noqa: B018  (waits for the listening event)
        assert w.get("/live").status_code == 200
        r = w.get("/ready")
        assert r.status_code == 503
        assert "root/engine" in r.json()["actors_not_ready"]
        w.wait_ready(timeout=10)
    finally:
        gen.close()


def test_bad_command_line_exits_2_and_starts_nothing() -> None:
    w = Worker("--role", "nonsense")
    try:
        assert w.wait(timeout=30) == 2
        assert "--role" in w.log_path.read_text()
    finally:
        w.stop()
