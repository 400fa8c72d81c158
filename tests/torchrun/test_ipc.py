"""The IPC frames: whole messages from any chunking, FileOutputs kept, nothing truncated."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import sprocket
from sprocket._ipc import (
    FILE_OUTPUT_TAG,
    FrameDecoder,
    FrameError,
    RankError,
    TrioFrameStream,
    check_hello,
    decode_message,
    encode_frame,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(
    messages=st.lists(json_values.map(lambda v: {"t": "result", "value": v}), max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
def test_any_chunking_yields_the_same_messages(
    messages: list[dict[str, Any]], cuts: list[int]
) -> None:
    data = b"".join(encode_frame(m) for m in messages)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    decoder, got = FrameDecoder(), []
    for start, end in itertools.pairwise(points):
        decoder.feed(data[start:end])
        while (payload := decoder.next_payload()) is not None:
            got.append(decode_message(payload))
    assert got == messages
    assert not decoder.pending


def test_file_outputs_come_back_as_file_outputs(tmp_path: Any) -> None:
    value = {"a": [sprocket.FileOutput(tmp_path / "x.mp4")], "b": {"c": "plain"}}
    frame = encode_frame({"t": "result", "value": value})
    assert json.loads(frame[4:])["value"]["a"][0] == {FILE_OUTPUT_TAG: str(tmp_path / "x.mp4")}
    decoded = decode_message(frame[4:])["value"]
    assert isinstance(decoded["a"][0], sprocket.FileOutput)
    assert decoded == value


def test_unserialisable_values_are_a_frame_error() -> None:
    with pytest.raises(FrameError, match="not JSON-serialisable"):
        encode_frame({"t": "result", "value": {1, 2}})


def test_corrupt_payloads_are_a_frame_error() -> None:
    with pytest.raises(FrameError):
        decode_message(b"\xff{")
    with pytest.raises(FrameError):
        decode_message(b"[1, 2]")


async def test_large_frames_cross_a_real_socket_whole() -> None:
    left, right = trio.socket.socketpair()
    a = TrioFrameStream(trio.SocketStream(left))
    b = TrioFrameStream(trio.SocketStream(right))
    big = "x" * (24 * 1024 * 1024) + "end"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send, {"t": "result", "value": big})
        message = await b.receive()
    assert message is not None and message["value"] == big
    await a.aclose()
    assert await b.receive() is None
    await b.aclose()


async def test_eof_inside_a_frame_is_an_error() -> None:
    left, right = trio.testing.memory_stream_pair()
    frame = encode_frame({"t": "ready"})
    await left.send_all(frame[:-2])
    await left.aclose()
    with pytest.raises(FrameError, match="middle of a frame"):
        await TrioFrameStream(right).receive()


@pytest.mark.parametrize(
    ("hello", "expected"),
    [
        ({"t": "hello", "token": "k", "rank": 1, "world_size": 2, "pid": 9}, (1, 9)),
        ({"t": "hello", "token": "other", "rank": 1, "world_size": 2, "pid": 9}, None),
        ({"t": "hello", "token": "k", "rank": 2, "world_size": 2, "pid": 9}, None),
        ({"t": "hello", "token": "k", "rank": 0, "world_size": 4, "pid": 9}, None),
        ({"t": "ready"}, None),
        (None, None),
    ],
)
def test_check_hello(hello: dict[str, Any] | None, expected: tuple[int, int] | None) -> None:
    assert check_hello(hello, "k", 2) == expected


def test_rank_error_text() -> None:
    error = RankError(1, {"type": "RuntimeError", "message": "boom", "traceback": "tb"})
    assert str(error) == "rank 1 raised RuntimeError: boom"
    assert (error.rank, error.exc_type, error.traceback) == (1, "RuntimeError", "tb")
    assert str(RankError(0, {"type": "StopIteration", "message": ""})) == (
        "rank 0 raised StopIteration"
    )
