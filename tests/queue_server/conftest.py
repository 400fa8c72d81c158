"""Fixtures for the queue server tests: in-process apps and real ``sprocket queue serve`` runs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from sprocket._queue_server import (
    FileStorage,
    QueueService,
    QueueStore,
    create_app,
    run_inline,
)
from tests.procs import QueueServer, queue_server

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class InProc:
    """An app served in-process through httpx.ASGITransport (no sockets)."""

    store: QueueStore
    service: QueueService
    client: httpx.AsyncClient
    storage: FileStorage


@pytest.fixture
async def inproc(tmp_path: Path) -> AsyncIterator[InProc]:
    """The app on an in-memory store whose clock is Trio's (so a MockClock drives leases)."""
    store = QueueStore(":memory:", clock=trio.current_time)
    service = QueueService(store, offload=run_inline)
    storage = FileStorage(
        tmp_path / "files", secret=b"s3cret", max_upload_bytes=4 * 1024 * 1024, clock=time.time
    )
    app = create_app(service, api_key=API_KEY, storage=storage)
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://queue.test", headers=AUTH) as c,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(service.run_reaper)
        yield InProc(store, service, c, storage)
        nursery.cancel_scope.cancel()
    store.close()


# -- real server processes ----------------------------------------------------------------------


@pytest.fixture
def make_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., QueueServer]]:
    """Factory of (not yet started) server processes; every one is killed at teardown."""
    made: list[QueueServer] = []

    def make(extra_args: list[str] | None = None) -> QueueServer:
        home = tmp_path_factory.mktemp("queue")
        server = QueueServer(home / "data", api_key=API_KEY, extra_args=extra_args or [])
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueServer]:
    """One running server shared by a module's tests (use distinct model names per test)."""
    data_dir = tmp_path_factory.mktemp("queue-shared") / "data"
    extra_args = ["--max-upload-bytes", str(8 * 1024 * 1024)]
    with queue_server(data_dir, api_key=API_KEY, extra_args=extra_args) as proc:
        yield proc
