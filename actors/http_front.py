"""The worker's own OpenAI front (``--http-port``): the shared OpenAI server
(:mod:`actors.openai`) over this worker's engine.

Requests become token-mode requests for the same :class:`~actors.handlers.Handlers`
the request plane uses, so validation, LoRA selection and sampling defaults are
the request plane's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .errors import ErrorCode, RequestError
from .handlers import Handlers
from .openai.parsing import ChatParsers
from .openai.server import OutputStream, ServedModel

__all__ = ["WorkerModels"]

OWNER = "llm-supervisor"


class WorkerModels:
    """:class:`~actors.openai.server.ModelBackend` over this worker's engine."""

    def __init__(self, handlers: Handlers, parsers: ChatParsers | None = None) -> None:
        self.handlers = handlers
        self.parsers = parsers or ChatParsers()

    async def serving(self, model: str | None, endpoint: str = "completions") -> ServedModel:
        info = await self.handlers.info()
        if model is None or model == info.model:
            return ServedModel(info.model, info.max_model_len, takes_messages=self.handlers.prompts is not None,
                               parsers=self.parsers)
        if model in self.handlers.loras.adapters:
            return ServedModel(model, info.max_model_len, adapter=model, parsers=self.parsers)
        raise RequestError(ErrorCode.NOT_FOUND, f"The model `{model}` does not exist.", param="model")

    async def models(self) -> list[dict[str, Any]]:
        info = await self.handlers.info()
        now = int(time.time())
        data: list[dict[str, Any]] = [{"id": info.model, "object": "model", "created": now, "owned_by": OWNER,
                                       "root": info.model, "parent": None, "max_model_len": info.max_model_len}]
        data += [{"id": name, "object": "model", "created": now, "owned_by": OWNER, "root": adapter.path,
                  "parent": info.model, "max_model_len": info.max_model_len}
                 for name, adapter in sorted(self.handlers.loras.adapters.items())]
        return data

    @asynccontextmanager
    async def generate(self, payload: dict[str, Any], engine_id: str) -> AsyncIterator[OutputStream]:
        request = await self.handlers.prepare(payload, engine_id)
        async with self.handlers.engine.generate(request) as stream:
            yield stream
