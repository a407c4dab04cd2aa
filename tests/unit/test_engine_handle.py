"""The engine handle: typed calls, and a request cancelled at any await point is
aborted in the engine (synthetic engine, in process, on trio's mock clock)."""

from __future__ import annotations

import trio
import trio.testing

from actors.engine.actor import EngineActor, EngineRef
from actors.engine.base import EngineRequest, LoraAdapter
from actors.engine.synthetic import SyntheticEngine
from supervisor.tree import ActorRegistry, ChildSpec, Restart, Strategy, Supervisor, run_supervised
from tests.synthetic import continuation


class SlowToAccept(SyntheticEngine):
    """Takes a request only when told to: a caller can be cancelled while it waits."""

    def __init__(self) -> None:
        super().__init__(step_s=0.01)
        self.taking = trio.Event()
        self.release = trio.Event()
        self.aborted_one = trio.Event()

    async def submit(self, request: EngineRequest):  # type: ignore[no-untyped-def]
        self.taking.set()
        await self.release.wait()
        return await super().submit(request)

    async def abort(self, request_id: str) -> None:
        await super().abort(request_id)
        self.aborted_one.set()


async def start_engine(nursery: trio.Nursery, backend: SyntheticEngine) -> EngineRef:
    registry = ActorRegistry()
    ref = EngineRef("root/engine", registry)
    root = Supervisor([ChildSpec("engine", EngineActor(backend, ref).run, Restart.TEMPORARY, significant=True)],
                      Strategy.ONE_FOR_ONE)
    await nursery.start(run_supervised, ChildSpec("root", root.run, shutdown="infinity"), registry)
    return ref


async def test_cancelled_while_the_engine_takes_the_request_aborts_it(autojump_clock: trio.testing.MockClock) -> None:
    backend = SlowToAccept()
    async with trio.open_nursery() as nursery:
        ref = await start_engine(nursery, backend)
        caller = trio.CancelScope()

        async def call() -> None:
            with caller:
                async with ref.generate(EngineRequest("r1", [1, 2], max_tokens=1_000_000)) as stream:
                    async for _ in stream:
                        pass

        nursery.start_soon(call)
        await backend.taking.wait()
        caller.cancel()  # the caller gives up while the engine is still taking the request
        await trio.sleep(0.1)
        backend.release.set()  # now the engine starts it
        with trio.fail_after(10):
            await backend.aborted_one.wait()
        assert backend.aborted == ["r1"]
        assert backend._running == {}, "the request was started and left running for nobody"
        nursery.cancel_scope.cancel()


async def test_leaving_a_stream_early_aborts_it(autojump_clock: trio.testing.MockClock) -> None:
    backend = SyntheticEngine(step_s=0.01)
    async with trio.open_nursery() as nursery:
        ref = await start_engine(nursery, backend)
        async with ref.generate(EngineRequest("r2", [3], max_tokens=1000)) as stream:
            first = await stream.__anext__()
            assert first.token_ids == continuation([3], 1)
        assert backend.aborted == ["r2"] and backend._running == {}
        nursery.cancel_scope.cancel()


async def test_typed_control_calls_reach_the_backend(autojump_clock: trio.testing.MockClock) -> None:
    backend = SyntheticEngine(step_s=0.01)
    async with trio.open_nursery() as nursery:
        ref = await start_engine(nursery, backend)
        await ref.sleep(1)
        assert backend._paused
        await ref.wake_up(None)
        assert not backend._paused
        await ref.add_lora(LoraAdapter("a", 1, "/x"))
        assert backend.loras == {1: LoraAdapter("a", 1, "/x")}
        await ref.remove_lora(1)
        assert backend.loras == {}
        await ref.reset_prefix_cache()
        assert backend.prefix_cache_resets == 2  # sleep drops the prefix cache too
        nursery.cancel_scope.cancel()


async def test_n_samples_are_told_apart_and_the_last_output_ends_it(autojump_clock: trio.testing.MockClock) -> None:
    backend = SyntheticEngine(step_s=0.01)
    async with trio.open_nursery() as nursery:
        ref = await start_engine(nursery, backend)
        outs = []
        async with ref.generate(EngineRequest("r3", [10], max_tokens=3, n=2)) as stream:
            outs = [out async for out in stream]
        assert [o.index for o in outs] == [0, 1] * 3
        assert [t for o in outs if o.index == 0 for t in o.token_ids] == continuation([10], 3, 0)
        assert [t for o in outs if o.index == 1 for t in o.token_ids] == continuation([10], 3, 1)
        assert [o.finish_reason for o in outs[-2:]] == ["length", "length"]
        assert [o.final for o in outs] == [False] * 5 + [True]
        assert outs[-1].completion_tokens == 6
        nursery.cancel_scope.cancel()
