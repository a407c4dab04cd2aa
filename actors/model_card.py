"""Model cards: what a frontend needs to serve a worker's model without the worker's disk.

A worker's registration carries the card's facts (:class:`ModelCard`: served name,
context length, KV block size and blocks, which tokenizer). The tokenizer's files
(tokenizer.json, its config, the chat template ...) are fetched once per model from
the worker itself, through its ``model_card`` endpoint on the request plane: the first
item is the card and the list of files, then each file comes in chunks small enough for
any plane (NATS's default payload limit is 1 MB).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CHUNK", "ModelCard", "card_files", "card_items", "write_card_files"]

CHUNK = 256 * 1024  # bytes per item
# the files a tokenizer and its chat template are made of (whatever the model has of them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "added_tokens.json", "generation_config.json", "config.json", "preprocessor_config.json",
                   "processor_config.json")


@dataclass(frozen=True)
class ModelCard:
    name: str  # the served model name
    context_length: int
    block_size: int
    total_kv_blocks: int
    tokenizer: str  # "hf": the model's own (fetch its files); "bytes": the synthetic engine's bytes-as-tokens
    vocab_size: int = 0
    files: tuple[str, ...] = field(default_factory=tuple)
    # vLLM's parsers for the model's chat answers (--dyn-tool-call-parser, --dyn-reasoning-parser)
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = list(self.files)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["files"] = tuple(known.get("files") or ())
        return cls(**known)


def card_files(model_dir: str | None, chat_template: str | None = None) -> dict[str, Path]:
    """The tokenizer's files in ``model_dir`` (name -> path); a custom chat template
    replaces the model's."""
    found: dict[str, Path] = {}
    if model_dir and Path(model_dir).is_dir():
        for name in TOKENIZER_FILES:
            path = Path(model_dir, name)
            if path.is_file():
                found[name] = path
    if chat_template:
        found["chat_template.jinja"] = Path(chat_template)
    return found


def card_items(card: ModelCard, files: dict[str, Path]) -> Iterable[dict[str, Any]]:
    """What the ``model_card`` endpoint streams: the card, then every file in chunks."""
    yield {"card": card.to_json()}
    for name, path in files.items():
        data = path.read_bytes()
        for offset in range(0, max(1, len(data)), CHUNK):
            yield {"file": name, "offset": offset, "size": len(data), "data": data[offset:offset + CHUNK]}


def write_card_files(items: Iterable[dict[str, Any]], directory: Path | None = None) -> tuple[ModelCard, Path]:
    """Rebuild a card's files from the endpoint's items, in a new directory."""
    target = Path(tempfile.mkdtemp(prefix="llm-supervisor-card-", dir=directory))
    card: ModelCard | None = None
    sizes: dict[str, int] = {}
    for item in items:
        if "card" in item:
            card = ModelCard.from_json(item["card"])
            continue
        name = str(item["file"])
        if os.path.basename(name) != name or name not in TOKENIZER_FILES:
            raise ValueError(f"model card: unexpected file name {name!r}")
        with open(target / name, "ab") as f:
            if f.tell() != item["offset"]:
                raise ValueError(f"model card: {name} chunk at {item['offset']}, expected {f.tell()}")
            f.write(bytes(item["data"]))
        sizes[name] = int(item["size"])
    if card is None:
        raise ValueError("model card: no card in the answer")
    for name, size in sizes.items():
        if (target / name).stat().st_size != size:
            raise ValueError(f"model card: {name} arrived incomplete")
    return card, target
