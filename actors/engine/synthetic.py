"""A deterministic stand-in engine: for benchmarks of the tree's own cost and for
chaos tests. Every behaviour it fakes is also tested on real vLLM.

It batches like a real engine: every ``step_s`` one step advances every running
request by one token per sample. Token ``i`` of sample ``j`` of a request is
``(sum(prompt) + i + 7 * j) % vocab``.
It can be told to die (all streams fail, ``run`` raises :class:`EngineDead`), to
hang (steps and health checks stop answering), or to fail one request (the
annotation ``synthetic:fail``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import structlog
import trio

from ..errors import EngineDead, RequestFailed
from .base import EngineInfo, EngineRequest, LoraAdapter, StepOutput, Stream

_log = structlog.get_logger("actors.engine.synthetic")


@dataclass
class _Running:
    request: EngineRequest
    send: trio.MemorySendChannel[StepOutput | BaseException]
    base: int
    produced: int = 0


class SyntheticEngine:
    name = "synthetic"

    def __init__(
        self,
        *,
        step_s: float = 0.01,
        vocab_size: int = 32000,
        max_model_len: int = 4096,
        block_size: int = 32,
        total_kv_blocks: int = 1024,
        max_num_seqs: int = 256,
        load_s: float = 0.0,
        die_after_s: float | None = None,
        hang_after_s: float | None = None,
        model: str = "synthetic",
    ) -> None:
        self.step_s = step_s
        self.vocab_size = vocab_size
        self.info = EngineInfo(
            model=model,
            total_kv_blocks=total_kv_blocks,
            block_size=block_size,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(max_model_len, 2048),
            load_time_s=load_s,
            bos_token_id=1,
            eos_token_ids=(2,),
            vocab_size=vocab_size,
        )
        self._load_s = load_s
        self._die_after_s = die_after_s
        self._hang_after_s = hang_after_s
        self._running: dict[str, _Running] = {}
        self._wakeup = trio.Event()
        self._dead: EngineDead | None = None
        self._hung = False
        self._paused = False
        self._alive = False
        self.aborted: list[str] = []
        self.loras: dict[int, LoraAdapter] = {}
        self.steps = 0
        self.prefix_cache_resets = 0

    # -- chaos controls ----------------------------------------------------
    def die(self, reason: str = "synthetic engine told to die") -> None:
        self._dead = EngineDead(reason)
        self._wakeup.set()

    def hang(self) -> None:
        self._hung = True

    # -- backend protocol --------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[EngineInfo] = trio.TASK_STATUS_IGNORED) -> None:
        started = time.monotonic()
        if self._load_s:
            await trio.sleep(self._load_s)
        self._alive = True
        task_status.started(self.info)
        _log.info("engine.loaded", backend=self.name, load_time_s=round(time.monotonic() - started, 3))
        try:
            async with trio.open_nursery() as nursery:
                if self._die_after_s is not None:
                    nursery.start_soon(self._die_later, self._die_after_s)
                if self._hang_after_s is not None:
                    nursery.start_soon(self._hang_later, self._hang_after_s)
                await self._step_loop()
        finally:
            self._alive = False
            error: BaseException = self._dead or EngineDead("engine shut down")
            self._fail_all(error)

    async def _die_later(self, delay: float) -> None:
        await trio.sleep(delay)
        self.die(f"synthetic engine died after {delay}s (--synthetic-die-after)")

    async def _hang_later(self, delay: float) -> None:
        await trio.sleep(delay)
        _log.warning("engine.hanging", backend=self.name)
        self.hang()

    async def _step_loop(self) -> None:
        while True:
            if self._dead is not None:
                raise self._dead
            if self._hung:
                await trio.sleep_forever()
            if not self._running or self._paused:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            if self.step_s > 0:
                await trio.sleep(self.step_s)
            else:
                await trio.lowlevel.checkpoint()
            if self._dead is not None or self._hung:
                continue
            self._step()

    def _step(self) -> None:
        self.steps += 1
        finished: list[str] = []
        for request_id, run in self._running.items():
            req = run.request
            outs: list[StepOutput] = []
            for sample in range(req.n):
                token = (run.base + run.produced + 7 * sample) % self.vocab_size
                done = run.produced + 1 >= req.max_tokens
                outs.append(StepOutput(token_ids=[token], index=sample, finish_reason="length" if done else None))
            run.produced += 1
            if run.produced >= req.max_tokens:
                last = outs[-1]
                last.final = True
                last.prompt_tokens = len(req.token_ids)
                last.completion_tokens = run.produced * req.n
                finished.append(request_id)
            try:
                for out in outs:
                    run.send.send_nowait(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                finished.append(request_id)  # consumer went away without abort
            if run.produced >= req.max_tokens:
                run.send.close()
        for request_id in finished:
            self._running.pop(request_id, None)

    async def submit(self, request: EngineRequest) -> Stream:
        send, recv = trio.open_memory_channel[StepOutput | BaseException](math.inf)
        if self._dead is not None or not self._alive:
            send.send_nowait(self._dead or EngineDead("engine is not running"))
            send.close()
            return recv
        if request.request_id in self._running:
            send.send_nowait(RequestFailed(f"request id {request.request_id!r} is already running"))
            send.close()
            return recv
        if "synthetic:fail" in request.annotations:
            send.send_nowait(RequestFailed("synthetic engine told to fail this request"))
            send.close()
            return recv
        if "synthetic:die" in request.annotations:
            self.die("synthetic engine told to die by a request")
        self._running[request.request_id] = _Running(request, send, base=sum(request.token_ids))
        self._wakeup.set()
        return recv

    async def abort(self, request_id: str) -> None:
        run = self._running.pop(request_id, None)
        if run is not None:
            self.aborted.append(request_id)
            run.send.close()

    async def check_health(self) -> None:
        if self._hung:
            await trio.sleep_forever()
        if self._dead is not None:
            raise self._dead
        if not self._alive:
            raise EngineDead("engine is not running")

    async def reset_prefix_cache(self) -> None:
        self.prefix_cache_resets += 1

    async def sleep(self, level: int) -> None:
        """Like vLLM on CPU: pause scheduling, drop the prefix cache."""
        self._paused = True
        self.prefix_cache_resets += 1

    async def wake_up(self, tags: list[str] | None) -> None:
        self._paused = False
        self._wakeup.set()

    async def add_lora(self, adapter: LoraAdapter) -> None:
        self.loras[adapter.lora_id] = adapter

    async def remove_lora(self, lora_id: int) -> None:
        self.loras.pop(lora_id, None)

    def _fail_all(self, error: BaseException) -> None:
        for run in self._running.values():
            try:
                run.send.send_nowait(error)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            run.send.close()
        self._running.clear()
