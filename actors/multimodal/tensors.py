"""Embeddings between workers without NIXL (``--embedding-transfer-mode``):

- ``inline``: in the request itself, as a typed binary
  ``{"dtype": "bfloat16", "shape": [n, tokens, hidden], "data": <bytes>}`` (msgpack
  carries bytes as they are);
- ``shm``: for workers on one host, in a shared-memory file
  ``{"dtype", "shape", "shm": "dynamo-mm-<32 hex>", "nbytes"}``; the receiver maps it,
  and whoever made the request (the processor) removes it when the request ends.

Whatever arrives is checked before use: a known dtype, a 3-D shape, a size within the
bound, exactly as many bytes as dtype and shape say, and an ``shm`` name of the form
this module makes (so no path can be named).
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import invalid

__all__ = ["MAX_EMBEDDING_BYTES", "SHM_DIR", "TRANSFER_MODES", "pack", "release", "unpack"]

TRANSFER_MODES = ("inline", "shm")
MAX_EMBEDDING_BYTES = 256 * 1024 * 1024
MAX_INLINE_BYTES = 12 * 1024 * 1024  # inside one request-plane frame (16 MiB)
SHM_DIR = Path("/dev/shm")
_SHM_NAME = re.compile(r"^dynamo-mm-[0-9a-f]{32}$")
_DTYPES = ("bfloat16", "float16", "float32")


def _torch_dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _raw(tensor: Any) -> bytes:
    import torch

    raw: bytes = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return raw


def pack(tensor: Any, mode: str) -> dict[str, Any]:
    """A tensor -> its transfer form (``mode``: ``inline`` or ``shm``)."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ValueError(f"cannot transfer a {dtype} tensor ({', '.join(_DTYPES)})")
    raw = _raw(tensor)
    head: dict[str, Any] = {"dtype": dtype, "shape": [int(d) for d in tensor.shape]}
    if mode == "inline":
        if len(raw) > MAX_INLINE_BYTES:
            raise invalid(f"embeddings of {len(raw)} bytes do not fit in a request ({MAX_INLINE_BYTES} bytes): "
                          "use --embedding-transfer-mode shm")
        return {**head, "data": raw}
    if mode == "shm":
        name = f"dynamo-mm-{uuid.uuid4().hex}"
        path = SHM_DIR / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, raw)
        finally:
            os.close(fd)
        return {**head, "shm": name, "nbytes": len(raw)}
    raise ValueError(f"unknown embedding transfer mode {mode!r} ({', '.join(TRANSFER_MODES)})")


def unpack(wire: Any, *, max_bytes: int = MAX_EMBEDDING_BYTES) -> Any:
    """A transfer form -> the tensor, or a clear 400 naming what is wrong with it."""
    import torch

    if not isinstance(wire, Mapping):
        raise invalid("multi_modal.embeddings must be an object {dtype, shape, data | shm}")
    dtype = wire.get("dtype")
    if dtype not in _DTYPES:
        raise invalid(f"multi_modal.embeddings.dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    shape = wire.get("shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise invalid(f"multi_modal.embeddings.shape {shape!r}: expected [images, tokens, hidden], all positive")
    expected = math.prod(shape) * _torch_dtype(dtype).itemsize
    if expected > max_bytes:
        raise invalid(f"multi_modal.embeddings of {expected} bytes exceed the {max_bytes}-byte limit")
    if "data" in wire:
        data = wire["data"]
        if not isinstance(data, bytes | bytearray):
            raise invalid("multi_modal.embeddings.data must be bytes")
        raw = bytes(data)
    elif "shm" in wire:
        raw = _read_shm(wire.get("shm"), wire.get("nbytes"), expected)
    else:
        raise invalid("multi_modal.embeddings needs data (inline) or shm (shared memory)")
    if len(raw) != expected:
        raise invalid(f"multi_modal.embeddings: {len(raw)} bytes, but {dtype} {shape} takes {expected}")
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return flat.view(_torch_dtype(dtype)).reshape(shape)


def _read_shm(name: Any, nbytes: Any, expected: int) -> bytes:
    if not isinstance(name, str) or not _SHM_NAME.match(name):
        raise invalid(f"multi_modal.embeddings.shm {name!r} is not a shared-memory name this worker accepts")
    if nbytes != expected:
        raise invalid(f"multi_modal.embeddings.nbytes {nbytes!r} does not match dtype and shape ({expected})")
    try:
        with open(SHM_DIR / name, "rb") as f:
            return f.read(expected + 1)
    except FileNotFoundError:
        raise invalid(f"multi_modal.embeddings.shm {name!r} does not exist (its sender removed it, or it is on "
                      "another host: --embedding-transfer-mode inline)") from None


def release(wire: Any) -> None:
    """Remove an ``shm`` transfer's file (no-op for ``inline``, or when already gone)."""
    if isinstance(wire, Mapping) and isinstance(wire.get("shm"), str) and _SHM_NAME.match(wire["shm"]):
        try:
            os.unlink(SHM_DIR / wire["shm"])
        except FileNotFoundError:
            pass
