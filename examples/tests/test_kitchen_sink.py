"""The tests a user would write for examples/kitchen_sink.py with sprocket.testing.

They run the real worker runtime in-process against a fake queue, on Trio's autojump clock:
hours of predict take milliseconds, and every time asserted below is exact.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from trio.testing import MockClock

from sprocket.testing import FakeQueue


def _load_example() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "kitchen_sink.py"
    spec = importlib.util.spec_from_file_location("kitchen_sink", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kitchen_sink = _load_example()
Worker = Any  # sprocket_worker(sprocket, **options): an async context manager

# kitchen_sink's predict calls time.sleep: the ``virtual_sleep`` fixture makes that take
# virtual time inside the worker's threads, so the autojump clock can skip it.
pytestmark = pytest.mark.usefixtures("virtual_sleep")


async def test_a_job_is_done_with_the_right_outputs(
    fake_queue: FakeQueue, sprocket_worker: Worker, autojump_clock: MockClock
) -> None:
    data = b"input bytes " * 100
    url = fake_queue.serve_file("https://files.test/in.bin", data)
    rid = await fake_queue.submit({"text": "hello", "file_bytes": 5000, "input_file": url})
    async with sprocket_worker(kitchen_sink.KitchenSink()):
        await fake_queue.wait_status(rid, "done")
    job = await fake_queue.status(rid)
    outputs = job["outputs"]
    assert outputs["text"] == "HELLO"
    assert outputs["input_size"] == len(data)
    assert outputs["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert outputs["file"].startswith(f"{fake_queue.api_base_url}/v1/storage/{rid}-")
    assert fake_queue.stored_file(outputs["file"]) == (bytes(range(256)) * 20)[:5000]


async def test_sigterm_during_predict_finishes_and_reports_before_shutdown(
    fake_queue: FakeQueue,
    sprocket_worker: Worker,
    autojump_clock: MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marker = tmp_path / "shutdown.txt"
    monkeypatch.setenv("KITCHEN_SINK_SHUTDOWN_MARKER", str(marker))
    rid = await fake_queue.submit({"text": "x", "sleep": 60})
    async with sprocket_worker(kitchen_sink.KitchenSink()) as worker:
        started = await worker.wait_event("predict_started")
        await worker.wait_event("claimed")
        worker.sigterm()
        assert await worker.wait_exit() == 0
    assert (await fake_queue.status(rid))["status"] == "done"
    events = ["signal", "predict_finished", "reported", "shutdown_started", "exited"]
    names = worker.names()
    assert sorted(events, key=names.index) == events
    assert worker.time_of("predict_finished") == started.time + 60
    assert worker.requests_after_sigterm("claim") == []  # no new job after SIGTERM
    assert len(marker.read_text().splitlines()) == 1  # shutdown() ran exactly once


async def test_six_hour_predict_keeps_its_lease_while_updates_fail(
    fake_queue: FakeQueue, sprocket_worker: Worker, autojump_clock: MockClock
) -> None:
    six_hours = 6 * 3600
    rid = await fake_queue.submit({"sleep": six_hours, "progress": 360})
    # For the first hour, 30% of status updates fail with 503 (seeded, so reproducible).
    flaky = fake_queue.fail("update", 503, probability=0.3, duration=3600)
    options = {"grace_period": 7 * 3600, "claim_timeout": 90}  # predict may run < grace - 1 s
    async with sprocket_worker(kitchen_sink.KitchenSink(), **options) as worker:
        await fake_queue.wait_status(rid, "done", "failed")
    assert flaky.hits > 10
    assert fake_queue.statuses(rid) == ["pending", "running", "done"]  # never re-queued
    assert fake_queue.max_renewal_gap(rid) < 90
    assert worker.find("claim_lost") == []
    assert (await fake_queue.status(rid))["info"]["progress"] == 1.0


async def test_an_upload_failure_fails_the_job(
    fake_queue: FakeQueue, sprocket_worker: Worker, autojump_clock: MockClock
) -> None:
    fake_queue.fail("upload", 503)  # storage is down for good
    rid = await fake_queue.submit({"file_bytes": 1000})
    ok = await fake_queue.submit({"text": "next"})
    async with sprocket_worker(kitchen_sink.KitchenSink()) as worker:
        await fake_queue.wait_status(ok, "done")
        assert worker.healthy
    job = await fake_queue.status(rid)
    assert job["status"] == "failed"
    assert job["info"]["error"].startswith("UploadError: ")
    assert len(fake_queue.terminal_reports(rid)) == 1


async def test_a_grace_overrun_is_reported_before_exit(
    fake_queue: FakeQueue, sprocket_worker: Worker, autojump_clock: MockClock
) -> None:
    rid = await fake_queue.submit({"sleep": 10_000})
    async with sprocket_worker(kitchen_sink.KitchenSink(), grace_period=300) as worker:
        await worker.wait_event("predict_started")
        worker.sigterm()
        await worker.wait_exit()
    assert worker.sigterm_at is not None
    job = await fake_queue.status(rid)
    assert job["status"] == "failed"
    assert "shutdown deadline" in job["info"]["error"]
    # Reported first (with the report reserve to spare), then shutdown() and exit, all within
    # the grace period.
    names = worker.names()
    assert names.index("reported") < names.index("shutdown_started") < names.index("exited")
    assert worker.time_of("reported") == worker.sigterm_at + 300 - 10  # report reserve: 10 s
    assert worker.time_of("exited") <= worker.sigterm_at + 300
