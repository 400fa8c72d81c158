"""The worker process of the torchrun end-to-end tests: the example script with WORLD_SIZE=2.

It starts in a session of its own (``tests.procs``), so the test can find and check its whole
tree; clean-up kills only what the test started (its group, recorded pids, their sessions).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.procs import EXAMPLES, WORKER_LISTEN_RE, Proc, start_python

from .procs import Tree

EXAMPLE = EXAMPLES / "torchrun_sink.py"
API_KEY = "torchrun-test-key"
#: Failure guards only; no test asserts on durations.
START_TIMEOUT = 120.0
JOB_TIMEOUT = 120.0


@dataclass
class Worker:
    """``python examples/torchrun_sink.py`` with WORLD_SIZE=2, output in files under ``tmp``."""

    tmp: Path
    queue: bool = False
    env: dict[str, str] = field(default_factory=dict)
    proc: Proc | None = None
    url: str = ""
    tree: Tree = field(default_factory=Tree)

    def log(self) -> str:
        assert self.proc is not None
        return self.proc.output()

    def start(self) -> Worker:
        env = {"WORLD_SIZE": "2", "TERMINATION_GRACE_PERIOD_SECONDS": "60", **self.env}
        args = ["--port", "0", "--host", "127.0.0.1", *(["--queue"] if self.queue else [])]
        self.proc = start_python(str(EXAMPLE), *args, env=env, cwd=self.tmp)
        return self

    def wait_healthy(self) -> None:
        assert self.proc is not None
        self.url = self.proc.wait_for(WORKER_LISTEN_RE, START_TIMEOUT).group(1)
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
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
        self.proc.signal(sig)

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait(START_TIMEOUT)

    def cleanup(self) -> None:
        if self.proc is not None:
            self.proc.kill_group()
        self.tree.kill_all()
