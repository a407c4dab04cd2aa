"""Text mode on the request plane (``--use-vllm-tokenizer``): a worker that takes
OpenAI-style requests (``prompt`` or chat ``messages`` plus the OpenAI sampling fields)
instead of token ids, applies the model's chat template, tokenizes, and streams
OpenAI chunks (``chat.completion.chunk`` or ``text_completion``) with the text, as
Dynamo's vLLM worker does in that mode. The frontend then needs no tokenizer.

Token-mode requests (``token_ids``) are still served as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import trio

from .errors import invalid
from .handlers import Emit, Handlers
from .openai.render import Renderer
from .openai.request import parse_call, prompt_payload, tokenize
from .openai.tokenizer import Tokenizer, TokenizerRunner

__all__ = ["TextMode"]


class TextMode:
    def __init__(self, handlers: Handlers, tokenizer_factory: Callable[[], Tokenizer]) -> None:
        self.handlers = handlers
        self.tokenizer_factory = tokenizer_factory
        self._runner: TokenizerRunner | None = None
        self._loading = trio.Lock()

    @staticmethod
    def wants(payload: Any) -> bool:
        return isinstance(payload, Mapping) and "token_ids" not in payload and (
            "messages" in payload or "prompt" in payload)

    async def runner(self) -> TokenizerRunner:
        async with self._loading:
            if self._runner is None:
                self._runner = TokenizerRunner(await trio.to_thread.run_sync(self.tokenizer_factory))
        return self._runner

    async def generate(self, payload: Mapping[str, Any], emit: Emit, request_id: str) -> None:
        runner = await self.runner()
        call = parse_call(dict(payload), chat="messages" in payload, request_id=request_id)
        call.prompts = await tokenize(call, runner)
        if len(call.prompts) != 1:
            raise invalid("text mode takes one prompt per request", param="prompt")
        info = await self.handlers.info()
        request = await self.handlers.prepare(prompt_payload(call, call.prompts[0], max_model_len=info.max_model_len),
                                              request_id)
        renderer = Renderer(call, info.model, runner.tokenizer)
        for chunk in renderer.first_chunks():
            await emit(chunk)
        async with self.handlers.engine.generate(request) as stream:
            async for out in stream:
                for chunk in renderer.chunks(0, out):
                    await emit(chunk)
        for chunk in renderer.last_chunks():
            await emit(chunk)
