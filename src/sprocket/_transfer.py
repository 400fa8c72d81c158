"""File transfer: input downloads and ``FileOutput`` uploads, streamed, bounded, and guarded.

Credentials go only to the API base. Every download hop (redirects included) is checked
against link-local and cloud-metadata addresses before it is requested. Bodies move in chunks
between the socket and the disk, so memory stays flat whatever the file size; the chunk writes
go straight to the page cache from the event loop, which costs microseconds per chunk.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import trio

from ._api import FileOutput, InputOutputProcessor, is_default_process_input_file
from ._config import Settings
from ._errors import DownloadError, UploadError
from ._events import EventLog
from ._metrics import Metrics

__all__ = ["Transfers", "find_file_outputs", "safe_file_name"]

CHUNK = 1 << 20
MAX_REDIRECTS = 5
UPLOAD_ATTEMPTS = 3

#: Resolves a host name to IP address strings; injectable so in-process tests need no DNS.
Resolver = Callable[[str, int], Awaitable[list[str]]]

_METADATA_HOSTS = {"metadata.google.internal", "metadata", "metadata.azure.internal"}
_METADATA_ADDRESSES = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("169.254.170.2"),
    ipaddress.ip_address("100.100.100.200"),
    ipaddress.ip_address("fd00:ec2::254"),
}


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the system resolver (``getaddrinfo`` in a thread)."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def safe_file_name(raw: str, fallback: str = "file", limit: int = 100) -> str:
    """A file name made of ``[A-Za-z0-9._-]`` with no leading dot, at most ``limit`` chars."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).lstrip(".")
    cleaned = cleaned[-limit:].lstrip(".")
    return cleaned or fallback


def find_file_outputs(value: Any) -> Iterator[FileOutput]:
    """Every ``FileOutput`` in a JSON-like structure of dicts and lists."""
    if isinstance(value, FileOutput):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from find_file_outputs(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from find_file_outputs(item)


def _replace_file_outputs(value: Any, urls: dict[FileOutput, str]) -> Any:
    if isinstance(value, FileOutput):
        return urls[value]
    if isinstance(value, dict):
        return {k: _replace_file_outputs(v, urls) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_replace_file_outputs(v, urls) for v in value]
    return value


class _FileStream(httpx.SyncByteStream):
    """A downloaded body, read back from disk for a custom ``process_input_file``."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __iter__(self) -> Iterator[bytes]:
        with self._path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


class Transfers:
    """Moves one worker's files. ``api`` carries the credentials; ``plain`` carries none."""

    def __init__(
        self,
        settings: Settings,
        api: httpx.AsyncClient,
        plain: httpx.AsyncClient,
        metrics: Metrics,
        events: EventLog,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._settings = settings
        self._api = api
        self._plain = plain
        self._metrics = metrics
        self._events = events
        self._resolve = resolver
        self._api_base = httpx.URL(settings.api_base_url.rstrip("/") + "/")

    # -- downloads ---------------------------------------------------------------------------

    def wants_download(self, value: object) -> bool:
        """Whether an input value is a URL the runtime fetches (https, or on the API base)."""
        if not isinstance(value, str):
            return False
        return value.startswith("https://") or self._on_api_base(value)

    def _on_api_base(self, url: str | httpx.URL) -> bool:
        try:
            target = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            return False
        base = self._api_base
        return (
            target.scheme == base.scheme
            and target.host == base.host
            and target.port == base.port
            and target.path.startswith(base.path)
        )

    async def download_inputs(
        self, payload: dict[str, Any], job_dir: Path, processor: InputOutputProcessor
    ) -> dict[str, Any]:
        """Download every URL value of ``payload`` into ``job_dir``; return args with paths.

        Downloads run concurrently (bounded). A failure raises ``DownloadError`` naming the
        input key; files already written stay in ``job_dir`` for the caller to remove.
        """
        wanted = [(k, v) for k, v in payload.items() if self.wants_download(v)]
        if not wanted:
            return dict(payload)
        job_dir.mkdir(parents=True, exist_ok=True)
        args = dict(payload)
        limiter = trio.CapacityLimiter(self._settings.upload_concurrency)

        async def fetch(index: int, key: str, url: str) -> None:
            async with limiter:
                name = f"{index}-{safe_file_name(_url_basename(url), fallback='input')}"
                dst = job_dir / name
                await self._download(url, dst, processor, key)
                args[key] = str(dst)

        with _first_error():
            async with trio.open_nursery() as nursery:
                for index, (key, url) in enumerate(wanted):
                    nursery.start_soon(fetch, index, str(key), url)
        return args

    async def _download(
        self, url: str, dst: Path, processor: InputOutputProcessor, key: str
    ) -> None:
        with trio.move_on_after(self._settings.download_timeout) as scope:
            size = await self._fetch(url, dst, processor, key)
        if scope.cancelled_caught:
            raise DownloadError(
                f"input {key!r}: download did not finish within "
                f"{self._settings.download_timeout:g} s (SPROCKET_DOWNLOAD_TIMEOUT_SECONDS)"
            )
        self._metrics.download_bytes.inc(size)
        self._events.record("downloaded", key=key, bytes=size)

    async def _fetch(self, url: str, dst: Path, processor: InputOutputProcessor, key: str) -> int:
        current = httpx.URL(url)
        for _ in range(MAX_REDIRECTS + 1):
            await self._check_address(current, key)
            on_api = self._on_api_base(current)
            client = self._api if on_api else self._plain
            try:
                async with client.stream("GET", current, follow_redirects=False) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        current = current.join(resp.headers["location"])
                        continue
                    if resp.status_code >= 300:
                        raise DownloadError(
                            f"input {key!r}: {_display(current)} answered HTTP {resp.status_code}"
                        )
                    return await self._save(resp, dst, processor, key)
            except httpx.HTTPError as exc:
                raise DownloadError(
                    f"input {key!r}: fetching {_display(current)} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
        raise DownloadError(f"input {key!r}: more than {MAX_REDIRECTS} redirects")

    async def _check_address(self, url: httpx.URL, key: str) -> None:
        if self._settings.allow_link_local:
            return
        if url.scheme not in ("http", "https"):
            raise DownloadError(f"input {key!r}: refusing {url.scheme!r} URL")
        host = url.host.lower().rstrip(".")
        if host in _METADATA_HOSTS:
            raise DownloadError(f"input {key!r}: refusing cloud metadata host {host}")
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                resolved = await self._resolve(host, url.port or 443)
            except OSError as exc:
                raise DownloadError(f"input {key!r}: cannot resolve {host}: {exc}") from None
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolved]
        for address in addresses:
            mapped = getattr(address, "ipv4_mapped", None) or address
            if mapped.is_link_local or mapped in _METADATA_ADDRESSES:
                raise DownloadError(
                    f"input {key!r}: refusing link-local or metadata address {mapped} "
                    f"(set SPROCKET_ALLOW_LINK_LOCAL=1 to allow)"
                )

    async def _save(
        self, resp: httpx.Response, dst: Path, processor: InputOutputProcessor, key: str
    ) -> int:
        limit = self._settings.max_download_bytes
        declared = resp.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise DownloadError(
                f"input {key!r} is {declared} bytes; the limit is {limit} "
                f"(SPROCKET_MAX_DOWNLOAD_BYTES)"
            )
        custom = not is_default_process_input_file(processor)
        target = dst.with_name(dst.name + ".part") if custom else dst
        size = 0
        with target.open("wb") as f:
            async for chunk in resp.aiter_bytes(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise DownloadError(
                        f"input {key!r} exceeds the download limit of {limit} bytes "
                        f"(SPROCKET_MAX_DOWNLOAD_BYTES)"
                    )
                f.write(chunk)
        if custom:
            body = httpx.Response(
                resp.status_code,
                headers=[(k, v) for k, v in resp.headers.items() if k != "content-encoding"],
                stream=_FileStream(target),
                request=resp.request,
            )
            try:
                await trio.to_thread.run_sync(processor.process_input_file, body, dst)
            finally:
                target.unlink(missing_ok=True)
        return size

    # -- uploads -----------------------------------------------------------------------------

    async def upload_outputs(self, outputs: dict[str, Any], request_id: str) -> dict[str, Any]:
        """Upload every ``FileOutput`` in ``outputs``; return outputs with their URLs.

        Uploads run concurrently, at most ``upload_concurrency`` at a time. A missing file or a
        storage error raises ``UploadError``.
        """
        files = list(dict.fromkeys(find_file_outputs(outputs)))
        if not files:
            return outputs
        for path in files:
            if not path.is_file():
                raise UploadError(f"FileOutput {str(path)!r} does not exist or is not a file")
        names: dict[FileOutput, str] = {}
        taken: set[str] = set()
        for path in files:
            base = safe_file_name(path.name)
            name = f"{safe_file_name(request_id, 'job')}-{base}"
            n = 1
            while name in taken:
                n += 1
                name = f"{safe_file_name(request_id, 'job')}-{n}-{base}"
            taken.add(name)
            names[path] = name
        limiter = trio.CapacityLimiter(self._settings.upload_concurrency)
        urls: dict[FileOutput, str] = {}

        async def upload(path: FileOutput) -> None:
            async with limiter:
                urls[path] = await self._upload(path, names[path])

        with _first_error():
            async with trio.open_nursery() as nursery:
                for path in files:
                    nursery.start_soon(upload, path)
        return dict(_replace_file_outputs(outputs, urls))

    async def _upload(self, path: FileOutput, name: str) -> str:
        last: str = ""
        for attempt in range(UPLOAD_ATTEMPTS):
            if attempt:
                await trio.sleep(self._settings.backoff_initial * 2**attempt)
            try:
                resp = await self._api.post("/v1/storage/upload-request", json={"filename": name})
                if resp.status_code >= 500:
                    last = f"upload-request answered HTTP {resp.status_code}"
                    continue
                if resp.status_code >= 400:
                    hint = " (check TOGETHER_API_KEY)" if resp.status_code in (401, 403) else ""
                    raise UploadError(
                        f"uploading {path.name}: upload-request answered HTTP "
                        f"{resp.status_code}{hint}"
                    )
                target = self._api_base.join(resp.json()["upload_url"]["url"])
                size = path.stat().st_size
                put = await self._plain.put(
                    target,
                    content=self._read_chunks(path),
                    headers={"content-length": str(size)},
                )
                if put.status_code >= 500:
                    last = f"upload answered HTTP {put.status_code}"
                    continue
                if put.status_code >= 400:
                    raise UploadError(f"uploading {path.name}: storage answered {put.status_code}")
            except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            self._metrics.upload_bytes.inc(size)
            self._events.record("uploaded", file=path.name, bytes=size)
            return f"{str(self._api_base).rstrip('/')}/v1/storage/{name}"
        raise UploadError(f"uploading {path.name} failed after {UPLOAD_ATTEMPTS} attempts: {last}")

    async def _read_chunks(self, path: Path) -> AsyncIterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    @staticmethod
    def remove_job_dir(job_dir: Path) -> None:
        shutil.rmtree(job_dir, ignore_errors=True)


@contextlib.contextmanager
def _first_error() -> Iterator[None]:
    """Surface the first failure of concurrent transfers as itself, not as a group.

    A nursery wraps a child's ``DownloadError`` in an ``ExceptionGroup``, whose text ("Exceptions
    from Trio nursery") would become the job's ``info.error``. Groups that hold anything but
    plain exceptions (``Cancelled``, ``KeyboardInterrupt``) propagate unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if leaves and all(isinstance(leaf, Exception) for leaf in leaves):
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def new_job_dir(root: Path) -> Path:
    """A fresh, unguessable folder for one job's inputs."""
    return root / secrets.token_hex(8)


def _url_basename(url: str) -> str:
    path = httpx.URL(url).path
    return os.path.basename(unquote(path).rstrip("/"))


def _display(url: httpx.URL) -> str:
    """The URL without its query string (which may hold a signature)."""
    return str(url.copy_with(query=None, fragment=None))
