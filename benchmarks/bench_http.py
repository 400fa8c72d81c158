"""HTTP-mode figures: /health latency under a CPU-bound predict, /generate overhead against the
bare framework, and SIGTERM-to-exit when idle.

Method: each server is a real process on 127.0.0.1; one client with a keep-alive connection
sends requests one after another (httpx, sync). Wall-clock times from the client's side.
"""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx

from _common import ROOT, child, machine, percentile, python, summary_ms

WORKER = str(ROOT / "benchmarks" / "empty_worker.py")
BARE = str(ROOT / "benchmarks" / "bare_quart.py")


def timed_posts(client: httpx.Client, n: int, body: dict[str, object]) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.post("/generate", json=body)
        samples.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
    return samples


def main() -> None:
    print("# bench_http: sprocket HTTP mode")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with child(python(BARE, "0"), work / "bare.log") as bare:
            url = bare.wait_for(r"listening (http://\S+)").group(1)
            with httpx.Client(base_url=url) as client:
                timed_posts(client, 200, {})
                bare_samples = timed_posts(client, 2000, {})
        print(f"bare quart-trio + hypercorn POST round trip: {summary_ms(bare_samples)}")

        args = python(WORKER, "--host", "127.0.0.1", "--port", "0")
        with child(args, work / "worker.log") as worker:
            url = worker.wait_for(r"http_listening addresses=(\S+)").group(1)
            worker.wait_for(r" healthy")
            with httpx.Client(base_url=url, timeout=60) as client:
                timed_posts(client, 200, {})
                samples = timed_posts(client, 2000, {})
                print(f"sprocket /generate, empty predict: {summary_ms(samples)}")
                extra = percentile(samples, 50) - percentile(bare_samples, 50)
                print(f"  sprocket's own share at p50: {extra * 1000:.3f} ms")

                spin = threading.Thread(
                    target=lambda: httpx.post(f"{url}/generate", json={"spin": 10}, timeout=60)
                )
                spin.start()
                time.sleep(0.5)
                health = []
                while spin.is_alive() and len(health) < 5000:
                    t0 = time.perf_counter()
                    assert client.get("/health").status_code == 200
                    health.append(time.perf_counter() - t0)
                    time.sleep(0.01)
                spin.join()
                print(f"/health during a 10 s CPU-bound predict: {summary_ms(health)}")

            worker.popen.send_signal(signal.SIGTERM)
            t0 = time.perf_counter()
            worker.popen.wait(30)
            first = time.perf_counter() - t0
        exits = [first]
        for _ in range(4):
            with child(args, work / "worker2.log") as again:
                again.wait_for(r" healthy")
                again.popen.send_signal(signal.SIGTERM)
                t0 = time.perf_counter()
                again.popen.wait(30)
                exits.append(time.perf_counter() - t0)
        print(f"SIGTERM to exit when idle: {summary_ms(exits)}")


if __name__ == "__main__":
    main()
