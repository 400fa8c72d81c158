"""Queue-mode figures: jobs/s and the worker's own overhead per job, RSS while moving 1 GiB in
and out, and the cost of 100,000 emit_info calls.

Method: the local queue server runs as its own process (SQLite on disk). The throughput and
emit_info runs drive the real runtime in this process (``Worker.run``, the same tree as
``sprocket.run``) over loopback, timing with Trio's clock from the worker's event log; an httpx
transport wrapper times each status request so the server's share is reported apart. The RSS run
starts a real worker process and samples /proc/<pid>/status (VmRSS, process and children).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import timeit
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import trio

import sprocket
from _common import ROOT, child, machine, python, summary_ms
from sprocket._config import Settings
from sprocket._signals import deliver
from sprocket._worker import Worker

MODEL = "bench"


class TimedTransport(httpx.AsyncBaseTransport):
    """Times every request by path, so the server's share can be told apart."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.timings: dict[str, list[float]] = defaultdict(list)
        self.bodies: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        t0 = trio.current_time()
        response = await self.inner.handle_async_request(request)
        await response.aread()
        self.timings[request.url.path].append(trio.current_time() - t0)
        if request.url.path.endswith("/status"):
            self.bodies.append(request.content)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class Empty(sprocket.Sprocket):
    def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}


class Chatty(sprocket.Sprocket):
    """Busy work in steps of about 50 us (a 5 s predict for 100,000 steps), emitting progress
    at every step when asked to."""

    def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        steps, emit = int(args["steps"]), bool(args["emit"])
        cpu0 = time.thread_time()
        acc = 0
        for i in range(steps):
            for j in range(1500):
                acc += (i * j) % 7
            if emit:
                sprocket.emit_info({"progress": i / steps, "status": "working"})
        return {"acc": acc, "cpu_seconds": time.thread_time() - cpu0}


def submit_many(url: str, key: str, payloads: list[dict[str, Any]]) -> list[str]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        ids = []
        for payload in payloads:
            r = client.post("/v1/queue/submit", json={"model": MODEL, "payload": payload})
            r.raise_for_status()
            ids.append(r.json()["requestId"])
        return ids


async def drive(
    user: sprocket.Sprocket, url: str, key: str, jobs: int, work: Path
) -> tuple[Worker, TimedTransport]:
    transport = TimedTransport()
    settings = Settings(
        name=MODEL, queue=True, api_base_url=url, api_key=key, work_dir=work, poll_timeout=1.0
    )
    worker = Worker(user, settings, transport=transport)

    async def stop_when_done() -> None:
        await worker.events.wait_count("reported", jobs)
        deliver(worker.lifecycle, worker.events)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_when_done)
        await worker.run(handle_signals=False, serve_api=False)
    return worker, transport


def per_job(worker: Worker) -> dict[str, dict[str, float]]:
    times: dict[str, dict[str, float]] = defaultdict(dict)
    for event in worker.events.events:
        rid = event.fields.get("request_id")
        if rid and not str(rid).startswith("warmup"):
            times[str(rid)].setdefault(event.name, event.time)
    return times


def throughput(url: str, key: str, work: Path, jobs: int) -> None:
    submit_many(url, key, [{} for _ in range(jobs)])
    worker, transport = trio.run(drive, Empty(), url, key, jobs, work)
    times = per_job(worker)
    first = min(t["claimed"] for t in times.values())
    last = max(t["reported"] for t in times.values())
    overhead = [
        (t["reported"] - t["claimed"]) - (t["predict_finished"] - t["predict_started"])
        for t in times.values()
    ]
    reports = transport.timings["/internal/v1/videos/status"]
    claims = transport.timings["/internal/v1/queue/retrieve"]
    own = [o - r for o, r in zip(overhead, reports, strict=False)]
    print(f"jobs/s through one worker, empty predict: {jobs / (last - first):.0f} ({jobs} jobs)")
    print(f"  claim returned -> report acknowledged, minus predict: {summary_ms(overhead)}")
    print(f"  of which the server's status request (HTTP + commit): {summary_ms(reports)}")
    print(f"  the worker's own share: {summary_ms(own)}")
    print(f"  claim request round trip (server share, not in the above): {summary_ms(claims)}")


def emit_info_cost(url: str, key: str, work: Path, steps: int, rounds: int = 3) -> None:
    timings: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    sent: dict[bool, int] = {}
    for _ in range(rounds):  # alternate, and keep the fastest of each, to shed machine noise
        for emit in (False, True):
            submit_many(url, key, [{"steps": steps, "emit": emit}])
            worker, transport = trio.run(drive, Chatty(), url, key, 1, work)
            t = next(iter(per_job(worker).values()))
            timings[emit].append(t["predict_finished"] - t["predict_started"])
            cpu[emit].append(_reported_cpu(transport.bodies[-1]))
            sent[emit] = len(transport.bodies)
    base, chatty = min(timings[False]), min(timings[True])
    cpu_base, cpu_chatty = min(cpu[False]), min(cpu[True])
    print(
        f"emit_info x{steps:,} in one predict (best of {rounds}): status requests sent: "
        f"{sent[True]} (without: {sent[False]})\n"
        f"  predict wall time {base:.3f} s without, {chatty:.3f} s with "
        f"({(chatty / base - 1) * 100:+.1f}%)\n"
        f"  predict thread CPU time {cpu_base:.3f} s without, {cpu_chatty:.3f} s with "
        f"({(cpu_chatty / cpu_base - 1) * 100:+.1f}%, "
        f"{(cpu_chatty - cpu_base) / steps * 1e6:.2f} us a call)"
    )


def emit_info_call_cost(steps: int) -> None:
    """The cost of one call, best of 5 timeit runs: steadier than differences of long runs."""
    setup = "from sprocket._info import InfoBuffer, info_sink; import sprocket; i = 7\n"
    setup += "sink = info_sink(InfoBuffer()); sink.__enter__()"
    stmt = "sprocket.emit_info({'progress': i / 100000, 'status': 'working'})"
    per_call = min(timeit.repeat(stmt, setup, number=100_000, repeat=5)) / 100_000
    print(
        f"  one emit_info call (timeit, best of 5): {per_call * 1e6:.2f} us, so {steps:,} calls "
        f"add {per_call * steps:.3f} s to a predict"
    )


def _reported_cpu(final_report: bytes) -> float:
    return float(json.loads(final_report)["payload"]["cpu_seconds"])


def rss_kib(pid: int) -> int:
    total = 0
    pids = [pid]
    try:
        for line in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            pids.append(int(line))
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def big_files(url: str, key: str, work: Path, mib: int) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        r = client.post("/v1/storage/upload-request", json={"filename": "big-input.bin"})
        block = os.urandom(1 << 20)

        def body() -> Any:
            for _ in range(mib):
                yield block

        httpx.put(r.json()["upload_url"]["url"], content=body(), timeout=600).raise_for_status()
    env = {"TOGETHER_API_BASE_URL": url, "TOGETHER_API_KEY": key, "SPROCKET_WORK_DIR": str(work)}
    args = python(str(ROOT / "benchmarks" / "io_worker.py"), "--queue", "--port", "0")
    with child(args, work / "io-worker.log", env) as proc:
        proc.wait_for(r" healthy")
        time.sleep(0.5)
        baseline = rss_kib(proc.popen.pid)
        payload = {"input_file": f"{url}/v1/storage/big-input.bin", "out_mib": mib}
        with httpx.Client(base_url=url, headers=headers) as client:
            rid = client.post(
                "/v1/queue/submit", json={"model": "bench-io", "payload": payload}
            ).json()["requestId"]
            peak = baseline
            t0 = time.monotonic()
            while True:
                peak = max(peak, rss_kib(proc.popen.pid))
                job = client.get(
                    "/v1/queue/status", params={"request_id": rid, "model": "bench-io"}
                ).json()
                if job["status"] in ("done", "failed"):
                    break
                time.sleep(0.05)
        print(
            f"{mib} MiB input download + {mib} MiB output upload: job {job['status']} in "
            f"{time.monotonic() - t0:.1f} s; worker RSS {baseline / 1024:.1f} MiB before, "
            f"peak growth {(peak - baseline) / 1024:.1f} MiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100_000)
    opts = parser.parse_args()
    print("# bench_queue_worker: sprocket queue mode against the local queue server")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        serve = python("-m", "sprocket._cli", "queue", "serve", "--port", "0")
        serve += ["--data-dir", str(work / "queue"), "--max-upload-bytes", str(4 << 30)]
        with child(serve, work / "server.log") as server:
            url = server.wait_for(r"listening on (http://\S+)").group(1)
            key = (work / "queue" / "api_key").read_text().strip()
            throughput(url, key, work, opts.jobs)
            emit_info_cost(url, key, work, opts.steps)
            emit_info_call_cost(opts.steps)
            big_files(url, key, work, opts.mib)


if __name__ == "__main__":
    main()
