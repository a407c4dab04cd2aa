"""Load-generating clients: our TCP request plane (trio, :class:`supervisor.client.Call`) and
OpenAI streaming HTTP (aiohttp on uvloop), used for our front and for ``vllm serve`` alike.

Each runs one :class:`~bench.loadgen.Level` and returns a :func:`~bench.loadgen.record`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import trio

from supervisor.client import Call, CallError

from .loadgen import Level, Sample, Timer, prompt_ids, record

__all__ = ["http_level", "http_model", "tcp_level", "tcp_payload"]


def tcp_payload(level: Level, index: int) -> dict[str, Any]:
    return {
        "token_ids": prompt_ids(index, level.prompt_len, level.vocab),
        "sampling_options": {"temperature": 0.0},
        "stop_conditions": {"max_tokens": level.max_tokens, "ignore_eos": True},
    }


def http_body(level: Level, index: int, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt_ids(index, level.prompt_len, level.vocab),
        "max_tokens": level.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# -- our TCP request plane ---------------------------------------------------------


async def _tcp_level(address: str, level: Level, tag: str) -> dict[str, Any]:
    samples: list[Sample] = []
    next_index = 0

    async def user() -> None:
        nonlocal next_index
        while next_index < level.requests:
            i = next_index
            next_index += 1
            s = Sample(start=time.perf_counter())
            samples.append(s)
            try:
                async with Call(address, "generate", tcp_payload(level, i), request_id=f"{tag}-{i}") as call:
                    async for item in call:
                        n = len(item.get("token_ids") or ())
                        if n:
                            s.chunk(time.perf_counter())
                            s.tokens += n
                s.end = time.perf_counter()
            except (CallError, OSError) as exc:
                s.error = getattr(exc, "code", type(exc).__name__)
                s.end = time.perf_counter()

    timer = Timer()
    async with trio.open_nursery() as nursery:
        for _ in range(level.streams):
            nursery.start_soon(user)
    wall, cpu = timer.stop()
    return record(samples, wall, cpu)


def tcp_level(address: str, level: Level, tag: str) -> dict[str, Any]:
    return trio.run(_tcp_level, address, level, tag)


# -- OpenAI HTTP (our front and vllm serve) -------------------------------------------

_chunk_decoder = msgspec.json.Decoder()


async def _http_level(base: str, level: Level, tag: str, model: str) -> dict[str, Any]:
    import aiohttp

    samples: list[Sample] = []
    next_index = 0
    connector = aiohttp.TCPConnector(limit=level.streams, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)

    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:

        async def user() -> None:
            nonlocal next_index
            while next_index < level.requests:
                i = next_index
                next_index += 1
                s = Sample(start=time.perf_counter())
                samples.append(s)
                try:
                    async with session.post("/v1/completions", json=http_body(level, i, model)) as resp:
                        if resp.status != 200:
                            s.error = f"http_{resp.status}"
                            await resp.read()
                            s.end = time.perf_counter()
                            continue
                        async for line in resp.content:
                            if not line.startswith(b"data: "):
                                continue
                            data = line[6:].strip()
                            if data == b"[DONE]":
                                break
                            event = _chunk_decoder.decode(data)
                            if event.get("choices"):
                                s.chunk(time.perf_counter())
                            usage = event.get("usage")
                            if usage:
                                s.tokens = int(usage["completion_tokens"])
                            if "error" in event:
                                s.error = str(event["error"].get("code") or "error")
                    s.end = time.perf_counter()
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    s.error = type(exc).__name__
                    s.end = time.perf_counter()

        timer = Timer()
        await asyncio.gather(*(user() for _ in range(level.streams)))
        wall, cpu = timer.stop()
    return record(samples, wall, cpu)


def _run_asyncio(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def http_level(base: str, level: Level, tag: str, model: str) -> dict[str, Any]:
    return _run_asyncio(_http_level(base, level, tag, model))  # type: ignore[no-any-return]


def http_model(base: str) -> str:
    import httpx

    data = httpx.get(f"{base}/v1/models", timeout=10).json()
    return str(data["data"][0]["id"])
