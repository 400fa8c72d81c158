"""`make demo`: the kitchen sink worker end to end, in HTTP mode and against the local queue.

Unattended and self-cleaning: every process it starts is stopped (by pid) before it exits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
KITCHEN_SINK = HERE / "kitchen_sink.py"
SPROCKET = [sys.executable, "-m", "sprocket._cli"]


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


class Child:
    """A child process with its output in a file, so the demo can show and parse it."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                args, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"{self.name}: {pattern!r} never appeared:\n{self.text()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@contextmanager
def started(name: str, args: list[str], env: dict[str, str], workdir: Path) -> Iterator[Child]:
    child = Child(name, args, env, workdir)
    try:
        yield child
    finally:
        child.stop()


def show_log(child: Child, *events: str) -> None:
    for line in child.text().splitlines():
        if any(f" {event}" in line for event in events):
            print("   ", line.split(" ", 2)[-1])


def wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit("the worker never turned healthy")


def http_mode(workdir: Path, env: dict[str, str]) -> None:
    say("HTTP mode: examples/kitchen_sink.py serving /generate")
    args = [sys.executable, str(KITCHEN_SINK), "--host", "127.0.0.1", "--port", "0"]
    with started("http-worker", args, env, workdir) as worker:
        url = worker.wait_for(r"http_listening addresses=(\S+)").group(1)
        wait_healthy(url)
        for body in ({"text": "hello sprocket"}, {"spin": 0.2, "text": "busy"}, {"fail": "oops"}):
            answer = httpx.post(f"{url}/generate", json=body, timeout=30)
            print(f"   POST /generate {json.dumps(body)} -> {answer.status_code} {answer.text}")
        say("SIGTERM during a 2-second predict: the answer is still delivered")
        result: dict[str, httpx.Response] = {}
        predicts_before = worker.text().count("predict_started")
        request = threading.Thread(
            target=lambda: result.setdefault(
                "r", httpx.post(f"{url}/generate", json={"sleep": 2, "text": "drain"}, timeout=30)
            )
        )
        request.start()
        while worker.text().count("predict_started") == predicts_before:
            time.sleep(0.02)
        worker.popen.send_signal(signal.SIGTERM)
        print(f"   /health right after SIGTERM: {httpx.get(f'{url}/health').status_code}")
        request.join()
        print(f"   in-flight answer: {result['r'].status_code} {result['r'].text}")
        print(f"   worker exit status: {worker.popen.wait(30)}")
        show_log(worker, "signal", "job_finished", "shutdown_started", "exited")


def queue_mode(workdir: Path, env: dict[str, str]) -> None:
    say("Queue mode: the local queue server and a --queue worker")
    serve = [*SPROCKET, "queue", "serve", "--port", "0", "--data-dir", str(workdir / "queue")]
    with started("queue-server", serve, env, workdir) as server:
        base = server.wait_for(r"listening on (http://\S+)").group(1)
        key = (workdir / "queue" / "api_key").read_text().strip()
        qenv = {**env, "TOGETHER_API_BASE_URL": base, "TOGETHER_API_KEY": key}
        print(f"   queue server at {base}")
        worker_args = [sys.executable, str(KITCHEN_SINK), "--queue", "--host", "127.0.0.1"]
        with started("queue-worker", [*worker_args, "--port", "0"], qenv, workdir) as worker:
            worker.wait_for(r" healthy")

            def submit(payload: dict[str, object], *extra: str) -> str:
                cmd = [*SPROCKET, "queue", "submit", "--model", "kitchen-sink"]
                cmd += ["--payload", json.dumps(payload), *extra]
                shown = " ".join([f"--payload '{json.dumps(payload)}'", *extra])
                print(f"   $ sprocket queue submit {shown}")
                done = subprocess.run(cmd, env=qenv, stdout=subprocess.PIPE, text=True, check=True)
                return done.stdout

            say("A text job")
            print(submit({"text": "hello queue"}, "--wait"))
            say("A job with progress (a live bar on a terminal)")
            print(submit({"progress": 20, "sleep": 2}, "--wait"))
            say("A job that returns a file; then the file is downloaded")
            outputs = json.loads(submit({"file_bytes": 3_000_000}, "--wait"))
            blob = httpx.get(outputs["file"], headers={"Authorization": f"Bearer {key}"}).content
            print(
                f"   downloaded {len(blob)} bytes, sha256 {hashlib.sha256(blob).hexdigest()[:16]}…"
            )

            say("SIGTERM while a 3-second job runs: it finishes and is reported first")
            rid = submit({"sleep": 3, "text": "last job"}).split()[-1]
            worker.wait_for(rf"predict_started request_id={rid}")
            worker.popen.send_signal(signal.SIGTERM)
            print(f"   worker exit status: {worker.popen.wait(60)}")
            show_log(worker, "signal", "reported", "shutdown_started", "exited")
            status = httpx.get(
                f"{base}/v1/queue/status",
                params={"request_id": rid, "model": "kitchen-sink"},
                headers={"Authorization": f"Bearer {key}"},
            ).json()
            print(f"   job {rid}: {status['status']} {json.dumps(status.get('outputs'))}")
        server.popen.send_signal(signal.SIGTERM)
        server.popen.wait(30)


def main() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="sprocket-demo-") as tmp:
        started_at = time.monotonic()
        http_mode(Path(tmp), env)
        queue_mode(Path(tmp), env)
        say(f"Demo finished in {time.monotonic() - started_at:.1f} s")


if __name__ == "__main__":
    main()
