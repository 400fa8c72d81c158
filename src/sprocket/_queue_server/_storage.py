"""File storage for worker outputs: streamed, size-limited, confined to one folder."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO, Final

import trio

from ._service import Offload, run_inline

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "FileStorage",
    "InvalidName",
    "UploadTooLarge",
]

#: Default cap on one uploaded file (bytes).
DEFAULT_MAX_UPLOAD_BYTES: Final = 5 * 1024**3
#: Read size when streaming a file out.
CHUNK_BYTES: Final = 256 * 1024
_MAX_NAME_BYTES: Final = 255
_TMP_PREFIX: Final = ".upload-"


class InvalidName(ValueError):
    """The file name could escape the storage folder or is not a plain file name."""


class UploadTooLarge(Exception):
    """The upload exceeded the configured size limit; nothing was stored."""


class FileStorage:
    """Files under ``root``, each addressed by a plain name (no folders).

    Uploads are written to a hidden temporary file and renamed into place when complete, so a
    reader never sees a partial file and a failed upload leaves nothing behind. Pre-signed upload
    URLs carry an HMAC over (name, expiry) with ``secret``; each token is valid for one name only.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        secret: bytes,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        url_ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
        offload: Offload = run_inline,
    ) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._secret = secret
        self.max_upload_bytes = max_upload_bytes
        self.url_ttl = url_ttl
        self.clock = clock
        self.offload = offload

    # -- names ---------------------------------------------------------------------------------

    def path_for(self, name: str) -> Path:
        """Map a name to its file, refusing anything that is not a plain name inside ``root``."""
        if (
            not name
            or name in (".", "..")
            or name.startswith(".")  # also keeps temporary uploads unreachable
            or "/" in name
            or "\\" in name
            or "\x00" in name
            or any(ord(ch) < 0x20 for ch in name)
            or len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES
        ):
            raise InvalidName(name)
        path = self.root / name
        # Belt and braces: the checks above already exclude separators, but a resolved path
        # outside root (a symlink planted in the folder, say) must still be refused.
        if path.resolve().parent != self.root:
            raise InvalidName(name)
        return path

    # -- pre-signed URLs -----------------------------------------------------------------------

    def _signature(self, name: str, expires: int) -> str:
        message = f"PUT\n{name}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign_upload(self, name: str) -> tuple[int, str]:
        """Return ``(expires, signature)`` authorizing one PUT of ``name`` until ``expires``."""
        self.path_for(name)
        expires = int(self.clock() + self.url_ttl)
        return expires, self._signature(name, expires)

    def verify_upload(self, name: str, expires: str, signature: str) -> bool:
        """Check a pre-signed URL's token for ``name`` (constant-time; expiry enforced)."""
        try:
            expires_at = int(expires)
        except ValueError:
            return False
        expected = self._signature(name, expires_at)
        valid = hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))
        return valid and self.clock() <= expires_at

    # -- streaming I/O -------------------------------------------------------------------------

    async def write_stream(self, name: str, chunks: AsyncIterable[bytes]) -> int:
        """Stream ``chunks`` into the file ``name``; return its size.

        Raises :class:`UploadTooLarge` once more than ``max_upload_bytes`` arrive (the partial
        file is removed) and :class:`InvalidName` for a bad name.
        """
        final = self.path_for(name)
        tmp = self.root / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        fh: BinaryIO = await self.offload(lambda: open(tmp, "xb"))  # noqa: SIM115
        size = 0
        try:
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise UploadTooLarge(name)
                    if chunk:
                        await self.offload(partial(fh.write, chunk))
                await self.offload(fh.flush)
            finally:
                await self.offload(fh.close)
            await self.offload(lambda: os.replace(tmp, final))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.offload(lambda: tmp.unlink(missing_ok=True))
            raise
        return size

    def size_of(self, name: str) -> int | None:
        """The size of a stored file, or ``None`` if there is none."""
        try:
            return self.path_for(name).stat().st_size
        except FileNotFoundError:
            return None

    async def read_stream(self, name: str) -> AsyncIterator[bytes]:
        """Yield the file's bytes in chunks (raises FileNotFoundError / InvalidName first)."""
        path = self.path_for(name)
        fh: BinaryIO = await self.offload(lambda: open(path, "rb"))  # noqa: SIM115
        return self._chunks(fh)

    async def _chunks(self, fh: BinaryIO) -> AsyncIterator[bytes]:
        try:
            while True:
                chunk = await self.offload(lambda: fh.read(CHUNK_BYTES))
                if not chunk:
                    return
                yield chunk
        finally:
            fh.close()
