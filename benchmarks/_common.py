"""Shared helpers of the benchmarks: processes, percentiles, the machine's description."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
        f"Python {platform.python_version()}"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"p50 {percentile(ms, 50):.3f} ms, p99 {percentile(ms, 99):.3f} ms, "
        f"mean {statistics.fmean(ms):.3f} ms (n={len(ms)})"
    )


class Child:
    def __init__(self, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                args, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log.read_text(errors="replace"))
            if found:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"{pattern!r} not seen:\n{self.log.read_text(errors='replace')}")


@contextmanager
def child(args: list[str], log: Path, env: Mapping[str, str] | None = None) -> Iterator[Child]:
    proc = Child(args, {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, log)
    try:
        yield proc
    finally:
        if proc.popen.poll() is None:
            proc.popen.kill()
        proc.popen.wait()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
