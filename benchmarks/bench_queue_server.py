"""Benchmark of the local queue server (``sprocket queue serve``) over loopback.

Run: ``.venv/bin/python benchmarks/bench_queue_server.py [--quick] [--json FILE]``. It starts its
own server on a free port with a temporary data dir, measures, prints the figures with the
method and the machine, and cleans up. Figures:

- submits per second, one client (sequential requests) and 8 concurrent clients;
- claim + done cycles per second with 8 concurrent workers;
- latency from the start of a submit to the worker's long-poll returning that job (p50/p99);
- peak growth of the server's RSS while streaming a 1 GiB file up (pre-signed PUT) and down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

API_KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MIB = 1024 * 1024


@contextmanager
def running_server(data_dir: Path) -> Iterator[tuple[str, int]]:
    """Start ``sprocket queue serve --port 0``; yield (url, pid); stop it (by pid) afterwards."""
    cmd = [sys.executable, "-m", "sprocket._cli", "queue", "serve", "--port", "0"]
    cmd += ["--data-dir", str(data_dir), "--api-key", API_KEY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = ""
        for line in proc.stdout:
            match = re.search(r"listening on (\S+)", line)
            if match:
                url = match.group(1)
                break
        if not url:
            raise RuntimeError("the queue server did not start")
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    """Samples a process's RSS every few milliseconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


# -- measurements ---------------------------------------------------------------------------------


async def submits_per_second(url: str, clients: int, seconds: float) -> float:
    count = 0
    deadline = trio.current_time() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, limits=limits) as http:

        async def client(n: int) -> None:
            nonlocal count
            i = 0
            while trio.current_time() < deadline:
                body = {"model": f"submit-{clients}", "payload": {"n": n, "i": i}}
                r = await http.post("/v1/queue/submit", json=body)
                r.raise_for_status()
                count += 1
                i += 1

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for n in range(clients):
                nursery.start_soon(client, n)
        elapsed = trio.current_time() - start
    return count / elapsed


async def claim_done_cycles(url: str, workers: int, jobs: int) -> float:
    model = "cycles"
    limits = httpx.Limits(max_connections=workers + 8, max_keepalive_connections=workers + 8)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, limits=limits, timeout=30) as http:

        async def fill(n: int) -> None:
            for i in range(n):
                body = {"model": model, "payload": {"i": i}}
                (await http.post("/v1/queue/submit", json=body)).raise_for_status()

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(fill, jobs // 8)
        cycles = 0

        async def worker() -> None:
            nonlocal cycles
            while True:
                params = {"model": model, "timeout": "0s", "claim_timeout": "60"}
                data = (await http.get("/internal/v1/queue/retrieve", params=params)).json()
                job = data.get("data")
                if not job:
                    return
                body = {
                    "model": model,
                    "request_id": job["request_id"],
                    "status": "done",
                    "payload": {"ok": True},
                    "claim_id": job["claim_id"],
                }
                (await http.post("/internal/v1/videos/status", json=body)).raise_for_status()
                cycles += 1

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker)
        elapsed = trio.current_time() - start
    return cycles / elapsed


async def submit_to_poll_latency(url: str, samples: int) -> list[float]:
    model = "latency"
    latencies: list[float] = []
    async with (
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as submitter,
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as poller,
    ):

        async def poll(got: trio.Event, received: list[float]) -> None:
            params = {"model": model, "timeout": "10s"}
            data = (await poller.get("/internal/v1/queue/retrieve", params=params)).json()
            received.append(time.perf_counter())
            assert data.get("data"), "long-poll returned no job"
            got.set()

        for i in range(samples):
            got = trio.Event()
            received: list[float] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll, got, received)
                # Let the poll reach the server and wait there before submitting.
                await trio.sleep(0.002)
                start = time.perf_counter()
                body = {"model": model, "payload": {"i": i}}
                (await submitter.post("/v1/queue/submit", json=body)).raise_for_status()
                await got.wait()
            latencies.append(received[0] - start)
    return latencies


async def big_file(url: str, pid: int, size: int) -> dict[str, float]:
    chunk = b"\xa5" * MIB
    baseline = rss_bytes(pid)
    result: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600) as http:
        r = await http.post("/v1/storage/upload-request", json={"filename": "bench-1gib.bin"})
        put_url = r.json()["upload_url"]["url"]

        async def body() -> AsyncIterator[bytes]:
            for _ in range(size // MIB):
                yield chunk

        with PeakRss(pid) as peak:
            start = time.perf_counter()
            async with httpx.AsyncClient(timeout=600) as anon:
                r = await anon.put(put_url, content=body())
            r.raise_for_status()
            result["upload_s"] = time.perf_counter() - start
        result["upload_peak_growth_mib"] = (peak.peak - baseline) / MIB
        baseline = rss_bytes(pid)
        received = 0
        with PeakRss(pid) as peak:
            start = time.perf_counter()
            async with http.stream("GET", "/v1/storage/bench-1gib.bin") as got:
                got.raise_for_status()
                async for part in got.aiter_raw():
                    received += len(part)
            result["download_s"] = time.perf_counter() - start
        assert received == size, (received, size)
        result["download_peak_growth_mib"] = (peak.peak - baseline) / MIB
    return result


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            mem = f", {int(fh.readline().split()[1]) / 1024 / 1024:.0f} GiB RAM"
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs{mem}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}"
    )


async def run(args: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    seconds = 1.5 if args.quick else 4.0
    figures: dict[str, Any] = {}
    figures["submits_per_s_1_client"] = await submits_per_second(url, 1, seconds)
    figures["submits_per_s_8_clients"] = await submits_per_second(url, 8, seconds)
    figures["claim_done_cycles_per_s_8_workers"] = await claim_done_cycles(
        url, 8, 800 if args.quick else 3000
    )
    latencies = await submit_to_poll_latency(url, 100 if args.quick else 400)
    cuts = statistics.quantiles(latencies, n=100)
    figures["submit_to_poll_ms_p50"] = statistics.median(latencies) * 1000
    figures["submit_to_poll_ms_p99"] = cuts[98] * 1000
    figures["latency_samples"] = len(latencies)
    size = (256 if args.quick else 1024) * MIB
    figures["big_file_bytes"] = size
    figures.update(await big_file(url, pid, size))
    figures["server_rss_mib_end"] = rss_bytes(pid) / MIB
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, 256 MiB file")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    data_dir = Path(tempfile.mkdtemp(prefix="sprocket-bench-"))
    try:
        with running_server(data_dir) as (url, pid):
            figures = trio.run(run, args, url, pid)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    size_gib = figures["big_file_bytes"] / 1024**3
    print("sprocket queue server benchmark")
    print(f"machine: {machine()}")
    print(
        "method: one `sprocket queue serve` process (hypercorn + quart-trio, SQLite WAL, "
        "synchronous=FULL: every submit is fsynced before its 200) on 127.0.0.1, driven over "
        "HTTP/1.1 keep-alive by httpx.AsyncClient tasks on Trio in this process; client and "
        "server share the machine's CPUs. Rates are completed requests / wall time; latency is "
        "from sending a submit to the waiting worker's long-poll answer arriving; RSS is the "
        "server's VmRSS sampled every 5 ms, growth over its value just before the transfer."
    )
    print(f"submits/s, 1 client (sequential):     {figures['submits_per_s_1_client']:8.0f}")
    print(f"submits/s, 8 concurrent clients:      {figures['submits_per_s_8_clients']:8.0f}")
    cycles = figures["claim_done_cycles_per_s_8_workers"]
    print(f"claim+done cycles/s, 8 workers:       {cycles:8.0f}")
    print(
        f"submit -> long-poll latency (n={figures['latency_samples']}): "
        f"p50 {figures['submit_to_poll_ms_p50']:.2f} ms, "
        f"p99 {figures['submit_to_poll_ms_p99']:.2f} ms"
    )
    print(
        f"{size_gib:g} GiB upload (streamed PUT):    {figures['upload_s']:.1f} s, "
        f"peak server RSS growth {figures['upload_peak_growth_mib']:.1f} MiB"
    )
    print(
        f"{size_gib:g} GiB download (streamed GET):  {figures['download_s']:.1f} s, "
        f"peak server RSS growth {figures['download_peak_growth_mib']:.1f} MiB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
