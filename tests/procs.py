"""Real processes for end-to-end tests: started in their own process group, always reaped.

Output goes to files the test polls (``select()`` on a buffered text pipe can miss a line that
is already in the buffer). Clean-up kills only what a test started: by pid, or the process group
of a child started in a session of its own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: What a worker logs once its HTTP server is up (``--port 0`` picks a free port).
WORKER_LISTEN_RE = r"http_listening addresses=(http://[0-9.]+:\d+)"
QUEUE_LISTEN_RE = r"sprocket queue server listening on (\S+)"


class Proc:
    """A child process whose stdout and stderr go to files the test can poll.

    ``env`` is the child's whole environment. The child leads a session of its own.
    """

    def __init__(
        self, args: list[str], env: Mapping[str, str], cwd: Path, log_dir: Path, name: str
    ) -> None:
        self.args = args
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}-{time.monotonic_ns()}.out"
        self.stderr_path = self.stdout_path.with_suffix(".err")
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                args, env=dict(env), cwd=cwd, stdout=out, stderr=err, start_new_session=True
            )
        self.pid = self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Wait until ``pattern`` appears in the output; fail with the output if it does not."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            found = regex.search(self.output())
            if found:
                return found
            if self.popen.poll() is not None:
                found = regex.search(self.output())
                if found:
                    return found
                raise AssertionError(
                    f"process exited ({self.popen.returncode}) before {pattern!r}:\n{self.output()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.output()}")

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process did not exit in {timeout} s:\n{self.output()}") from None

    def stop(self, signum: int, timeout: float = 15.0) -> None:
        """Send ``signum`` (by pid) and reap; kill the whole group if it is not gone in time."""
        self.signal(signum)
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        self.kill_group()

    def kill_group(self) -> None:
        """Kill the whole process group this test started (children included)."""
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


def start_python(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path,
    log_dir: Path | None = None,
    name: str | None = None,
    inherit_env: bool = True,
) -> Proc:
    """Start ``python args...`` unbuffered; ``env`` adds to ours (or, without ``inherit_env``,
    is the whole environment). The caller must ``kill_group()`` it."""
    base = os.environ if inherit_env else {}
    full_env = {**base, **(env or {}), "PYTHONUNBUFFERED": "1"}
    return Proc([sys.executable, *args], full_env, cwd, log_dir or cwd, name or Path(args[0]).stem)


@contextmanager
def spawn(
    script: str | Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path,
    log_dir: Path | None = None,
) -> Iterator[Proc]:
    """Run ``python script args...``; whatever happens, its process group is killed after."""
    proc = start_python(str(script), *args, env=env, cwd=cwd, log_dir=log_dir)
    try:
        yield proc
    finally:
        proc.kill_group()


@contextmanager
def worker(
    script: str | Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path,
) -> Iterator[tuple[Proc, str]]:
    """Start a worker with ``--port 0 --host 127.0.0.1``; yield it and its base URL."""
    with spawn(script, "--port", "0", "--host", "127.0.0.1", *args, env=env, cwd=cwd) as proc:
        found = proc.wait_for(WORKER_LISTEN_RE)
        yield proc, found.group(1)


@dataclass
class QueueServer:
    """``sprocket queue serve`` on a free port; ``start()`` again restarts it on ``data_dir``.

    Without ``api_key`` the server uses its environment's key or generates one (``key()``).
    Output files go to ``log_dir`` (default: ``data_dir``'s parent).
    """

    data_dir: Path
    api_key: str = ""
    extra_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    proc: Proc | None = None
    url: str = ""

    def command(self) -> list[str]:
        cmd = ["-m", "sprocket._cli", "queue", "serve", "--port", "0"]
        cmd += ["--data-dir", str(self.data_dir), *self.extra_args]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd

    def start(self, env: Mapping[str, str] | None = None, timeout: float = 60.0) -> str:
        """Start the server (``env``: its whole environment; default ours); return its URL."""
        assert self.proc is None or self.proc.poll() is not None
        log_dir = self.log_dir or self.data_dir.parent
        self.proc = start_python(
            *self.command(),
            env=os.environ if env is None else env,
            inherit_env=False,
            cwd=log_dir,
            name="queue-server",
        )
        try:
            self.url = self.proc.wait_for(QUEUE_LISTEN_RE, timeout).group(1)
        except AssertionError:
            self.proc.kill_group()
            raise
        return self.url

    @property
    def output(self) -> list[str]:
        """The current run's output lines so far."""
        return [] if self.proc is None else self.proc.output().splitlines(keepends=True)

    def read_rest(self) -> str:
        """All output of the current run (of an exited process: all it wrote)."""
        return "".join(self.output)

    def key(self) -> str:
        return self.api_key or (self.data_dir / "api_key").read_text().strip()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to our child (by pid) and reap it; kill its group if it lingers."""
        if self.proc is not None:
            self.proc.stop(sig)

    def client(self, **kwargs: object) -> httpx.Client:
        auth = {"Authorization": f"Bearer {self.key()}"}
        return httpx.Client(base_url=self.url, headers=auth, timeout=30.0, **kwargs)  # type: ignore[arg-type]

    def worker_env(self) -> dict[str, str]:
        """What a worker needs to use this server as its queue (and storage)."""
        return {"TOGETHER_API_BASE_URL": self.url, "TOGETHER_API_KEY": self.key()}


@contextmanager
def queue_server(
    data_dir: Path, *, api_key: str = "", extra_args: list[str] | None = None
) -> Iterator[QueueServer]:
    """A started ``QueueServer``; whatever happens, its process group is killed after."""
    server = QueueServer(data_dir, api_key=api_key, extra_args=extra_args or [])
    try:
        server.start()
        yield server
    finally:
        server.kill()
