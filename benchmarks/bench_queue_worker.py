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
    """Busy work in steps of about 50 us, in blocks of ``block`` steps that alternate between
    emitting progress at every step and not emitting at all, timed by the thread's CPU clock.

    Alternating blocks of ~50 ms put both variants under the same machine noise, which long
    back-to-back runs do not (on this VM their CPU times drift by several percent).
    """

    def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        calls, block = int(args["calls"]), int(args["block"])
        spent = {False: 0.0, True: 0.0}
        acc, done = 0, 0
        while done < calls:
            for emit in (False, True):
                t0 = time.thread_time()
                for i in range(block):
                    for j in range(1500):
                        acc += (i * j) % 7
                    if emit:
                        sprocket.emit_info({"progress": done / calls, "status": "working"})
                        done += 1
                spent[emit] += time.thread_time() - t0
        return {"acc": acc, "without": spent[False], "with": spent[True], "calls": done}


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


def emit_info_cost(url: str, key: str, work: Path, calls: int) -> None:
    submit_many(url, key, [{"calls": calls, "block": 1000}])
    worker, transport = trio.run(drive, Chatty(), url, key, 1, work)
    t = next(iter(per_job(worker).values()))
    result = json.loads(transport.bodies[-1])["payload"]
    without, with_, calls = result["without"], result["with"], result["calls"]
    seconds = t["predict_finished"] - t["predict_started"]
    slower = (with_ / without - 1) * 100
    per_call = (with_ - without) / calls * 1e6
    print(
        f"emit_info x{calls:,} in one predict ({seconds:.1f} s): {len(transport.bodies)} status "
        f"requests in all (heartbeats with info, and the report)\n"
        f"  the same work, thread CPU time: {without:.3f} s without emit_info, {with_:.3f} s "
        f"with ({slower:+.1f}%, {per_call:.2f} us a call)"
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
    parser.add_argument("--calls", type=int, default=100_000)
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
            emit_info_cost(url, key, work, opts.calls)
            emit_info_call_cost(opts.calls)
            big_files(url, key, work, opts.mib)


if __name__ == "__main__":
    main()
