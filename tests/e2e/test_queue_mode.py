"""Queue mode end to end: real workers against a real local queue server."""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import EXAMPLES, Proc, queue_server, worker

pytestmark = pytest.mark.e2e

KITCHEN_SINK = EXAMPLES / "kitchen_sink.py"
MODEL = "kitchen-sink"


class Queue:
    """A client of the local queue server, speaking its public endpoints."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.key = key
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def env(self, **extra: str) -> dict[str, str]:
        return {"TOGETHER_API_BASE_URL": self.url, "TOGETHER_API_KEY": self.key, **extra}

    def submit(self, payload: dict[str, Any], **fields: Any) -> str:
        r = self.http.post("/v1/queue/submit", json={"model": MODEL, "payload": payload, **fields})
        assert r.status_code == 200, r.text
        return str(r.json()["requestId"])

    def status(self, request_id: str) -> dict[str, Any]:
        r = self.http.get("/v1/queue/status", params={"request_id": request_id, "model": MODEL})
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    def wait_terminal(self, request_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.status(request_id)
            if job["status"] in ("done", "failed", "canceled"):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {request_id} never finished: {self.status(request_id)}")

    def store_file(self, name: str, data: bytes) -> str:
        """Upload through the storage endpoints; return the file's authenticated URL."""
        r = self.http.post("/v1/storage/upload-request", json={"filename": name})
        put = httpx.put(r.json()["upload_url"]["url"], content=data)
        assert put.status_code < 300, put.text
        return f"{self.url}/v1/storage/{name}"


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    with queue_server(tmp_path / "queue") as server:
        q = Queue(server.url, server.key())
        yield q
        q.http.close()


def _start_worker(queue: Queue, tmp_path: Path, name: str, **env: str) -> Iterator[Proc]:
    workdir = tmp_path / name
    workdir.mkdir()
    with worker(KITCHEN_SINK, "--queue", env=queue.env(**env), cwd=workdir) as (proc, _):
        proc.wait_for(r" healthy")
        yield proc


def test_fifty_mixed_jobs_all_done_with_correct_outputs(queue: Queue, tmp_path: Path) -> None:
    data = bytes(range(256)) * 300
    input_url = queue.store_file("input-blob.bin", data)
    expected: dict[str, dict[str, Any]] = {}
    for i in range(50):
        kind = i % 5
        if kind == 0:
            payload: dict[str, Any] = {"text": f"job {i}"}
            want: dict[str, Any] = {"text": f"JOB {i}"}
        elif kind == 1:
            payload, want = {"progress": 3, "text": "p"}, {"text": "P"}
        elif kind == 2:
            payload, want = {"file_bytes": 1000 + i}, {"file_size": 1000 + i}
        elif kind == 3:
            payload = {"input_file": input_url}
            want = {"input_size": len(data), "input_sha256": hashlib.sha256(data).hexdigest()}
        else:
            payload, want = {"fail": f"planned {i}"}, {"error": f"RuntimeError: planned {i}"}
        expected[queue.submit(payload)] = want
    gen = _start_worker(queue, tmp_path, "w1")
    next(gen)
    try:
        for rid, want in expected.items():
            job = queue.wait_terminal(rid)
            if "error" in want:
                assert job["status"] == "failed"
                assert job["info"]["error"] == want["error"]
            elif "file_size" in want:
                assert job["status"] == "done", job
                blob = queue.http.get(job["outputs"]["file"]).content
                assert len(blob) == want["file_size"]
            else:
                assert job["status"] == "done", job
                assert job["outputs"] == want
        assert not any((tmp_path / "w1" / "inputs").glob("*/*"))  # inputs removed after jobs
    finally:
        gen.close()


def test_progress_is_visible_while_the_job_runs(queue: Queue, tmp_path: Path) -> None:
    gen = _start_worker(queue, tmp_path, "w1", SPROCKET_INFO_FLUSH_SECONDS="0.1")
    next(gen)
    try:
        rid = queue.submit({"progress": 10, "sleep": 3})
        seen: set[float] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = queue.status(rid)
            if job["status"] == "running" and "progress" in job.get("info", {}):
                seen.add(job["info"]["progress"])
            if job["status"] == "done":
                break
            time.sleep(0.05)
        assert len([p for p in seen if p < 1.0]) >= 2, seen
        assert queue.status(rid)["info"]["progress"] == 1.0
    finally:
        gen.close()


def test_file_output_downloads_with_the_same_bytes(queue: Queue, tmp_path: Path) -> None:
    gen = _start_worker(queue, tmp_path, "w1")
    next(gen)
    try:
        job = queue.wait_terminal(queue.submit({"file_bytes": 2_500_000}))
        assert job["status"] == "done"
        blob = queue.http.get(job["outputs"]["file"]).content
        expected = (bytes(range(256)) * 4096 * 3)[:2_500_000]
        assert hashlib.sha256(blob).hexdigest() == hashlib.sha256(expected).hexdigest()
    finally:
        gen.close()


def test_sigterm_mid_job_reports_done_runs_shutdown_exits_zero(
    queue: Queue, tmp_path: Path
) -> None:
    marker = tmp_path / "shutdown.txt"
    gen = _start_worker(queue, tmp_path, "w1", KITCHEN_SINK_SHUTDOWN_MARKER=str(marker))
    proc = next(gen)
    try:
        rid = queue.submit({"sleep": 2, "text": "last"})
        proc.wait_for(rf"predict_started request_id={rid}")
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
        job = queue.status(rid)
        assert job["status"] == "done" and job["outputs"] == {"text": "LAST"}
        assert marker.read_text().count("shutdown") == 1
        log = proc.output()
        assert log.index(f"reported request_id={rid}") < log.index("shutdown_started")
        assert log.count("claimed request_id") == 1  # nothing claimed after SIGTERM
    finally:
        gen.close()


def test_kill_9_mid_job_the_other_worker_completes_it(queue: Queue, tmp_path: Path) -> None:
    env = {"SPROCKET_CLAIM_TIMEOUT_SECONDS": "3"}
    first = _start_worker(queue, tmp_path, "w1", **env)
    a = next(first)
    second = None
    try:
        rid = queue.submit({"sleep": 1.5, "text": "survivor"})
        a.wait_for(rf"predict_started request_id={rid}")
        second = _start_worker(queue, tmp_path, "w2", **env)
        b = next(second)
        a.kill_group()  # kill -9 mid-job
        job = queue.wait_terminal(rid)
        assert job["status"] == "done" and job["outputs"] == {"text": "SURVIVOR"}
        assert job["retries"] == 1
        b.wait_for(rf"reported request_id={rid} status=done")
    finally:
        first.close()
        if second is not None:
            second.close()
