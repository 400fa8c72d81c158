"""Queue mode under faults (issue 4), with the public kit: the real runtime, a fake queue with
injected faults, Trio's autojump clock. Every test ends with the shutdown contract checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from sprocket.testing import FakeQueue, State, WorkerHandle, run_worker

from .probe import Probe

FILE_URL = "https://files.test/input.bin"


def assert_nothing_lost(queue: FakeQueue, *, allow_running: bool = False) -> None:
    """0 jobs lost, 0 duplicate terminal reports: each job is pending (never handed out, or
    back in the queue) or terminal with exactly one accepted report (or canceled)."""
    for job in queue.jobs():
        reports = queue.terminal_reports(job.request_id)
        assert len(reports) <= 1, f"{job.request_id}: {len(reports)} terminal reports"
        if job.status in ("done", "failed") and "claim expired" not in str(job.info):
            assert len(reports) == 1, f"{job.request_id} is {job.status} without a report"
        elif job.status == "running":
            assert allow_running, f"{job.request_id} left running by a worker that exited"


def assert_drained(w: WorkerHandle, probe: Probe, *, code: int = 0) -> None:
    """The drain contract: exit status, 0 claims after SIGTERM, every claimed job reported
    before shutdown(), shutdown() exactly once."""
    assert w.exit_code == code
    assert w.requests_after_sigterm("claim") == [], "claimed after SIGTERM"
    assert w.shutdown_calls == 1 and probe.shutdowns == 1
    names = w.names()
    for claimed in w.find("claimed"):
        rid = claimed.fields["request_id"]
        # A job canceled while it ran gets no report; any other claimed job exactly one.
        expected = 0 if w.queue.job(rid).status == "canceled" else 1
        assert len(w.queue.terminal_reports(rid)) == expected
        assert names.index("reported") < names.index("shutdown_started")
    assert names[-1] == "exited"
    assert_nothing_lost(w.queue)


def report_of(queue: FakeQueue, rid: str) -> dict[str, Any]:
    (report,) = queue.terminal_reports(rid)
    assert isinstance(report.json, dict)
    return report.json


# -- SIGTERM at each phase --------------------------------------------------------------------


async def test_sigterm_while_waiting_for_a_claim(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    async with run_worker(probe, queue=fake_queue) as w:
        await trio.sleep(12)  # an empty queue: the worker is in its third long-poll
        in_flight = fake_queue.claims()[-1]
        assert in_flight.status is None
        sent = trio.current_time()
        w.sigterm()
        assert await w.wait_exit() == 0
        assert trio.current_time() == sent  # the long-poll was cancelled at once
    assert in_flight.error == "cancelled"
    assert_drained(w, probe)


async def test_sigterm_while_a_claim_is_on_its_way_to_the_server(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"x": 1})
    fake_queue.delay("claim", 3.0)  # the claim has not reached the server yet
    async with run_worker(probe, queue=fake_queue) as w:
        await trio.sleep(1)
        w.sigterm()
        await w.wait_exit()
    assert probe.predicted == []
    assert fake_queue.statuses(rid) == ["pending"]  # never handed out, still there
    assert_drained(w, probe)


async def test_sigterm_while_the_claim_answer_arrives_processes_the_job(
    fake_queue: FakeQueue,
    autojump_clock: MockClock,
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"x": 1})
    # The server handed the job out; its answer's body trickles in for several seconds.
    fake_queue.throttle("claim", bytes_per_second=40, times=1)
    async with run_worker(probe, queue=fake_queue) as w:
        await fake_queue.wait_until(lambda: fake_queue.claims()[0].applied)
        await trio.sleep(1)
        assert w.find("claimed") == []
        w.sigterm()
        await w.wait_exit()
    assert w.find("claimed")[0].fields["request_id"] == rid
    assert report_of(fake_queue, rid)["status"] == "done"
    assert_drained(w, probe)


async def test_claim_answer_lost_after_the_server_applied_it_is_requeued_by_the_lease(
    fake_queue: FakeQueue,
    autojump_clock: MockClock,
) -> None:
    # A hand-out whose answer never reached the worker cannot be processed by it; the lease
    # brings the job back (retries=1), so it is not lost either.
    probe = Probe()
    rid = await fake_queue.submit({"x": 1})
    fake_queue.delay("claim", 5.0, after_apply=True, times=1)
    async with run_worker(probe, queue=fake_queue, claim_timeout=30) as w:
        await trio.sleep(1)
        w.sigterm()
        await w.wait_exit()
    await trio.sleep(40)
    assert fake_queue.statuses(rid) == ["pending", "running", "pending"]
    assert fake_queue.history(rid)[-1].time == pytest.approx(30)
    assert (await fake_queue.status(rid))["retries"] == 1
    assert_drained(w, probe)


async def test_sigterm_during_download_finishes_the_job(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    fake_queue.serve_file(FILE_URL, b"i" * 5000, bytes_per_second=500)  # 10 s
    rid = await fake_queue.submit({"in_file": FILE_URL})
    async with run_worker(probe, queue=fake_queue) as w:
        await fake_queue.wait_until(lambda: bool(fake_queue.requests_to("file")))
        await trio.sleep(3)
        assert "downloaded" not in w.names()
        w.sigterm()
        await w.wait_exit()
    report = report_of(fake_queue, rid)
    assert report["status"] == "done" and report["payload"]["in_file"]["bytes"] == 5000
    names = w.names()
    assert names.index("signal") < names.index("downloaded") < names.index("reported")
    assert_drained(w, probe)


async def test_sigterm_during_predict_reports_before_shutdown(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"sleep": 100, "x": 7})
    async with run_worker(probe, queue=fake_queue) as w:
        started = (await w.wait_event("predict_started")).time
        await trio.sleep(40)
        w.sigterm()
        w.sigterm()  # a second SIGTERM changes nothing
        assert w.state is State.DRAINING
        assert await w.wait_exit() == 0
    assert report_of(fake_queue, rid)["payload"] == {"ok": True, "x": 7}
    assert w.time_of("predict_finished") == started + 100
    assert w.names(request_id=rid)[-2:] == ["job_finished", "reported"]
    order = ["signal", "predict_finished", "reported", "shutdown_started", "exited"]
    names = w.names()
    assert sorted(order, key=names.index) == order  # first occurrences, in this order
    assert_drained(w, probe)


async def test_sigterm_during_finalize(fake_queue: FakeQueue, autojump_clock: MockClock) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"finalize_sleep": 20})
    async with run_worker(probe, queue=fake_queue) as w:
        await w.wait_event("predict_finished")
        await trio.sleep(5)
        w.sigterm()
        await w.wait_exit()
    assert report_of(fake_queue, rid)["status"] == "done"
    assert w.time_of("reported") - w.time_of("predict_finished") == pytest.approx(20)
    assert_drained(w, probe)


async def test_sigterm_during_upload_finishes_the_upload(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    fake_queue.throttle("upload", bytes_per_second=1000)
    rid = await fake_queue.submit({"file_bytes": 30_000})  # 30 s of upload
    async with run_worker(probe, queue=fake_queue) as w:
        await fake_queue.wait_until(lambda: bool(fake_queue.requests_to("upload")))
        await trio.sleep(10)
        w.sigterm()
        await w.wait_exit()
    url = report_of(fake_queue, rid)["payload"]["file"]
    assert fake_queue.stored_file(url) == b"\x07" * 30_000
    names = w.names()
    assert names.index("signal") < names.index("uploaded") < names.index("reported")
    assert fake_queue.requests_to("upload")[0].authorization is None
    assert_drained(w, probe)


async def test_sigterm_while_the_report_is_retried(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"x": 1})
    failing = fake_queue.fail("update", 503, times=4, when=lambda r: r.update_status == "done")
    async with run_worker(probe, queue=fake_queue) as w:
        await failing.wait_hit(1)
        w.sigterm()
        await w.wait_exit()
    assert failing.hits == 4
    assert len(fake_queue.updates(rid, status="done")) == 5
    assert report_of(fake_queue, rid)["status"] == "done"
    assert w.worker.metrics.report_retries._value.get() == 4
    assert_drained(w, probe)


async def test_second_sigterm_during_shutdown_changes_nothing(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe(shutdown_seconds=30)
    rid = await fake_queue.submit({"x": 1})
    async with run_worker(probe, queue=fake_queue) as w:
        await fake_queue.wait_status(rid, "done")
        w.sigterm()
        await w.wait_event("shutdown_started")
        await trio.sleep(10)
        w.sigterm()
        await w.wait_exit()
    assert w.time_of("shutdown_finished") - w.time_of("shutdown_started") == pytest.approx(30)
    assert [e.fields["drain_started"] for e in w.find("signal")] == [True, False]
    assert_drained(w, probe)


# -- leases and heartbeats --------------------------------------------------------------------


async def test_six_hour_predict_keeps_its_lease(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    six_hours = 6 * 3600
    rid = await fake_queue.submit({"sleep": six_hours, "progress": 360})
    async with run_worker(probe, queue=fake_queue, claim_timeout=90, grace_period=7 * 3600) as w:
        await fake_queue.wait_status(rid, "done")
    assert fake_queue.statuses(rid) == ["pending", "running", "done"]
    history = fake_queue.history(rid)
    assert history[2].time - history[1].time == pytest.approx(six_hours)
    assert fake_queue.max_renewal_gap(rid) <= 30 + 1e-9  # a third of the claim timeout
    assert (await fake_queue.status(rid))["info"]["progress"] == 1.0
    # emit_info is batched: far fewer updates than one per call, far more than none.
    assert len(fake_queue.updates(rid, status="running")) < 1000
    assert_drained(w, probe)


async def test_lease_survives_30_percent_of_updates_failing_after_10_s(
    fake_queue: FakeQueue,
    autojump_clock: MockClock,
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"sleep": 6 * 3600, "progress": 600})
    flaky = fake_queue.fail(
        "update", 503, probability=0.3, start=10, when=lambda r: r.update_status == "running"
    )
    async with run_worker(probe, queue=fake_queue, claim_timeout=90, grace_period=7 * 3600) as w:
        await fake_queue.wait_status(rid, "done")
    assert flaky.hits > 50
    assert fake_queue.statuses(rid) == ["pending", "running", "done"]
    assert fake_queue.max_renewal_gap(rid) < 90
    assert w.find("claim_lost") == []
    assert_drained(w, probe)


async def test_report_retries_until_acknowledged(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"x": 1})
    fake_queue.fail("update", 500, times=2, when=lambda r: r.update_status == "done")
    fake_queue.disconnect("update", times=1, when=lambda r: r.update_status == "done")
    async with run_worker(probe, queue=fake_queue) as w:
        await fake_queue.wait_status(rid, "done")
        assert probe.finished and len(fake_queue.updates(rid, status="done")) == 4
    assert_drained(w, probe)


async def test_report_whose_answer_was_lost_is_not_sent_twice(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"x": 1})
    fake_queue.drop_response("update", times=1, when=lambda r: r.update_status == "done")
    second = await fake_queue.submit({"x": 2})
    async with run_worker(probe, queue=fake_queue) as w:
        await fake_queue.wait_status(second, "done")
    attempts = fake_queue.updates(rid, status="done")
    assert [a.status for a in attempts] == [200, 409]  # the retry learns it already landed
    assert len(fake_queue.terminal_reports(rid)) == 1
    assert_drained(w, probe)


async def test_expired_claim_409_discards_the_result_and_the_job_runs_again(
    fake_queue: FakeQueue,
    autojump_clock: MockClock,
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"sleep": 100, "x": 1})
    # Every heartbeat fails for 60 s: the 30 s lease lapses, the job goes back to the queue.
    fake_queue.fail("update", 503, duration=60, when=lambda r: r.update_status == "running")
    async with run_worker(probe, queue=fake_queue, claim_timeout=30) as w:
        await w.wait_event("claimed", count=2)
        await fake_queue.wait_status(rid, "done")
    lost = w.find("claim_lost")
    assert len(lost) == 1 and lost[0].time >= 60
    assert "job_abandoned" in w.names()
    assert len(probe.predicted) == 2  # the first run finished; its result was discarded
    statuses = fake_queue.statuses(rid)
    assert statuses == ["pending", "running", "pending", "running", "done"]
    assert fake_queue.history(rid)[2].time == pytest.approx(30)
    first_claim = fake_queue.requests_to("claim", request_id=rid)[0].response_json["data"]
    (report,) = fake_queue.terminal_reports(rid)
    assert report.json["claim_id"] != first_claim["claim_id"]
    assert_drained(w, probe)


async def test_job_canceled_while_running_is_not_reported(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"gate": "g", "x": 1})
    after = await fake_queue.submit({"x": 2})
    gate = probe.gate("g")
    async with run_worker(probe, queue=fake_queue, claim_timeout=30) as w:
        await w.wait_event("predict_started")
        assert await fake_queue.cancel(rid, running=True) == "canceled"
        await w.wait_event("claim_lost")  # the next heartbeat hears 409
        await trio.sleep(5)
        assert probe.finished == []  # a sync predict is left to finish...
        gate.open()
        await fake_queue.wait_status(after, "done")  # ...and the worker carries on
    assert probe.finished[0]["x"] == 1  # it did finish; its result was discarded
    assert [u.update_status for u in fake_queue.updates(rid)] == ["running"] * len(
        fake_queue.updates(rid)
    )
    assert fake_queue.statuses(rid) == ["pending", "running", "canceled"]
    assert_drained(w, probe)


# -- deadlines --------------------------------------------------------------------------------


async def test_grace_overrun_is_reported_failed_before_exit(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"sleep": 10_000})
    async with run_worker(probe, queue=fake_queue, grace_period=300) as w:
        await w.wait_event("predict_started")
        # Early: the drain deadline (not the 299 s prediction timeout) must cut the job.
        await trio.sleep(5)
        w.sigterm()
        await w.wait_exit()
    sigterm = w.sigterm_at
    assert sigterm is not None
    report = report_of(fake_queue, rid)
    assert report["status"] == "failed"
    assert "shutdown deadline" in report["info"]["error"]
    reported = w.time_of("reported")
    assert reported == pytest.approx(sigterm + 300 - w.worker.settings.report_reserve)
    assert w.time_of("exited") <= sigterm + 300
    assert w.names().index("reported") < w.names().index("shutdown_started")
    assert_drained(w, probe)


async def test_requeue_on_shutdown_leaves_the_job(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"sleep": 10_000})
    async with run_worker(
        probe, queue=fake_queue, grace_period=300, claim_timeout=90, requeue_on_shutdown=True
    ) as w:
        await w.wait_event("predict_started")
        w.sigterm()
        await w.wait_exit()
    assert "job_left_for_requeue" in w.names()
    assert fake_queue.terminal_reports(rid) == []
    await fake_queue.wait_status(rid, "pending")
    history = fake_queue.history(rid)
    assert history[-1].reason == "lease expired" and history[-1].retries == 1
    assert w.shutdown_calls == 1 and w.exit_code == 0


async def test_prediction_timeout_outside_a_drain_fails_and_exits_1(
    fake_queue: FakeQueue,
    autojump_clock: MockClock,
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"sleep": 5_000})
    waiting = await fake_queue.submit({"x": 2})
    async with run_worker(probe, queue=fake_queue, grace_period=300) as w:
        assert await w.wait_exit() == 1
    report = report_of(fake_queue, rid)
    assert report["info"]["error"].startswith("PredictionTimeout")
    assert w.time_of("reported") - w.time_of("predict_started") == pytest.approx(299)
    assert w.state is State.UNHEALTHY
    assert probe.shutdowns == 0
    assert fake_queue.statuses(waiting) == ["pending"]  # not claimed by a dying worker
    assert_nothing_lost(fake_queue)


# -- payloads and files -----------------------------------------------------------------------


async def test_bad_payload_fails_and_the_worker_carries_on(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    bad = await fake_queue.submit([1, 2, 3])
    good = await fake_queue.submit({"x": 1})
    async with run_worker(probe, queue=fake_queue) as w:
        await fake_queue.wait_status(good, "done")
        assert w.healthy
    assert report_of(fake_queue, bad)["info"]["error"].startswith("PayloadError")
    assert_drained(w, probe)


async def _run_one(queue: FakeQueue, payload: dict[str, Any], **options: Any) -> dict[str, Any]:
    """Run one job then a plain one (the worker must stay healthy); return the first report."""
    probe = Probe()
    rid = await queue.submit(payload)
    after = await queue.submit({"x": "after"})
    async with run_worker(probe, queue=queue, **options) as w:
        await queue.wait_status(after, "done", "failed")
        assert w.healthy
    assert report_of(queue, after)["status"] == "done"
    assert_drained(w, probe)
    return report_of(queue, rid)


async def test_download_404_fails_the_job(fake_queue: FakeQueue, autojump_clock: MockClock) -> None:
    fake_queue.add_host("files.test")
    report = await _run_one(fake_queue, {"in_a": "https://files.test/missing.bin"})
    assert report["status"] == "failed"
    assert "404" in report["info"]["error"] and "in_a" in report["info"]["error"]


@pytest.mark.parametrize("declared", [True, False])
async def test_oversized_download_is_cut_at_the_limit(
    fake_queue: FakeQueue, autojump_clock: MockClock, declared: bool
) -> None:
    fake_queue.serve_file(FILE_URL, b"z" * 300_000, declare_length=declared)
    report = await _run_one(fake_queue, {"in_a": FILE_URL}, max_download_bytes=100_000)
    assert report["status"] == "failed"
    assert "SPROCKET_MAX_DOWNLOAD_BYTES" in report["info"]["error"]


async def test_redirect_to_link_local_is_refused(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    fake_queue.redirect(FILE_URL, "http://169.254.169.254/latest/meta-data/")
    fake_queue.add_host("rebind.test", "169.254.169.254")
    fake_queue.redirect("https://files.test/b", "https://rebind.test/x")
    report = await _run_one(fake_queue, {"in_a": FILE_URL})
    assert "refusing link-local" in report["info"]["error"]
    report2 = await _run_one(fake_queue, {"in_b": "https://files.test/b"})
    assert "refusing link-local" in report2["info"]["error"]
    hosts = {r.host for r in fake_queue.requests}
    assert "169.254.169.254" not in hosts and "rebind.test" not in hosts


async def test_credentials_never_reach_a_foreign_host(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    api = fake_queue.api_base_url
    fake_queue.serve_file("https://files.test/plain.bin", b"p" * 10)
    fake_queue.serve_file("https://evil.test/steal", b"e" * 20)
    fake_queue.redirect(f"{api}/v1/storage/hop", "https://evil.test/steal")
    report = await _run_one(
        fake_queue, {"in_a": "https://files.test/plain.bin", "in_b": f"{api}/v1/storage/hop"}
    )
    assert report["status"] == "done"
    assert report["payload"]["in_b"]["bytes"] == 20
    by_host = {r.host: r for r in fake_queue.requests_to("file")}
    assert by_host["api.test"].authorization == f"Bearer {fake_queue.api_key}"
    assert by_host["files.test"].authorization is None
    assert by_host["evil.test"].authorization is None


@pytest.mark.parametrize(
    "path", ["/../../../../etc/passwd", "/", "/" + "a" * 5000, "/%2e%2e%2f%2e%2e%2fx", "/.hidden"]
)
async def test_hostile_url_paths_stay_inside_inputs(
    fake_queue: FakeQueue, autojump_clock: MockClock, tmp_path: Path, path: str
) -> None:
    url = "https://files.test" + path
    fake_queue.serve_file(url, b"h" * 3)
    report = await _run_one(fake_queue, {"in_a": url}, work_dir=tmp_path)
    assert report["status"] == "done"
    local = Path(report["payload"]["in_a"]["path"]).resolve()
    inputs = (tmp_path / "inputs").resolve()
    assert local.is_relative_to(inputs) and local.parent.parent == inputs
    assert not local.name.startswith(".") and len(local.name) <= 110
