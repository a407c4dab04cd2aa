"""The TCP request plane's frames: round trips and a fuzzed decoder."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.protocol import (
    MAX_FRAME,
    Cancel,
    Data,
    End,
    Error,
    FrameError,
    FrameReader,
    Request,
    decode_frame,
    encode_frame,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
ids = st.text(max_size=40)
frames = st.one_of(
    st.builds(Request, ids, st.text(max_size=20), json_values),
    st.builds(Cancel, ids),
    st.builds(Data, ids, json_values),
    st.builds(Error, ids, st.text(max_size=20), st.text(max_size=50), st.booleans()),
    st.builds(End, ids),
)


@given(st.lists(frames, max_size=8), st.integers(1, 64))
def test_frames_round_trip_in_any_chunking(sent: list[object], chunk: int) -> None:
    wire = b"".join(encode_frame(f) for f in sent)  # type: ignore[arg-type]
    reader = FrameReader()
    got = []
    for i in range(0, len(wire), chunk):
        got.extend(reader.feed(wire[i : i + chunk]))
    assert got == sent
    assert reader.pending == 0


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_is_a_frame_error_never_a_crash(data: bytes) -> None:
    reader = FrameReader()
    try:
        reader.feed(data)
    except FrameError as exc:
        assert str(exc)


def test_oversized_and_truncated_frames_are_named() -> None:
    with pytest.raises(FrameError, match="exceeds"):
        FrameReader().feed(struct.pack(">I", MAX_FRAME + 1) + b"x")
    with pytest.raises(FrameError, match="truncated"):
        decode_frame(b"\x00\x00")
    with pytest.raises(FrameError, match="does not match"):
        decode_frame(struct.pack(">I", 10) + b"abc")
    with pytest.raises(FrameError, match="malformed"):
        FrameReader().feed(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    with pytest.raises(FrameError, match="cannot encode"):  # msgpack carries 64-bit integers only
        encode_frame(Data("x", 2**70))
    partial = FrameReader()
    assert partial.feed(encode_frame(End("x"))[:-1]) == []
    assert partial.pending > 0
