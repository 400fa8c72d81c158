"""Fixtures for the queue server tests: in-process apps and real ``sprocket queue serve`` runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
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

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LISTEN_RE = re.compile(r"sprocket queue server listening on (\S+)")
START_TIMEOUT = 30.0


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


@dataclass
class ServerProc:
    """A ``sprocket queue serve`` child process."""

    data_dir: Path
    api_key: str
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    output: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread = field(default_factory=lambda: threading.Thread())

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "sprocket._cli", "queue", "serve", "--port", "0"]
        cmd += ["--data-dir", str(self.data_dir), *self.extra_args]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd

    def start(self, env: dict[str, str] | None = None) -> str:
        assert self.proc is None or self.proc.poll() is not None
        self.output = []
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        # A thread drains the pipe (select() on a buffered text pipe would miss lines).
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        self.url = self._wait_for_url()
        return self.url

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cond:
                self.output.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        with self._cond:
            while time.monotonic() < deadline:
                for line in self.output:
                    match = LISTEN_RE.search(line)
                    if match:
                        return match.group(1)
                if self.proc is None or self.proc.poll() is not None:
                    break
                self._cond.wait(timeout=0.2)
        self.kill()
        raise RuntimeError("queue server did not start:\n" + "".join(self.output))

    def read_rest(self) -> str:
        """All output of an exited process."""
        self._reader.join(timeout=START_TIMEOUT)
        with self._cond:
            return "".join(self.output)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to our child (by pid) and reap it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        self._reader.join(timeout=15)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=30.0, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def make_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProc]]:
    """Factory of server processes; every one is killed (by pid) at teardown."""
    made: list[ServerProc] = []

    def make(data_dir: Path | None = None, extra_args: list[str] | None = None) -> ServerProc:
        server = ServerProc(
            data_dir=data_dir or tmp_path_factory.mktemp("queue-data"),
            api_key=API_KEY,
            extra_args=extra_args or [],
        )
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """One running server shared by a module's tests (use distinct model names per test)."""
    proc = ServerProc(
        data_dir=tmp_path_factory.mktemp("queue-shared"),
        api_key=API_KEY,
        extra_args=["--max-upload-bytes", str(8 * 1024 * 1024)],
    )
    try:
        proc.start()
        yield proc
    finally:
        proc.kill()
