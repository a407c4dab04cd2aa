"""What the multimodal roles read from a vision-language model's directory, without
loading it: its image token (text and id), how many tokens an image becomes, and its
context length, from ``config.json`` and ``processor_config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelFacts", "model_facts", "vision_config_error"]


@dataclass(frozen=True)
class ModelFacts:
    image_token: str
    image_token_id: int
    image_seq_length: int
    max_position_embeddings: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def vision_config_error(model_dir: str) -> str | None:
    """Why ``model_dir`` cannot serve images (no vision tower), or None."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return f"it has no config.json in {model_dir}"
    config = _read(path)
    if not isinstance(config.get("vision_config"), dict) or config.get("image_token_index", config.get(
            "image_token_id")) is None:
        kind = ", ".join(config.get("architectures") or []) or config.get("model_type") or "?"
        return f"it has no vision tower ({kind}: no vision_config and image token in its config.json)"
    return None


def model_facts(model_dir: str) -> ModelFacts:
    """Call after :func:`vision_config_error` said None."""
    root = Path(model_dir)
    config = _read(root / "config.json")
    text = config.get("text_config") or {}
    processor = _read(root / "processor_config.json")
    eos = text.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) else ()
    return ModelFacts(
        image_token=str(processor.get("image_token") or "<image>"),
        image_token_id=int(config.get("image_token_index", config.get("image_token_id")) or 0),
        image_seq_length=int(config.get("image_seq_length") or 576),
        max_position_embeddings=int(text.get("max_position_embeddings") or 2048),
        vocab_size=int(text.get("vocab_size") or 0),
        eos_token_ids=eos_ids,
    )
