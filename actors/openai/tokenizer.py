"""Tokenizers for the OpenAI layer, and running them off the event loop.

Tokenizing a long prompt or rendering a chat template takes milliseconds of
CPU; on the trio thread that would stall every stream in the process. So the
OpenAI layer calls a :class:`Tokenizer` only through :class:`TokenizerRunner`,
which runs the heavy ones in worker threads (bounded, so a burst of requests
queues instead of starting a thread each).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import trio

__all__ = ["ByteTokenizer", "HfTokenizer", "IncrementalDetokenizer", "Tokenizer", "TokenizerRunner"]

T = TypeVar("T")


class Tokenizer(Protocol):
    heavy: bool  # worth a thread per call

    def encode(self, text: str) -> list[int]: ...

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """The chat template applied (with the generation prompt) and tokenized."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str:
        """One token as text on its own (logprob entries)."""
        ...


class ByteTokenizer:
    """For the synthetic engine: UTF-8 bytes are tokens; ids render as `` <id>``."""

    heavy = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode()) or [0]

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        return self.encode("".join(f"{m.get('role')}: {m.get('content')}\n" for m in messages) + "assistant:")

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(f" {i}" for i in ids)

    def token_text(self, token_id: int) -> str:
        return f" {token_id}"


class HfTokenizer:
    """The model's own tokenizer and chat template (or a custom Jinja template)."""

    heavy = True

    def __init__(self, model: str, chat_template: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model)
        self.chat_template = chat_template
        self.directory = model  # its files (vLLM's tool and reasoning parsers load their own view)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        text = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=self.chat_template, **kwargs
        )
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))

    def token_text(self, token_id: int) -> str:
        return str(self.tok.decode([token_id]))


class IncrementalDetokenizer:
    """Text for a stream of token ids, one delta at a time, correct across
    multi-byte characters split over tokens: a delta is only released once it
    no longer ends in an incomplete character (U+FFFD). An incomplete character
    at the very end is dropped, as vLLM's own detokenizer does."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.emitted):  # a tokenizer that rewrote earlier text: send what is new
            common = 0
            while common < min(len(text), len(self.emitted)) and text[common] == self.emitted[common]:
                common += 1
            delta = text[common:]
        else:
            delta = text[len(self.emitted):]
        self.emitted = text
        return delta


class TokenizerRunner:
    """Runs a tokenizer's calls off the trio thread when they are heavy."""

    def __init__(self, tokenizer: Tokenizer, limiter: trio.CapacityLimiter | None = None) -> None:
        self.tokenizer = tokenizer
        # one core stays free for the event loop (the streams)
        self._limiter = limiter or trio.CapacityLimiter(max(1, (os.cpu_count() or 2) - 1))

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self.tokenizer.heavy:
            return fn(*args, **kwargs)
        # abandon_on_cancel: a cancelled request does not wait for its tokenization
        result: T = await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self._limiter,
                                                 abandon_on_cancel=True)
        return result

    async def encode(self, text: str) -> list[int]:
        return await self.run(self.tokenizer.encode, text)

    async def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        return await self.run(self.tokenizer.chat, messages, **kwargs)

    async def decode(self, ids: Sequence[int]) -> str:
        return await self.run(self.tokenizer.decode, ids)
