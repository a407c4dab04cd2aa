"""Behaviour of the generic supervisor tree, in process."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from supervisor.errors import ActorKilled, Escalation, StartFailed
from supervisor.tree import (
    ActorContext,
    ActorRegistry,
    Backoff,
    ChildSpec,
    Restart,
    Strategy,
    Supervisor,
    TaskStatus,
    root_context,
)


class Probe:
    """Records what the actors it makes do, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.starts: dict[str, int] = {}
        self.fail_on_start: set[str] = set()

    def actor(
        self, name: str, *, ret: bool = False, start_delay: float = 0.0, cleanup: float = 0.0
    ) -> Callable[..., Any]:
        async def run(ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
            self.starts[name] = self.starts.get(name, 0) + 1
            self.events.append(("start", name))
            if start_delay:
                await trio.sleep(start_delay)
            if name in self.fail_on_start:
                raise RuntimeError(f"{name} cannot start")
            task_status.started()
            self.events.append(("ready", name))
            try:
                if ret:
                    return
                await trio.sleep_forever()
            finally:
                if cleanup:
                    with ctx.cleanup_scope():
                        await trio.sleep(cleanup)
                        self.events.append(("cleaned", name))
                self.events.append(("stop", name))

        return run

    def names(self, kind: str) -> list[str]:
        return [n for k, n in self.events if k == kind]


@contextmanager
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as captured:
        yield captured


class Handle:
    """A running root supervisor: its registry, its scope, and how it ended."""

    def __init__(self) -> None:
        self.registry = ActorRegistry()
        self.scope = trio.CancelScope()
        self.error: BaseException | None = None
        self.done = trio.Event()

    async def run(self, sup: Supervisor, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                await sup.run(root_context(self.registry, "root"), task_status=task_status)
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()


async def start_tree(nursery: trio.Nursery, sup: Supervisor) -> Handle:
    handle = Handle()
    try:
        await nursery.start(handle.run, sup)
    except RuntimeError:  # failed before started(): the error is in the handle
        pass
    return handle


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


NO_BACKOFF = Backoff(base=0.0)


def specs(probe: Probe, names: str, **kw: Any) -> list[ChildSpec]:
    kw.setdefault("backoff", NO_BACKOFF)
    return [ChildSpec(n, probe.actor(n), **kw) for n in names]


async def test_children_start_in_order_each_ready_before_next() -> None:
    """Child b does not start until a has reported ready."""
    probe = Probe()
    children = [ChildSpec("a", probe.actor("a", start_delay=0.05)), ChildSpec("b", probe.actor("b"))]
    async with trio.open_nursery() as n:
        await start_tree(n, Supervisor(children))
        assert probe.events == [("start", "a"), ("ready", "a"), ("start", "b"), ("ready", "b")]
        n.cancel_scope.cancel()


async def test_stop_order_is_reverse_start_order() -> None:
    probe = Probe()
    sup = Supervisor(specs(probe, "abc"))
    async with trio.open_nursery() as n:
        scope = (await start_tree(n, sup)).scope
        scope.cancel(reason="test over")
    assert probe.names("stop") == ["c", "b", "a"]
    assert sup.stop_order == ["root/c", "root/b", "root/a"]


async def test_one_for_one_restarts_only_the_failed_child() -> None:
    probe = Probe()
    sup = Supervisor(specs(probe, "abc"), Strategy.ONE_FOR_ONE)
    async with trio.open_nursery() as n:
        t = await start_tree(n, sup)
        registry = t.registry
        assert registry.kill("root/b")
        await settle()
        assert probe.starts == {"a": 1, "b": 2, "c": 1}
        cell = registry.get("root/b")
        assert cell is not None and cell.restarts == 1 and cell.state.value == "running"
        assert cell.last_error is not None and "ActorKilled" in cell.last_error
        n.cancel_scope.cancel()


async def test_one_for_all_restarts_everyone_in_order() -> None:
    probe = Probe()
    sup = Supervisor(specs(probe, "abc"), Strategy.ONE_FOR_ALL)
    async with trio.open_nursery() as n:
        t = await start_tree(n, sup)
        registry = t.registry
        probe.events.clear()
        registry.kill("root/b")
        await settle()
        # the others stop in reverse order, then all start again in order
        assert probe.names("stop") == ["b", "c", "a"]
        assert probe.names("start") == ["a", "b", "c"]
        n.cancel_scope.cancel()


async def test_rest_for_one_restarts_the_failed_child_and_those_after_it() -> None:
    probe = Probe()
    sup = Supervisor(specs(probe, "abcd"), Strategy.REST_FOR_ONE)
    async with trio.open_nursery() as n:
        t = await start_tree(n, sup)
        registry = t.registry
        probe.events.clear()
        registry.kill("root/b")
        await settle()
        assert probe.names("stop") == ["b", "d", "c"]
        assert probe.names("start") == ["b", "c", "d"]
        assert probe.starts["a"] == 1
        n.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("restart", "how", "restarted"),
    [
        (Restart.PERMANENT, "return", True),
        (Restart.PERMANENT, "crash", True),
        (Restart.TRANSIENT, "return", False),
        (Restart.TRANSIENT, "crash", True),
        (Restart.TEMPORARY, "return", False),
        (Restart.TEMPORARY, "crash", False),
    ],
)
async def test_restart_types(restart: Restart, how: str, restarted: bool) -> None:
    probe = Probe()
    go = trio.Event()
    runs = 0

    async def child(ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal runs
        runs += 1
        task_status.started()
        if runs > 1:
            await trio.sleep_forever()
        await go.wait()
        if how == "crash":
            raise ValueError("boom")

    sup = Supervisor([ChildSpec("x", child, restart), *specs(probe, "y")])
    async with trio.open_nursery() as n:
        t = await start_tree(n, sup)
        registry = t.registry
        go.set()
        await settle()
        assert runs == (2 if restarted else 1)
        cell = registry.get("root/x")
        assert cell is not None
        assert cell.state.value == ("running" if restarted else ("crashed" if how == "crash" else "stopped"))
        assert probe.starts["y"] == 1  # siblings untouched
        n.cancel_scope.cancel()


async def test_intensity_exceeded_escalates_to_parent() -> None:
    """More than `intensity` restarts within `period` -> Escalation, children stopped."""
    probe = Probe()
    sup = Supervisor(specs(probe, "ab"), intensity=2, period=10.0)
    with logs() as captured:
        async with trio.open_nursery() as n:
            t = await start_tree(n, sup)
            for _ in range(3):
                assert t.registry.kill("root/b")
                await settle()
            with trio.fail_after(2):
                await t.done.wait()
    assert isinstance(t.error, Escalation)
    assert "more than 2 restarts" in str(t.error)
    assert isinstance(t.error.cause, ActorKilled)
    assert probe.starts["b"] == 3  # two restarts, then gave up
    assert probe.names("stop")[-2:] == ["b", "a"]
    escalated = [e for e in captured if e["event"] == "actor.escalated"]
    assert len(escalated) == 1 and escalated[0]["actor"] == "root"


async def test_restarts_outside_period_do_not_count() -> None:
    probe = Probe()
    sup = Supervisor(specs(probe, "a"), intensity=1, period=1.0)
    async with trio.open_nursery() as n:
        t = await start_tree(n, sup)
        registry = t.registry
        for _ in range(4):  # one restart per period: never more than 1 in 1 s
            registry.kill("root/a")
            await settle()
            await trio.sleep(1.05)
        assert probe.starts["a"] == 5
        n.cancel_scope.cancel()


async def test_significant_child_ending_takes_the_supervisor_down() -> None:
    probe = Probe()
    children = [
        ChildSpec("system", probe.actor("system")),
        ChildSpec("engine", probe.actor("engine"), Restart.TEMPORARY, significant=True),
        ChildSpec("health", probe.actor("health")),
    ]
    sup = Supervisor(children, intensity=100)
    async with trio.open_nursery() as n:
        t = await start_tree(n, sup)
        t.registry.kill("root/engine", RuntimeError("engine core died"))
        with trio.fail_after(2):
            await t.done.wait()
    assert isinstance(t.error, Escalation)
    assert "significant child root/engine ended" in str(t.error)
    assert isinstance(t.error.cause, RuntimeError)
    assert probe.starts["engine"] == 1  # never restarted
    assert probe.names("stop") == ["engine", "health", "system"]


async def test_crash_and_restart_are_logged_with_actor_path() -> None:
    probe = Probe()
    sup = Supervisor(specs(probe, "ab"))
    with logs() as captured:
        async with trio.open_nursery() as n:
            t = await start_tree(n, sup)
            registry = t.registry
            registry.kill("root/a")
            await settle()
            n.cancel_scope.cancel()
    by_event = [(e["event"], e.get("actor")) for e in captured]
    assert ("actor.started", "root/a") in by_event
    assert ("actor.ready", "root/a") in by_event
    assert ("actor.crashed", "root/a") in by_event
    assert ("actor.restarted", "root/a") in by_event
    restarted = next(e for e in captured if e["event"] == "actor.restarted")
    assert restarted["restarts"] == 1


async def test_cancel_reason_is_logged_on_stop() -> None:
    probe = Probe()
    sup = Supervisor(specs(probe, "ab"))
    with logs() as captured:
        async with trio.open_nursery() as n:
            scope = (await start_tree(n, sup)).scope
            scope.cancel(reason="SIGTERM: shutdown")
    stopped = [e for e in captured if e["event"] == "actor.stopped"]
    assert [e["actor"] for e in stopped] == ["root/b", "root/a"]
    assert all(e["reason"] == "SIGTERM: shutdown" for e in stopped)


async def test_nested_supervisors_restart_locally_and_escalate_upwards() -> None:
    probe = Probe()
    inner = Supervisor(specs(probe, "x"), intensity=1, period=10.0)
    outer = Supervisor(
        [ChildSpec("inner", inner.run, shutdown="infinity"), *specs(probe, "y")], intensity=5, period=10.0
    )
    async with trio.open_nursery() as n:
        t = await start_tree(n, outer)
        registry = t.registry
        assert registry.get("root/inner/x") is not None
        registry.kill("root/inner/x")  # inner restarts x itself
        await settle()
        assert probe.starts["x"] == 2
        inner_cell = registry.get("root/inner")
        assert inner_cell is not None and inner_cell.restarts == 0
        registry.kill("root/inner/x")  # second restart in period: inner gives up
        await settle()
        inner_cell = registry.get("root/inner")
        assert inner_cell is not None and inner_cell.restarts == 1  # outer restarted inner
        assert inner_cell.last_error is not None and "Escalation" in inner_cell.last_error
        assert probe.starts["x"] == 3 and probe.starts["y"] == 1
        n.cancel_scope.cancel()


async def test_failure_before_ready_at_first_start_fails_the_supervisor() -> None:
    probe = Probe()
    probe.fail_on_start.add("b")
    async with trio.open_nursery() as n:
        t = await start_tree(n, Supervisor(specs(probe, "abc")))
    assert isinstance(t.error, StartFailed)
    assert "root/b failed to start" in str(t.error)
    assert "c" not in probe.starts
    assert probe.names("stop") == ["a"]


async def test_failure_to_restart_counts_towards_intensity() -> None:
    probe = Probe()
    sup = Supervisor(specs(probe, "ab"), intensity=3, period=10.0)
    async with trio.open_nursery() as n:
        t = await start_tree(n, sup)
        probe.fail_on_start.add("b")
        t.registry.kill("root/b")
        with trio.fail_after(2):
            await t.done.wait()
    assert isinstance(t.error, Escalation)
    assert probe.starts["b"] == 4  # the first run, then three failed restarts


async def test_cancelling_a_supervisor_interrupts_a_child_still_starting() -> None:
    probe = Probe()
    sup = Supervisor([ChildSpec("slow", probe.actor("slow", start_delay=100))])
    with trio.fail_after(2):
        async with trio.open_nursery() as n:
            n.start_soon(sup.run, root_context(ActorRegistry()))
            await trio.sleep(0.05)
            n.cancel_scope.cancel()
    assert probe.names("ready") == []


@pytest.mark.parametrize(("shutdown", "cleaned"), [(5.0, True), ("brutal", False), ("infinity", True)])
async def test_shutdown_bounds_cleanup(shutdown: Any, cleaned: bool) -> None:
    probe = Probe()
    sup = Supervisor([ChildSpec("a", probe.actor("a", cleanup=0.05), shutdown=shutdown)])
    async with trio.open_nursery() as n:
        scope = (await start_tree(n, sup)).scope
        scope.cancel()
    assert (("cleaned", "a") in probe.events) is cleaned
    assert probe.names("stop") == ["a"]


async def test_kill_unknown_path_is_refused_and_snapshot_lists_actors() -> None:
    probe = Probe()
    async with trio.open_nursery() as n:
        t = await start_tree(n, Supervisor(specs(probe, "ab")))
        registry = t.registry
        assert not registry.kill("root/nope")
        registry.kill("root/a")
        await settle()
        snap = {s["path"]: s for s in registry.snapshot()}
        assert set(snap) == {"root/a", "root/b"}
        assert snap["root/a"]["restarts"] == 1 and snap["root/b"]["restarts"] == 0
        assert snap["root/a"]["state"] == "running"
        assert registry.all_ready()
        n.cancel_scope.cancel()


async def test_restart_backoff_delays_a_crash_loop_but_not_kills() -> None:
    """The first restart after a crash is immediate; later crashes within the
    period wait. Deliberate kills (chaos) are restarted at once, always."""
    starts = 0
    crash = trio.Event()

    async def flaky(ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal starts
        starts += 1
        task_status.started()
        await crash.wait()
        raise RuntimeError("dependency down")

    backoff = Backoff(base=0.2, cap=1.0, jitter=0.0)
    sup = Supervisor([ChildSpec("a", flaky, backoff=backoff)], intensity=100, period=60)
    async with trio.open_nursery() as n:
        t = await start_tree(n, sup)
        for _ in range(5):  # kills: no backoff
            t.registry.kill("root/a")
            await settle()
        assert starts == 6
        crash.set()  # now it crash-loops
        await settle()
        assert starts == 7  # first crash: immediate restart, which crashes again at once
        cell = t.registry.get("root/a")
        assert cell is not None and cell.state.value == "restarting"  # second crash: waiting 0.2 s
        await trio.sleep(0.3)
        assert starts == 8
        n.cancel_scope.cancel()


@given(
    k=st.integers(min_value=0, max_value=50),
    base=st.floats(0.001, 1.0),
    cap=st.floats(0.001, 5.0),
    jitter=st.floats(0.0, 1.0),
    seed=st.integers(),
)
def test_backoff_delay_bounds(k: int, base: float, cap: float, jitter: float, seed: int) -> None:
    delay = Backoff(base, cap, jitter).delay(k, random.Random(seed))
    if k <= 1:
        assert delay == 0.0
    else:
        assert 0.0 <= delay <= cap * (1 + jitter) + 1e-9
        assert delay >= min(cap, base * 2 ** (k - 2)) * (1 - jitter) - 1e-9


def test_child_spec_validates_names_and_shutdown() -> None:
    async def f(ctx: ActorContext, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        raise AssertionError

    with pytest.raises(ValueError, match="no '/'"):
        ChildSpec("a/b", f)
    with pytest.raises(ValueError, match="shutdown"):
        ChildSpec("a", f, shutdown="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate"):
        Supervisor([ChildSpec("a", f), ChildSpec("a", f)])


def test_actor_killed_is_the_default_kill_error() -> None:
    assert issubclass(ActorKilled, Exception)
