"""Real processes for end-to-end tests: started in their own process group, always reaped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


class Proc:
    """A child process whose stdout and stderr go to files the test can poll."""

    def __init__(self, args: list[str], env: Mapping[str, str], cwd: Path, log_dir: Path) -> None:
        self.args = args
        self.stdout_path = log_dir / f"{Path(args[1]).stem}-{time.monotonic_ns()}.out"
        self.stderr_path = self.stdout_path.with_suffix(".err")
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                args, env=dict(env), cwd=cwd, stdout=out, stderr=err, start_new_session=True
            )
        self.pid = self.popen.pid

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

    def kill_group(self) -> None:
        """Kill the whole process group this test started (children included)."""
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


@contextmanager
def spawn(
    script: str | Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path,
    log_dir: Path | None = None,
) -> Iterator[Proc]:
    """Run ``python script args...``; whatever happens, its process group is killed after."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = Proc([sys.executable, str(script), *args], full_env, cwd, log_dir or cwd)
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
        found = proc.wait_for(r"http_listening addresses=(http://[0-9.]+:\d+)")
        yield proc, found.group(1)


@contextmanager
def queue_server(data_dir: Path, cwd: Path) -> Iterator[tuple[Proc, str, str]]:
    """Run ``sprocket queue serve`` on a free port; yield it, its base URL and its API key."""
    args = ["-m", "sprocket._cli", "queue", "serve", "--port", "0", "--data-dir", str(data_dir)]
    with spawn(args[0], *args[1:], cwd=cwd) as proc:
        url = proc.wait_for(r"listening on (http://\S+)").group(1)
        key = (data_dir / "api_key").read_text().strip()
        yield proc, url, key
