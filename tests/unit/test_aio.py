"""The asyncio loop the tree lends to asyncio libraries (trio-asyncio)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio
import trio_asyncio

from supervisor.aio import open_asyncio_loop


def _where() -> str:
    return threading.current_thread().name


async def test_run_in_executor_accepts_a_foreign_thread_pool() -> None:
    """vLLM hands its own ThreadPoolExecutor to run_in_executor; ours runs it."""
    async with open_asyncio_loop():
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-like") as pool:

            async def on_asyncio() -> str:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(pool, _where)

            name = await trio_asyncio.aio_as_trio(on_asyncio)()
    assert name.startswith("vllm-like")


async def test_run_in_executor_default_executor_still_works() -> None:
    async with open_asyncio_loop():

        async def on_asyncio() -> int:
            return await asyncio.get_running_loop().run_in_executor(None, lambda: 41 + 1)

        assert await trio_asyncio.aio_as_trio(on_asyncio)() == 42


async def test_unpatched_trio_asyncio_rejects_foreign_executors() -> None:
    """Why the patch exists: trio-asyncio 0.16 alone refuses a ThreadPoolExecutor."""
    async with trio_asyncio.open_loop():
        with ThreadPoolExecutor(max_workers=1) as pool:

            async def on_asyncio() -> str:
                return await asyncio.get_running_loop().run_in_executor(pool, _where)

            with pytest.raises(AssertionError):
                await trio_asyncio.aio_as_trio(on_asyncio)()


async def test_non_executor_is_a_clear_type_error() -> None:
    async with open_asyncio_loop():

        async def on_asyncio() -> None:
            await asyncio.get_running_loop().run_in_executor("not an executor", _where)

        with pytest.raises(TypeError, match="needs an Executor"):
            await trio_asyncio.aio_as_trio(on_asyncio)()
    await trio.lowlevel.checkpoint()
