"""Variant (a) of the overhead benchmark: vLLM's AsyncLLM driven directly in asyncio.

    python -m bench.raw_engine PLAN.json OUT.json -- <vLLM engine flags>

The engine flags are parsed by vLLM's own parser (``AsyncEngineArgs``), the
same flags our worker and ``vllm serve`` get. The plan is a JSON list of
``{"tag": ..., "level": Level.as_dict()}`` run in order after a warm-up; the
output holds one :func:`bench.loadgen.record` per plan entry and the engine's
load time. The consumer of each stream is the asyncio task that iterates
``generate()`` (what vLLM's API server does), with no network in between.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .loadgen import (
    FOREIGN_CPU_LIMIT,
    CpuMeter,
    ForeignLoad,
    Level,
    Sample,
    Timer,
    engine_pids,
    engine_ttft,
    foreign_engines,
    pin_front_end,
    prompt_ids,
    record,
    wait_for_quiet,
)

WARMUP = [Level(1, 1, 32, 16), Level(8, 8, 32, 16)]


async def run_level(llm: Any, level: Level, tag: str) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(temperature=0.0, max_tokens=level.max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    samples: list[Sample] = []
    next_index = 0

    async def user() -> None:
        nonlocal next_index
        while next_index < level.requests:
            i = next_index
            next_index += 1
            ids = prompt_ids(i, level.prompt_len, level.vocab)
            s = Sample(start=time.perf_counter())
            samples.append(s)
            try:
                # a rendered token input, as vllm serve hands AsyncLLM (a raw {"prompt_token_ids": ...}
                # would go through the renderer's thread pool first)
                async for out in llm.generate(tokens_input(ids), params, request_id=f"{tag}-{i}"):
                    n = len(out.outputs[0].token_ids) if out.outputs else 0
                    if n:
                        s.chunk(time.perf_counter())
                        s.tokens += n
                s.end = time.perf_counter()
            except Exception as exc:  # recorded, not raised: one bad request must not hide the rest
                s.error = type(exc).__name__
                s.end = time.perf_counter()

    meter = CpuMeter(engine=engine_pids(os.getpid()))
    ttft0 = _engine_ttft()
    timer = Timer()
    await asyncio.gather(*(user() for _ in range(level.streams)))
    wall, cpu = timer.stop()
    ttft1 = _engine_ttft()
    # this process is the engine's front end and the client at once (no server in between)
    return {**record(samples, wall), "server_cpu_s": cpu, **meter.stop(),
            "engine_ttft_sum": ttft1[0] - ttft0[0], "engine_ttft_count": ttft1[1] - ttft0[1]}


def _engine_ttft() -> tuple[float, float]:
    from prometheus_client import REGISTRY, generate_latest

    return engine_ttft(generate_latest(REGISTRY).decode())


async def main(plan: list[dict[str, Any]], flags: list[str]) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(flags))
    t0 = time.monotonic()
    llm = AsyncLLM.from_engine_args(args)
    load_s = time.monotonic() - t0
    if os.environ.get("BENCH_PIN", "1") == "1":
        pin_front_end(os.getpid())  # this process is front end and client: as bench.overhead does
    try:
        for i, level in enumerate(WARMUP):
            await run_level(llm, level, f"warmup{i}")
        results = []
        for n, entry in enumerate(plan):
            level = Level(**entry["level"])
            rec: dict[str, Any] = {}
            for attempt in range(3):  # as bench.loadgen.guarded, on this loop
                wait_for_quiet(os.getpid())  # blocks the loop, with nothing in flight
                load = ForeignLoad(os.getpid())
                rec = await run_level(llm, level, f"{entry['tag']}-{n}-{attempt}")
                rec["foreign_cpu"] = round(load.stop(), 3)
                rec["disturbed"] = bool(foreign_engines(os.getpid())) or rec["foreign_cpu"] > FOREIGN_CPU_LIMIT
                rec["attempts"] = attempt + 1
                if not rec["disturbed"]:
                    break
            results.append({"tag": entry["tag"], "level": entry["level"], "record": rec})
            print(f"raw {level.streams:>3} streams: {rec['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        llm.shutdown()
    return {"load_s": load_s, "results": results}


if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    plan_file, out_file = argv[:split][:2]
    out = asyncio.run(main(json.loads(Path(plan_file).read_text()), argv[split + 1:]))
    Path(out_file).write_text(json.dumps(out))
