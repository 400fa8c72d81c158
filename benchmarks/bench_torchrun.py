"""Benchmarks of the torchrun supervisor (CPU, gloo, WORLD_SIZE=2).

1. Per-job overhead of the IPC round trip: an empty predict through ``TorchrunPredictor`` with
   two ranks, against the same empty predict through the single-process ``SyncPredictor``
   (target: under 2 ms extra at p50).
2. SIGTERM while idle -> the last process of the worker's tree gone, for the real worker
   ``python examples/torchrun_sink.py`` (target: under 3 s).

Run: ``.venv/bin/python benchmarks/bench_torchrun.py [--jobs N] [--rounds N] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

import sprocket
from sprocket._config import Settings
from sprocket._events import EventLog
from sprocket._executor import SyncPredictor
from sprocket._info import InfoBuffer
from sprocket._lifecycle import Lifecycle
from sprocket._proctree import group_members, iter_processes
from sprocket._torchrun import TorchrunPredictor

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "torchrun_sink.py"


class Empty(sprocket.Sprocket):
    """The single-process baseline: the same empty predict as the example's ``empty``."""

    def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": statistics.median(ordered) * 1e3,
        "p90_ms": ordered[int(len(ordered) * 0.9)] * 1e3,
        "p99_ms": ordered[int(len(ordered) * 0.99)] * 1e3,
    }


async def _time_jobs(predictor: Any, jobs: int) -> list[float]:
    for _ in range(20):  # warm up: thread cache, socket buffers
        await predictor.predict({"empty": True}, InfoBuffer())
    samples = []
    for _ in range(jobs):
        t0 = time.perf_counter()
        await predictor.predict({"empty": True}, InfoBuffer())
        samples.append(time.perf_counter() - t0)
    return samples


async def bench_ipc(jobs: int) -> dict[str, Any]:
    single = SyncPredictor(Empty())
    async with single:
        await single.setup()
        baseline = await _time_jobs(single, jobs)
    settings = Settings(name="torchrun-sink", world_size=2)
    ranks = TorchrunPredictor(
        Empty(), settings, Lifecycle(30.0), EventLog(), entrypoint=[str(EXAMPLE)]
    )
    async with ranks:
        await ranks.setup()
        torchrun = await _time_jobs(ranks, jobs)
        await ranks.shutdown()
    result = {
        "jobs": jobs,
        "single_process": _percentiles(baseline),
        "torchrun_world_size_2": _percentiles(torchrun),
    }
    result["extra_p50_ms"] = (
        result["torchrun_world_size_2"]["p50_ms"] - result["single_process"]["p50_ms"]
    )
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tree(root: int) -> set[int]:
    """``root`` and its descendants: the process groups of the worker's tree."""
    procs = list(iter_processes())
    found, todo = {root}, [root]
    while todo:
        parent = todo.pop()
        for p in procs:
            if p.ppid == parent and p.pid not in found:
                found.add(p.pid)
                todo.append(p.pid)
    return found


def bench_sigterm(rounds: int) -> dict[str, Any]:
    samples = []
    for _ in range(rounds):
        port = _free_port()
        env = {**os.environ, "WORLD_SIZE": "2"}
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            with httpx.Client(timeout=5.0) as client:
                while time.monotonic() < deadline:
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                            break
                    time.sleep(0.1)
            groups = _tree(proc.pid)  # worker, torchrun and each rank lead their own group
            assert len(groups) >= 4, groups
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            while True:
                proc.poll()  # reap the worker itself as soon as it exits
                if not group_members(groups):
                    break
                time.sleep(0.002)
            samples.append(time.perf_counter() - t0)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {"rounds": rounds, "seconds": samples, "median_s": statistics.median(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    ipc = trio.run(bench_ipc, args.jobs)
    sigterm = bench_sigterm(args.rounds)
    if args.json:
        print(json.dumps({"ipc": ipc, "sigterm_idle": sigterm}, indent=2))
        return
    one, two = ipc["single_process"], ipc["torchrun_world_size_2"]
    print(f"empty predict, {args.jobs} jobs (p50 / p90 / p99):")
    print(f"  single process   {one['p50_ms']:.3f} / {one['p90_ms']:.3f} / {one['p99_ms']:.3f} ms")
    print(f"  torchrun, 2 ranks {two['p50_ms']:.3f} / {two['p90_ms']:.3f} / {two['p99_ms']:.3f} ms")
    print(f"  extra at p50     {ipc['extra_p50_ms']:.3f} ms (target < 2 ms)")
    runs = ", ".join(f"{s:.2f}" for s in sigterm["seconds"])
    print(f"SIGTERM (idle) -> last process gone: median {sigterm['median_s']:.2f} s ({runs})")
    print("  (target < 3 s)")


if __name__ == "__main__":
    main()
