"""The request plane's frames.

On TCP each frame is a 4-byte big-endian length followed by a msgpack map;
on NATS a message body is one msgpack map (no length prefix). Frames:

- ``request {id, endpoint, payload}``      client -> worker
- ``cancel {id}``                            client -> worker
- ``data {id, payload, seq}``                worker -> client, one per item, ``seq`` 0, 1, 2 ...
- ``heartbeat {id}``                         worker -> client, while a request runs and nothing
                                              else was sent for a second
- ``error {id, code, message, migratable}``  worker -> client, ends the request
- ``end {id, count, finish_reason}``         worker -> client, ends the request: ``count`` items
                                              were sent, the last one said ``finish_reason``

So a stream is verifiable end to end: a client that sees a ``seq`` out of
order, an end whose ``count`` differs from what arrived, a connection that
closes before the end, or silence longer than a few heartbeats, knows the
answer is incomplete and says so (a migratable error), instead of reporting
success for part of an answer.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from .errors import FrameError

__all__ = [
    "HEARTBEAT_INTERVAL",
    "MAX_FRAME",
    "PROBE_HEADER",
    "SILENCE_TIMEOUT",
    "Cancel",
    "Data",
    "End",
    "Error",
    "Frame",
    "FrameError",
    "FrameReader",
    "Heartbeat",
    "Request",
    "decode_frame",
    "encode_frame",
]

MAX_FRAME = 16 * 1024 * 1024  # bytes; larger frames are refused
# NATS plane: a header on the worker's "are you still listening?" request to a client's reply inbox
PROBE_HEADER = "Dyn-Probe"
_LEN = struct.Struct(">I")


class Request(msgspec.Struct, tag="request", tag_field="type"):
    id: str
    endpoint: str
    payload: Any = None


class Cancel(msgspec.Struct, tag="cancel", tag_field="type"):
    id: str


class Data(msgspec.Struct, tag="data", tag_field="type"):
    id: str
    payload: Any = None
    seq: int = 0


class Heartbeat(msgspec.Struct, tag="heartbeat", tag_field="type"):
    id: str


class Error(msgspec.Struct, tag="error", tag_field="type"):
    id: str
    code: str
    message: str
    migratable: bool = False


class End(msgspec.Struct, tag="end", tag_field="type"):
    id: str
    count: int = 0
    finish_reason: str | None = None


Frame = Request | Cancel | Data | Heartbeat | Error | End

# how often a running request that has nothing else to send says it is alive, and how long a
# client waits in silence before it gives the request up (a few heartbeats missed)
HEARTBEAT_INTERVAL = 1.0
SILENCE_TIMEOUT = 10.0

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Frame] = msgspec.msgpack.Decoder(Frame)


def encode_body(frame: Frame) -> bytes:
    try:
        return _encoder.encode(frame)
    except (OverflowError, TypeError, msgspec.EncodeError) as exc:
        raise FrameError(f"cannot encode {type(frame).__name__.lower()} frame: {exc}") from None


def decode_body(body: bytes) -> Frame:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise FrameError(f"malformed frame: {exc}") from None


def encode_frame(frame: Frame) -> bytes:
    body = encode_body(frame)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


def decode_frame(data: bytes) -> Frame:
    """One whole length-prefixed frame."""
    if len(data) < 4:
        raise FrameError("truncated frame header")
    (length,) = _LEN.unpack_from(data)
    if length != len(data) - 4:
        raise FrameError(f"frame length {length} does not match {len(data) - 4} bytes of body")
    return decode_body(data[4:])


class FrameReader:
    """Incremental decoder: feed bytes, take whole frames."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= 4:
            (length,) = _LEN.unpack_from(self._buf)
            if length > self.max_frame:
                raise FrameError(f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")
            if len(self._buf) < 4 + length:
                break
            body = bytes(self._buf[4 : 4 + length])
            del self._buf[: 4 + length]
            frames.append(decode_body(body))
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)
