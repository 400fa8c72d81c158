"""Running the queue server: hypercorn on Trio, inside one nursery with the lease reaper."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from ._app import create_app
from ._service import DEFAULT_CLAIM_TIMEOUT, QueueService, thread_offload
from ._storage import DEFAULT_MAX_UPLOAD_BYTES, FileStorage
from ._store import QueueStore

__all__ = ["DB_FILENAME", "KEY_FILENAME", "load_or_create_api_key", "serve_queue"]

DB_FILENAME: Final = "queue.sqlite3"
KEY_FILENAME: Final = "api_key"
STORAGE_DIRNAME: Final = "storage"
#: How long in-flight requests may take to finish once shutdown starts (seconds).
GRACEFUL_TIMEOUT: Final = 5.0


def load_or_create_api_key(data_dir: str | os.PathLike[str]) -> tuple[str, bool]:
    """Return ``(key, created)``: the key stored in the data dir, generating it on first use."""
    path = Path(data_dir) / KEY_FILENAME
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        key = ""
    if key:
        return key, False
    Path(data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    key = "sprk_" + secrets.token_urlsafe(32)
    # Written owner-only from the start: O_EXCL fails rather than trust a pre-made file's mode.
    tmp = path.with_name(f".{KEY_FILENAME}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return key, True


def _storage_secret(api_key: str) -> bytes:
    # Derived, not stored: rotating the API key also invalidates outstanding upload URLs.
    return hmac.new(
        api_key.encode(), b"sprocket queue storage upload url v1", hashlib.sha256
    ).digest()


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _open_store(root: Path) -> QueueStore:
    # Startup only, before anything is served, so blocking here stalls nobody.
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return QueueStore(root / DB_FILENAME)


async def serve_queue(
    data_dir: str | os.PathLike[str],
    *,
    api_key: str,
    host: str = "127.0.0.1",
    port: int = 8900,
    certfile: str | None = None,
    keyfile: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    default_claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
    public_url: str | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local queue until ``shutdown_trigger`` returns (or until cancelled).

    The database and stored files live under ``data_dir``. Reports the server's base URL (for
    example ``http://127.0.0.1:8900``; with ``port=0`` the port actually bound) through
    ``task_status`` once it accepts connections. With ``certfile`` and ``keyfile`` it serves
    HTTPS. On shutdown, waiting long-polls are answered empty at once and in-flight requests get
    up to ``GRACEFUL_TIMEOUT`` seconds to finish; the database is then closed.
    """
    if (certfile is None) != (keyfile is None):
        raise ValueError("certfile and keyfile must be given together")
    root = Path(data_dir)
    store = _open_store(root)
    try:
        service = QueueService(
            store, offload=thread_offload(), default_claim_timeout=default_claim_timeout
        )
        storage = FileStorage(
            root / STORAGE_DIRNAME,
            secret=_storage_secret(api_key),
            max_upload_bytes=max_upload_bytes,
            # File I/O gets its own threads so a big upload never queues behind the database.
            offload=thread_offload(trio.CapacityLimiter(8)),
        )
        app = create_app(service, api_key=api_key, storage=storage, public_url=public_url)

        config = Config()
        config.bind = [_bind(host, port)]
        config.graceful_timeout = GRACEFUL_TIMEOUT
        config.accesslog = None  # upload URLs carry signatures; keep them out of logs
        if certfile is not None and keyfile is not None:
            config.certfile, config.keyfile = certfile, keyfile

        async def trigger() -> None:
            if shutdown_trigger is None:
                await trio.sleep_forever()
            else:
                await shutdown_trigger()
            service.close_polls()

        async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve(app, config, shutdown_trigger=trigger, task_status=task_status)
            finally:
                # hypercorn returns after its graceful shutdown; the reaper goes with it.
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            await nursery.start(service.run_reaper)
            binds: list[str] = await nursery.start(run_http)
            task_status.started(binds[0])
    finally:
        store.close()
