"""End to end: ``python examples/torchrun_sink.py`` with WORLD_SIZE=2 through the real runtime.

HTTP mode and queue mode against the local queue server (also the storage that FileOutputs are
uploaded to). Every test checks that no process of the worker's tree is left afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import QueueServer, queue_server

from .workers import API_KEY, JOB_TIMEOUT, Worker

pytestmark = pytest.mark.e2e

MODEL = "torchrun-sink"
GONE_TIMEOUT = 15.0  # "within a few seconds", as a failure guard


@pytest.fixture(name="queue_server")
def queue_server_fixture(tmp_path: Path) -> Iterator[QueueServer]:
    with queue_server(tmp_path / "queue", api_key=API_KEY) as server:
        yield server


@pytest.fixture
def make_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    made: list[Worker] = []

    def make(queue: bool = False, **env: str) -> Worker:
        home = tmp_path / f"worker{len(made)}"
        home.mkdir()
        worker = Worker(home, queue=queue, env=env)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.cleanup()


def assert_tree_gone(worker: Worker) -> None:
    left = worker.tree.wait_gone(GONE_TIMEOUT)
    assert not left, f"processes outlived the worker: {left}\n{worker.log()}"
    assert len(worker.tree.members) >= 4  # worker, torchrun, two ranks


def wait_inflight(worker: Worker) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if "requests_inflight 1.0" in client.get(worker.url + "/metrics").text:
                return
            time.sleep(0.05)
    raise AssertionError("the job never started")


def fetch(server: QueueServer, url: str) -> bytes:
    with server.client() as client:
        response = client.get(url)
        response.raise_for_status()
        return response.content


# -- HTTP mode ----------------------------------------------------------------------------------


def test_http_jobs_then_sigterm_during_a_job(
    make_worker: Callable[..., Worker], queue_server: QueueServer, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    worker = make_worker(
        TORCHRUN_SINK_MARKER_DIR=str(markers), SPROCKET_LOG_LEVEL="DEBUG",
        **queue_server.worker_env(),
    ).start()  # fmt: skip
    worker.wait_healthy()

    response = worker.generate({})
    assert response.status_code == 200 and response.json() == {"world_size": 2, "sum": 3}

    response = worker.generate({"file_bytes": 5000})
    assert response.status_code == 200, response.text
    assert len(fetch(queue_server, response.json()["file"])) == 5000

    response = worker.generate({"fail_rank": 1})
    assert response.status_code == 500
    assert (
        response.json()["error"]
        == "RankError: rank 1 raised RuntimeError: rank 1 was asked to fail"
    )
    response = worker.generate({})
    assert response.status_code == 200 and response.json()["sum"] == 3

    results: list[httpx.Response] = []
    job = threading.Thread(
        target=lambda: results.append(worker.generate({"sleep": 2, "progress": 4}))
    )
    job.start()
    wait_inflight(worker)
    worker.signal(signal.SIGTERM)
    job.join(JOB_TIMEOUT)
    assert results and results[0].status_code == 200 and results[0].json()["sum"] == 3
    assert worker.wait() == 0
    assert sorted(os.listdir(markers)) == ["shutdown-0", "shutdown-1"]
    assert "'progress': 1.0" in worker.log()  # rank 0's emit_info reached the job's info
    assert_tree_gone(worker)


def test_http_rank_crash_fails_job_and_worker(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker().start()
    worker.wait_healthy()
    response = worker.generate({"crash_rank": 1})
    assert response.status_code == 500
    error = response.json()["error"]
    assert re.fullmatch(r"RankExited: rank 1 \(pid \d+\) exited with status 3 during a job", error)
    assert worker.wait() != 0
    assert_tree_gone(worker)


def test_rank_setup_failure_fails_start_up(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(TORCHRUN_SINK_FAIL_SETUP_RANK="1").start()
    assert worker.proc is not None
    while worker.proc.poll() is None:  # record the tree while it exists
        worker.snapshot()
        time.sleep(0.05)
    assert worker.proc.returncode != 0
    assert "rank 1 raised ValueError: rank 1 could not load its weights" in worker.log()
    assert_tree_gone(worker)


def test_sigkill_of_the_worker_takes_every_rank_down(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker().start()
    worker.wait_healthy()
    worker.signal(signal.SIGKILL)
    assert worker.wait() == -signal.SIGKILL
    assert_tree_gone(worker)


# -- queue mode ---------------------------------------------------------------------------------


def submit(server: QueueServer, payload: dict[str, Any]) -> str:
    with server.client() as client:
        response = client.post("/v1/queue/submit", json={"model": MODEL, "payload": payload})
        response.raise_for_status()
        request_id: str = response.json()["requestId"]
        return request_id


def status(server: QueueServer, request_id: str) -> dict[str, Any]:
    with server.client() as client:
        response = client.get("/v1/queue/status", params={"request_id": request_id, "model": MODEL})
        response.raise_for_status()
        job: dict[str, Any] = response.json()
        return job


def wait_status(
    server: QueueServer, request_id: str, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        job = status(server, request_id)
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {request_id} never got there: {job}")


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("done", "failed", "canceled")


def test_queue_jobs_then_sigterm_during_a_job(
    make_worker: Callable[..., Worker], queue_server: QueueServer, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    worker = make_worker(
        queue=True, TORCHRUN_SINK_MARKER_DIR=str(markers), SPROCKET_INFO_FLUSH_SECONDS="0.1",
        **queue_server.worker_env(),
    ).start()  # fmt: skip
    worker.wait_healthy()

    job = wait_status(queue_server, submit(queue_server, {}), finished)
    assert job["status"] == "done" and job["outputs"] == {"world_size": 2, "sum": 3}

    # Progress is visible while the job runs, and merged into the final info.
    rid = submit(queue_server, {"sleep": 3, "progress": 6})
    wait_status(queue_server, rid, lambda j: bool((j.get("info") or {}).get("progress")))
    job = wait_status(queue_server, rid, finished)
    assert job["status"] == "done" and job["info"]["progress"] == 1.0

    job = wait_status(queue_server, submit(queue_server, {"file_bytes": 4096}), finished)
    assert job["status"] == "done", job
    assert len(fetch(queue_server, job["outputs"]["file"])) == 4096

    job = wait_status(queue_server, submit(queue_server, {"fail_rank": 1}), finished)
    assert job["status"] == "failed"
    assert "rank 1 raised RuntimeError: rank 1 was asked to fail" in job["info"]["error"]
    job = wait_status(queue_server, submit(queue_server, {}), finished)
    assert job["status"] == "done"  # the worker stayed healthy

    rid = submit(queue_server, {"sleep": 2})
    wait_status(queue_server, rid, lambda j: j["status"] == "running")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    job = status(queue_server, rid)
    assert job["status"] == "done" and job["outputs"]["sum"] == 3
    assert sorted(os.listdir(markers)) == ["shutdown-0", "shutdown-1"]
    assert_tree_gone(worker)


def test_queue_rank_crash_is_reported_and_worker_exits(
    make_worker: Callable[..., Worker], queue_server: QueueServer
) -> None:
    worker = make_worker(queue=True, **queue_server.worker_env()).start()
    worker.wait_healthy()
    rid = submit(queue_server, {"crash_rank": 1})
    assert worker.wait() != 0
    job = status(queue_server, rid)
    assert job["status"] == "failed", job
    assert re.search(r"rank 1 \(pid \d+\) exited with status 3 during a job", job["info"]["error"])
    assert_tree_gone(worker)
