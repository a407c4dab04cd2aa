"""An image a request names -> its bytes, checked: what the processor fetches before any
worker sees the request, so a bad image is refused with a clear error and nothing else.

OpenAI ``image_url`` parts name images three ways, all taken here:

- ``http://`` / ``https://`` -- fetched, with a time limit and a size limit;
- ``data:image/...;base64,...`` -- decoded;
- ``file://`` (or a plain path) -- read, only from under ``--allowed-local-media-path``
  (as ``vllm serve`` does; without it, local files are refused).

Every image is then checked to be one (PIL opens it) and not too large, and named by the
SHA-256 of its bytes: the encode worker's cache key and the encoder-output name vLLM's
ECConnector stores it under.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..errors import invalid

__all__ = ["FETCH_TIMEOUT", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "ImageData", "MediaFetcher", "open_image"]

# An image's bytes travel inside one request-plane frame (16 MiB): a little room is left.
MAX_IMAGE_BYTES = 12 * 1024 * 1024
MAX_IMAGE_PIXELS = 8192 * 8192
FETCH_TIMEOUT = 10.0  # seconds, for an http(s) image


@dataclass(frozen=True)
class ImageData:
    """An image's encoded bytes (PNG, JPEG...) and their SHA-256 (hex)."""

    data: bytes
    sha256: str
    width: int
    height: int

    @classmethod
    def of(cls, data: bytes, where: str) -> ImageData:
        image = open_image(data, where)
        return cls(data, hashlib.sha256(data).hexdigest(), image.width, image.height)


def open_image(data: bytes, where: str) -> Any:
    """Bytes -> a PIL image (RGB), or a clear 400 naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise invalid(f"image {where} is too large: {len(data)} bytes (the limit is {MAX_IMAGE_BYTES})",
                      param="messages")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise invalid(f"image {where} is too large: {width}x{height} pixels (the limit is "
                              f"{MAX_IMAGE_PIXELS} pixels)", param="messages")
            image = probe.convert("RGB")
    except UnidentifiedImageError:
        raise invalid(f"{where} is not an image (PIL cannot identify it)", param="messages") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise invalid(f"image {where} cannot be decoded: {exc}", param="messages") from None
    return image


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:60] + "..." + url[-12:]


class MediaFetcher:
    """Fetches the images a request names (see the module's doc)."""

    def __init__(self, allowed_local_path: str | None = None, *, timeout: float = FETCH_TIMEOUT) -> None:
        self.allowed = Path(allowed_local_path).resolve() if allowed_local_path else None
        self.timeout = timeout
        self._client: Any = None

    async def fetch(self, url: Any) -> ImageData:
        if not isinstance(url, str) or not url:
            raise invalid("image_url.url must be a non-empty string", param="messages")
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            data = await self._http(url)
        elif scheme == "data":
            data = _data_url(url)
        elif scheme in ("file", ""):
            data = await self._file(url)
        else:
            raise invalid(f"image URL {_short(url)!r}: scheme {scheme!r} is not supported (http, https, data, file)",
                          param="messages")
        return await trio.to_thread.run_sync(ImageData.of, data, repr(_short(url)))

    async def _http(self, url: str) -> bytes:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=True)
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise invalid(f"cannot fetch image {_short(url)!r}: HTTP {response.status_code}", param="messages")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > MAX_IMAGE_BYTES:
                    raise invalid(f"image {_short(url)!r} is too large: {declared} bytes (the limit is "
                                  f"{MAX_IMAGE_BYTES})", param="messages")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_IMAGE_BYTES:
                        raise invalid(f"image {_short(url)!r} is too large: over {MAX_IMAGE_BYTES} bytes",
                                      param="messages")
                return bytes(body)
        except httpx.HTTPError as exc:
            raise invalid(f"cannot fetch image {_short(url)!r}: {type(exc).__name__}: {exc}",
                          param="messages") from None

    async def _file(self, url: str) -> bytes:
        path_text = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url
        if self.allowed is None:
            raise invalid(f"image {_short(url)!r}: local files are refused (start the processor with "
                          "--allowed-local-media-path DIR to allow the files under DIR)", param="messages")
        allowed = self.allowed

        def read() -> bytes:
            path = Path(path_text).resolve()  # links followed: the file itself must be under the directory
            if not path.is_relative_to(allowed):
                raise invalid(f"image {_short(url)!r} is outside --allowed-local-media-path {allowed}",
                              param="messages")
            try:
                size = os.stat(path).st_size
                if size > MAX_IMAGE_BYTES:
                    raise invalid(f"image {_short(url)!r} is too large: {size} bytes (the limit is "
                                  f"{MAX_IMAGE_BYTES})", param="messages")
                return path.read_bytes()
            except OSError as exc:
                raise invalid(f"cannot read image {_short(url)!r}: {exc.strerror or exc}", param="messages") from None

        return await trio.to_thread.run_sync(read)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _data_url(url: str) -> bytes:
    header, sep, body = url[len("data:"):].partition(",")
    if not sep:
        raise invalid("a data: image URL needs a comma before its data", param="messages")
    if not header.endswith(";base64"):
        raise invalid("a data: image URL must be base64 (data:image/png;base64,...)", param="messages")
    if len(body) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise invalid(f"image data: URL is too large: {len(body)} base64 characters (the limit is "
                      f"{MAX_IMAGE_BYTES} bytes)", param="messages")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(f"image data: URL is not valid base64: {exc}", param="messages") from None
