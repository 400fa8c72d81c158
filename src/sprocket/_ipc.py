"""The wire format between the torchrun supervisor and its ranks.

One Unix stream socket per rank carries length-prefixed frames: a 4-byte big-endian length, then
that many bytes of UTF-8 JSON holding one message object (``{"t": <kind>, ...}``). A frame is
never truncated: a result too large for one frame is an error the rank reports, not a cut.

``FileOutput`` values survive the trip as ``{"$sprocket.FileOutput": "<absolute path>"}`` and
are turned back into ``FileOutput`` objects on decoding (the ranks share the parent's
filesystem, so the parent can upload them).

The module is sans-IO apart from two small adapters: ``FrameDecoder`` for the rank's blocking
socket and ``TrioFrameStream`` for the parent's Trio side.
"""

from __future__ import annotations

import json
import os
import struct
import traceback
from collections.abc import Mapping
from typing import Any, Final

import trio

from ._api import FileOutput
from ._errors import JobError

__all__ = [
    "FILE_OUTPUT_TAG",
    "MAX_FRAME_BYTES",
    "FrameDecoder",
    "FrameError",
    "RankError",
    "TrioFrameStream",
    "check_hello",
    "decode_message",
    "encode_frame",
    "error_payload",
    "open_unix_listener",
]

_HEADER: Final = struct.Struct("!I")
#: The largest payload one frame can hold (the 4-byte length's range).
MAX_FRAME_BYTES: Final = 2**32 - 1
FILE_OUTPUT_TAG: Final = "$sprocket.FileOutput"
#: Frames above this size are decoded in a worker thread so that a huge result never blocks
#: the parent's event loop (and with it ``/health``).
_THREAD_DECODE_BYTES: Final = 256 * 1024
_RECEIVE_CHUNK: Final = 1024 * 1024


class FrameError(Exception):
    """A frame cannot be encoded (too large, not JSON) or the byte stream is corrupt."""


def _default(value: object) -> object:
    if isinstance(value, FileOutput):
        # Absolute, so the parent finds the file whatever the rank's working directory was.
        return {FILE_OUTPUT_TAG: os.path.abspath(value)}
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _object_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and FILE_OUTPUT_TAG in obj:
        return FileOutput(obj[FILE_OUTPUT_TAG])
    return obj


def encode_frame(message: dict[str, Any]) -> bytes:
    """Serialise ``message`` into one frame (header included).

    Raises ``FrameError`` when a value is not JSON-serialisable or the JSON exceeds
    ``MAX_FRAME_BYTES``.
    """
    try:
        body = json.dumps(message, default=_default, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise FrameError(f"not JSON-serialisable: {exc}") from None
    data = body.encode()
    if len(data) > MAX_FRAME_BYTES:
        raise FrameError(
            f"{len(data)} bytes of JSON exceed the {MAX_FRAME_BYTES}-byte frame limit; "
            "write large outputs to a file and return a sprocket.FileOutput"
        )
    return _HEADER.pack(len(data)) + data


def decode_message(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse one frame's payload (without header) into a message dict."""
    try:
        message = json.loads(bytes(payload), object_hook=_object_hook)
    except ValueError as exc:
        raise FrameError(f"corrupt frame: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise FrameError("corrupt frame: not a message object")
    return message


class FrameDecoder:
    """Reassembles frames from arbitrary chunks of a byte stream.

    ``feed()`` the bytes as they arrive, then call ``next_payload()`` until it returns ``None``.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._needed: int | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    @property
    def missing(self) -> int:
        """How many more bytes complete the frame being read (at least 1)."""
        if self._needed is None:
            return max(_HEADER.size - len(self._buffer), 1)
        return max(self._needed - len(self._buffer), 1)

    @property
    def pending(self) -> bool:
        """Whether a partial frame is buffered (EOF now would cut a frame)."""
        return bool(self._buffer) or self._needed is not None

    def next_payload(self) -> bytearray | None:
        """The next complete frame's payload, or ``None`` if more bytes are needed."""
        if self._needed is None:
            if len(self._buffer) < _HEADER.size:
                return None
            (self._needed,) = _HEADER.unpack_from(self._buffer)
            del self._buffer[: _HEADER.size]
        if len(self._buffer) < self._needed:
            return None
        payload = self._buffer[: self._needed]
        del self._buffer[: self._needed]
        self._needed = None
        return payload


class TrioFrameStream:
    """Messages over a Trio stream: one sender at a time, one receiver task.

    ``send`` is safe to call from several tasks (a lock keeps frames whole). Cancelling ``send``
    mid-frame leaves the stream unusable (it is closed), since the peer would read garbage.
    ``receive`` returns ``None`` at a clean EOF and raises ``FrameError`` on a cut frame.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._send_lock = trio.Lock()

    async def send_frame(self, frame: bytes) -> None:
        async with self._send_lock:
            try:
                await self.stream.send_all(frame)
            except trio.Cancelled:
                await trio.aclose_forcefully(self.stream)
                raise

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_frame(encode_frame(message))

    async def receive(self) -> dict[str, Any] | None:
        while True:
            payload = self._decoder.next_payload()
            if payload is not None:
                if len(payload) >= _THREAD_DECODE_BYTES:
                    return await trio.to_thread.run_sync(decode_message, payload)
                return decode_message(payload)
            data = await self.stream.receive_some(max(self._decoder.missing, _RECEIVE_CHUNK))
            if not data:
                if self._decoder.pending:
                    raise FrameError("connection closed in the middle of a frame")
                return None
            self._decoder.feed(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_unix_listener(path: str, backlog: int) -> trio.SocketListener:
    """A Trio listener on a new Unix socket at ``path``."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def check_hello(
    hello: Mapping[str, Any] | None, token: str, world_size: int
) -> tuple[int, int] | None:
    """``(rank, pid)`` from a rank's first message, or ``None`` if it is not one of ours."""
    if hello is None or hello.get("t") != "hello" or hello.get("token") != token:
        return None
    try:
        rank, world, pid = int(hello["rank"]), int(hello["world_size"]), int(hello["pid"])
    except (KeyError, TypeError, ValueError):
        return None
    if world != world_size or not 0 <= rank < world:
        return None
    return rank, pid


def error_payload(exc: BaseException) -> dict[str, str]:
    """How a rank sends an exception: its type, message and traceback text."""
    return {
        "type": type(exc).__qualname__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


class RankError(JobError):
    """A rank's ``setup()``/``predict()``/``shutdown()`` raised.

    ``str()`` is ``"rank <n> raised <ExceptionType>: <message>"``; ``traceback`` holds the
    rank's traceback text.
    """

    def __init__(self, rank: int, error: Mapping[str, Any]) -> None:
        self.rank = rank
        self.exc_type = str(error.get("type", "Exception"))
        self.exc_message = str(error.get("message", ""))
        self.traceback = str(error.get("traceback", ""))
        detail = f"{self.exc_type}: {self.exc_message}" if self.exc_message else self.exc_type
        super().__init__(f"rank {rank} raised {detail}")
