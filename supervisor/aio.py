"""The asyncio loop the tree lends to asyncio libraries (vLLM, nats-py, aetcd).

trio-asyncio runs an asyncio loop on top of trio, in the same thread. One loop
is opened for the whole process, so every actor can cross into asyncio with
``trio_asyncio.aio_as_trio``.

trio-asyncio 0.16's ``run_in_executor`` only accepts its own ``TrioExecutor``;
vLLM passes a ``concurrent.futures.ThreadPoolExecutor`` (tokenization, input
processing). We run such executors as they are and wrap their futures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio_asyncio

__all__ = ["open_asyncio_loop", "patch_run_in_executor"]


def patch_run_in_executor(loop: Any) -> None:
    """Make ``loop.run_in_executor`` accept any ``concurrent.futures.Executor``."""
    original: Callable[..., asyncio.Future[Any]] = loop.run_in_executor

    def run_in_executor(executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        if executor is None or isinstance(executor, trio_asyncio.TrioExecutor):
            return original(executor, func, *args)
        if not isinstance(executor, concurrent.futures.Executor):
            raise TypeError(f"run_in_executor needs an Executor, got {type(executor).__name__}")
        return asyncio.wrap_future(executor.submit(func, *args), loop=loop)

    loop.run_in_executor = run_in_executor


@asynccontextmanager
async def open_asyncio_loop() -> AsyncIterator[Any]:
    async with trio_asyncio.open_loop() as loop:
        patch_run_in_executor(loop)
        yield loop
