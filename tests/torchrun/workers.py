"""Real worker processes for the end-to-end tests: the example script and the queue server.

Each process starts in a session of its own, so the test can find and check its whole tree;
clean-up kills only what the test started (recorded pids, or that session).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .procs import Tree

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "torchrun_sink.py"
API_KEY = "torchrun-test-key"
#: Failure guards only; no test asserts on durations.
START_TIMEOUT = 120.0
JOB_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Worker:
    """``python examples/torchrun_sink.py`` with WORLD_SIZE=2, output in a log file."""

    tmp: Path
    queue: bool = False
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    tree: Tree = field(default_factory=Tree)

    @property
    def log_path(self) -> Path:
        return self.tmp / "worker.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> Worker:
        self.port = free_port()
        env = {**os.environ, "WORLD_SIZE": "2", "TERMINATION_GRACE_PERIOD_SECONDS": "60"}
        env.update(self.env)
        args = [sys.executable, str(EXAMPLE), "--port", str(self.port)]
        if self.queue:
            args.append("--queue")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                args,
                env=env,
                cwd=self.tmp,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/health").status_code == 200:
                        self.snapshot()
                        return
                time.sleep(0.2)
        raise AssertionError(f"worker never turned healthy:\n{self.log()}")

    def snapshot(self) -> None:
        assert self.proc is not None
        self.tree.add_root(self.proc.pid)

    def generate(self, payload: dict[str, Any]) -> httpx.Response:
        with httpx.Client(timeout=JOB_TIMEOUT) as client:
            return client.post(self.url + "/generate", json=payload)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=START_TIMEOUT)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.tree.kill_all()


LISTEN_RE = re.compile(r"sprocket queue server listening on (\S+)")


@dataclass
class QueueServer:
    """``sprocket queue serve`` on a free port, with its data and output in ``tmp``."""

    tmp: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""

    @property
    def log_path(self) -> Path:
        return self.tmp / "queue-server.log"

    def start(self) -> QueueServer:
        cmd = [
            sys.executable, "-c", "import sys; from sprocket._cli import main; sys.exit(main())",
            "queue", "serve", "--port", "0", "--data-dir", str(self.tmp / "queue"),
            "--api-key", API_KEY,
        ]  # fmt: skip
        # Output to a file polled for the address: select() on a pipe read with buffered
        # readline() can miss a line that is already in the buffer.
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            if match := LISTEN_RE.search(self.log_path.read_text(errors="replace")):
                self.url = match.group(1)
                return self
            time.sleep(0.05)
        self.stop()
        raise AssertionError("queue server did not start:\n" + self.log_path.read_text())

    def client(self) -> httpx.Client:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.url, headers=auth, timeout=30.0)

    def worker_env(self) -> dict[str, str]:
        return {"TOGETHER_API_BASE_URL": self.url, "TOGETHER_API_KEY": API_KEY}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
