"""File storage: names, signatures, limits and streaming (in-process through ASGITransport)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import trio

from sprocket._queue_server import FileStorage, QueueService, QueueStore, create_app
from sprocket._queue_server._storage import InvalidName

from .conftest import API_KEY, AUTH, InProc

T = TypeVar("T")


def test_names(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, secret=b"k")
    for good in ("a.txt", "0190-out put.mp4", "vidéo.mp4", "x" * 200, "a..b"):
        assert storage.path_for(good).parent == tmp_path.resolve()
    for bad in (
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "/etc/passwd",
        ".hidden",
        "a\\b",
        "a\x00b",
        "x" * 300,
    ):
        with pytest.raises(InvalidName):
            storage.path_for(bad)


def test_planted_symlink_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "files"
    storage = FileStorage(root, secret=b"k")
    (tmp_path / "outside.txt").write_text("secret")
    (root / "link.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(InvalidName):
        storage.path_for("link.txt")


def test_signatures_expire_and_bind_the_name(tmp_path: Path) -> None:
    now = [1000.0]
    storage = FileStorage(tmp_path, secret=b"k", url_ttl=60, clock=lambda: now[0])
    expires, sig = storage.sign_upload("a.txt")
    assert storage.verify_upload("a.txt", str(expires), sig)
    assert not storage.verify_upload("b.txt", str(expires), sig)
    assert not storage.verify_upload("a.txt", str(expires + 1), sig)
    assert not storage.verify_upload("a.txt", "soon", sig)
    other = FileStorage(tmp_path, secret=b"other", clock=lambda: now[0])
    assert not other.verify_upload("a.txt", str(expires), sig)
    now[0] += 61
    assert not storage.verify_upload("a.txt", str(expires), sig)


async def _upload_url(client: httpx.AsyncClient, name: str) -> str:
    r = await client.post("/v1/storage/upload-request", json={"filename": name})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["file_url"] == f"http://queue.test/v1/storage/{name}"
    return str(body["upload_url"]["url"])


async def test_streamed_put_and_get_in_process(inproc: InProc) -> None:
    url = await _upload_url(inproc.client, "r1-a.bin")
    blob = bytes(range(256)) * 4096  # 1 MiB

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(blob), 10_000):
            yield blob[start : start + 10_000]

    async with httpx.AsyncClient(transport=inproc.client._transport) as anon:
        r = await anon.put(url, content=chunks())
    assert r.status_code == 200 and r.json()["size"] == len(blob)
    r = await inproc.client.get("/v1/storage/r1-a.bin")
    assert r.status_code == 200 and r.content == blob
    assert r.headers["content-length"] == str(len(blob))


async def test_upload_limit_in_process(inproc: InProc) -> None:
    url = await _upload_url(inproc.client, "big.bin")
    limit = inproc.storage.max_upload_bytes

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(limit // 65536 + 2):
            yield b"\0" * 65536

    async with httpx.AsyncClient(transport=inproc.client._transport) as anon:
        assert (await anon.put(url, content=b"\0" * (limit + 1))).status_code == 413
        assert (await anon.put(url, content=chunks())).status_code == 413
        assert (await anon.put(url, content=b"\0" * limit)).status_code == 200
    assert [p.name for p in inproc.storage.root.iterdir()] == ["big.bin"]


async def test_upload_without_storage_is_404() -> None:
    store = QueueStore(":memory:")
    app = create_app(QueueService(store), api_key=API_KEY)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://q", headers=AUTH) as c:
        r = await c.post("/v1/storage/upload-request", json={"filename": "a"})
        assert r.status_code == 404
    store.close()


async def test_upload_body_is_flow_controlled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A slow disk: each write takes (virtual) time. The client must be held back rather than
    # the server buffering what the disk has not taken yet.
    written = [0]

    async def slow_offload(fn: Callable[[], T]) -> T:
        await trio.sleep(0.01)
        result = fn()
        if isinstance(result, int):
            written[0] += result
        return result

    storage = FileStorage(tmp_path, secret=b"k", offload=slow_offload)
    store = QueueStore(":memory:", clock=trio.current_time)
    app = create_app(QueueService(store), api_key=API_KEY, storage=storage)
    chunk, total = 64 * 1024, 8 * 1024 * 1024
    max_ahead = [0]

    async def chunks() -> AsyncIterator[bytes]:
        sent = 0
        while sent < total:
            max_ahead[0] = max(max_ahead[0], sent - written[0])
            yield b"x" * chunk
            sent += chunk

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://q", headers=AUTH) as c:
        r = await c.post("/v1/storage/upload-request", json={"filename": "slow.bin"})
        url = r.json()["upload_url"]["url"]
        r = await c.put(url, content=chunks())
    store.close()
    assert r.status_code == 200 and r.json()["size"] == total
    assert (tmp_path / "slow.bin").stat().st_size == total
    # Bounded by what the handler holds while writing plus what the connection buffered
    # meanwhile: each at most the high-water mark (1 MiB) and one chunk. Unbounded, the whole
    # 8 MiB would run ahead.
    assert max_ahead[0] <= 2 * (1024 * 1024 + chunk)


async def test_download_missing_and_bad_names(inproc: InProc) -> None:
    r = await inproc.client.get("/v1/storage/nope.bin")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = await inproc.client.get("/v1/storage/.upload-123")
    assert r.status_code == 400
