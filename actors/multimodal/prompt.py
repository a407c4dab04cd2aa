"""The processor's first step: an OpenAI chat request with images -> a token-mode request
carrying the images' bytes.

The prompt is ``--mm-prompt-template`` with ``<prompt>`` replaced by the user's text
(the model's own chat template is not used: the template is what the model was trained
on, as Dynamo's processor does it). Every image marker (``<image>``, or the model's own
image token) in the result takes one image, in the order the request gives them; a
request whose markers and images differ in number is refused (vLLM would silently
answer without the extra images, or misplace them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import trio

from ..errors import invalid
from ..openai.tokenizer import Tokenizer, TokenizerRunner
from .media import ImageData, MediaFetcher

__all__ = ["MultimodalPrompts", "messages_text_and_images"]

PROMPT_MARK = "<prompt>"


def messages_text_and_images(messages: Any) -> tuple[str, list[Any]]:
    """One user message (a string, or text and ``image_url`` parts) -> its text and its
    image URLs. Anything else is refused, naming what: the template takes one prompt."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of objects", param="messages")
    if len(messages) != 1 or not isinstance(messages[0], Mapping) or messages[0].get("role") != "user":
        roles = [m.get("role") if isinstance(m, Mapping) else type(m).__name__ for m in messages]
        raise invalid(f"the multimodal processor takes one user message (its --mm-prompt-template has one "
                      f"<prompt>); got messages with roles {roles}", param="messages")
    content = messages[0].get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise invalid("messages[0].content must be a string or a list of parts", param="messages")
    texts: list[str] = []
    urls: list[Any] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            image_url = part.get("image_url")
            urls.append(image_url.get("url") if isinstance(image_url, Mapping) else image_url)
        else:
            raise invalid(f"messages[0].content[{i}]: parts of type {kind!r} are not supported (text, image_url)",
                          param="messages")
    return "\n".join(texts), urls


class MultimodalPrompts:
    """Builds the processor's token-mode requests (see the module's doc)."""

    def __init__(self, template: str, tokenizer_factory: Callable[[], Tokenizer], fetcher: MediaFetcher, *,
                 image_token: str = "<image>", image_seq_length: int = 576) -> None:
        self.template = template
        self.tokenizer_factory = tokenizer_factory
        self._runner: TokenizerRunner | None = None
        self._loading = trio.Lock()
        self.fetcher = fetcher
        self.image_token = image_token
        self.image_seq_length = image_seq_length

    async def runner(self) -> TokenizerRunner:
        async with self._loading:
            if self._runner is None:
                self._runner = TokenizerRunner(await trio.to_thread.run_sync(self.tokenizer_factory))
        return self._runner

    def render(self, text: str, images: int) -> str:
        prompt = self.template.replace(PROMPT_MARK, text) if PROMPT_MARK in self.template else f"{self.template}{text}"
        markers = prompt.count(self.image_token)
        if markers != images:
            raise invalid(f"the prompt has {markers} {self.image_token} marker(s) (the template's and the text's) "
                          f"but the request has {images} image(s): give one image per marker",
                          param="messages")
        return prompt

    async def fetch_all(self, urls: list[Any]) -> list[ImageData]:
        results: list[ImageData | None] = [None] * len(urls)

        async def one(i: int, url: Any) -> None:
            results[i] = await self.fetcher.fetch(url)

        async with trio.open_nursery() as nursery:
            for i, url in enumerate(urls):
                nursery.start_soon(one, i, url)
        return [r for r in results if r is not None]

    async def preprocess(self, payload: Mapping[str, Any], max_model_len: int) -> dict[str, Any]:
        """``payload`` (token-mode sections plus ``messages``) -> with ``token_ids`` and
        ``multi_modal.images`` instead of ``messages``."""
        text, urls = messages_text_and_images(payload.get("messages"))
        prompt = self.render(text, len(urls))
        try:
            images = await self.fetch_all(urls)
        except BaseExceptionGroup as group:  # the first image that failed says why
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        token_ids = await (await self.runner()).encode(prompt)
        length = len(token_ids) + len(images) * (self.image_seq_length - 1)  # the markers, expanded
        stop = dict(payload.get("stop_conditions") or {})
        room = max_model_len - length
        if room < 1:
            raise invalid(f"This model's maximum context length is {max_model_len} tokens. However, your request "
                          f"has {length} input tokens (images included).", param="messages")
        requested = stop.get("max_tokens")
        if isinstance(requested, int) and requested > room:
            raise invalid(f"max_tokens {requested} is too large: the prompt takes {length} of the "
                          f"{max_model_len}-token context (images included)", param="max_tokens")
        stop["max_tokens"] = requested if isinstance(requested, int) else room
        out = {k: v for k, v in payload.items() if k != "messages"}
        out["token_ids"] = token_ids
        out["stop_conditions"] = stop
        out["multi_modal"] = {"images": [{"data": i.data, "sha256": i.sha256} for i in images]}
        return out
