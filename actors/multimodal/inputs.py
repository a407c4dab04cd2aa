"""A worker's side of a request's images: the ``multi_modal`` section of a token-mode
request, checked and turned into what its engine takes.

``multi_modal`` holds either ``images`` (``[{"data": <bytes>, "sha256": hex}]``: the
engine runs the vision tower, or -- an ECConnector consumer -- loads its output by
name) or ``embeddings`` (the encode worker's output, :mod:`.tensors`; vLLM takes them
with ``enable_mm_embeds``), and optionally ``uuids`` naming the images. Every image
takes one run of the model's image token in ``token_ids`` (the processor puts one
marker per image; vLLM expands it): a request whose count differs is refused, since
vLLM would answer it silently wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio

from ..engine.base import MultiModalInput
from ..errors import invalid
from .media import open_image
from .tensors import unpack

__all__ = ["MediaAccept", "image_runs"]

MAX_IMAGES = 16  # per request


def image_runs(token_ids: list[int], image_token_id: int) -> int:
    """How many images the prompt places: runs of the image token (one marker, or a marker
    already expanded to the image's token count)."""
    runs, previous = 0, None
    for token in token_ids:
        if token == image_token_id and previous != image_token_id:
            runs += 1
        previous = token
    return runs


@dataclass(frozen=True)
class MediaAccept:
    """What a worker takes: ``embeddings`` (vLLM with ``enable_mm_embeds``) and/or images."""

    image_token_id: int
    embeddings: bool = True
    images: bool = True

    async def parse(self, section: Any, token_ids: list[int]) -> MultiModalInput:
        if not isinstance(section, Mapping):
            raise invalid("multi_modal must be an object with images or embeddings")
        uuids = section.get("uuids")
        if uuids is not None and not (isinstance(uuids, list) and all(isinstance(u, str) for u in uuids)):
            raise invalid("multi_modal.uuids must be a list of strings")
        if "embeddings" in section:
            if not self.embeddings:
                raise invalid("this worker takes images, not embeddings (a multimodal PD or decode worker does)")
            tensor = await trio.to_thread.run_sync(unpack, section["embeddings"])
            mm = MultiModalInput(embeddings=tensor, uuids=uuids)
        elif "images" in section:
            if not self.images:
                raise invalid("this worker takes embeddings, not images")
            mm = MultiModalInput(images=[], uuids=[])
            items = section["images"]
            if not isinstance(items, list) or not items:
                raise invalid("multi_modal.images must be a non-empty list")
            if len(items) > MAX_IMAGES:
                raise invalid(f"multi_modal.images: {len(items)} images (at most {MAX_IMAGES} per request)")
            for i, item in enumerate(items):
                data = item.get("data") if isinstance(item, Mapping) else None
                if not isinstance(data, bytes | bytearray):
                    raise invalid(f"multi_modal.images[{i}].data must be the image's bytes")
                where = f"multi_modal.images[{i}]"
                mm.images.append(await trio.to_thread.run_sync(open_image, bytes(data), where))
                # named by content, computed here: a name decides which stored encoder output is used
                assert mm.uuids is not None
                mm.uuids.append(hashlib.sha256(data).hexdigest())
            if uuids is not None:
                raise invalid("multi_modal.uuids: images are named by their content; give uuids only with embeddings")
        else:
            raise invalid("multi_modal needs images or embeddings")
        if mm.uuids is not None and mm.embeddings is not None and len(mm.uuids) != mm.count:
            raise invalid(f"multi_modal.uuids names {len(mm.uuids)} images, the embeddings hold {mm.count}")
        placed = image_runs(token_ids, self.image_token_id)
        if placed != mm.count:
            raise invalid(f"the prompt places {placed} image(s) (image token {self.image_token_id}) but the request "
                          f"carries {mm.count}: give one image per marker")
        return mm
