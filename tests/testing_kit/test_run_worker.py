"""run_worker and the plugin's fixtures: the real runtime in-process, exact virtual time."""

from __future__ import annotations

import threading
import time
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
import trio
from trio.testing import MockClock

import sprocket
from sprocket import testing
from sprocket.testing import FakeQueue, State, WorkerHandle, run_worker

from .probe import Probe

Factory = Any  # sprocket_worker(sprocket, **options) -> async context manager


async def test_a_job_runs_and_leaving_the_block_drains(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    rid = await fake_queue.submit({"x": 5, "sleep": 100})
    async with run_worker(probe, queue=fake_queue) as w:
        assert w.healthy and w.state is State.HEALTHY
        done = await fake_queue.wait_status(rid, "done")
    # Exact virtual time: the predict slept 100 s and nothing else took any.
    assert done.time == 100.0
    assert w.time_of("predict_finished") - w.time_of("predict_started") == 100.0
    assert (await fake_queue.status(rid))["outputs"] == {"ok": True, "x": 5}
    assert w.exit_code == 0 and w.exited
    assert w.sigterm_at == 100.0  # sent by run_worker on the way out
    assert probe.shutdowns == 1
    assert w.names()[:3] == ["setup_started", "setup_finished", "healthy"]


async def test_an_exception_in_the_block_cancels_the_worker(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    probe = Probe()
    await fake_queue.submit({"sleep": 1000})
    with pytest.raises(ExceptionGroup) as caught:
        async with run_worker(probe, queue=fake_queue) as w:
            await w.wait_event("predict_started")
            raise KeyError("boom")
    assert caught.group_contains(KeyError)
    assert w.exit_code is None and probe.shutdowns == 0  # cancelled, not drained
    assert trio.current_time() == 0.0


async def test_wait_event_fails_fast_when_the_worker_exited(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    async with run_worker(Probe(), queue=fake_queue) as w:
        w.sigterm()
        with pytest.raises(RuntimeError, match="exited"):
            await w.wait_event("claimed")


async def test_the_plugin_factory_and_settings(
    sprocket_worker: Factory, fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    worker_cm: AbstractAsyncContextManager[WorkerHandle] = sprocket_worker(
        Probe(), grace_period=60, claim_timeout=30, info_flush_interval=5
    )
    async with worker_cm as w:
        s = w.worker.settings
        assert (s.grace_period, s.claim_timeout, s.info_flush_interval) == (60, 30, 5)
        assert s.queue and s.name == fake_queue.model
        assert s.api_base_url == fake_queue.api_base_url
        assert s.work_dir.name == "worker-1"


async def test_wait_healthy_false_allows_sigterm_during_setup(
    fake_queue: FakeQueue, autojump_clock: MockClock
) -> None:
    class SlowSetup(Probe):
        def setup(self) -> None:
            testing.sleep(50)

    probe = SlowSetup()
    async with run_worker(probe, queue=fake_queue, wait_healthy=False) as w:
        await trio.sleep(10)
        assert w.state is State.STARTING
        w.sigterm()
        assert await w.wait_exit() == 0
    assert trio.current_time() == 50.0
    assert fake_queue.claims() == [] and probe.shutdowns == 1


class Sleeper(sprocket.Sprocket):
    """Calls time.sleep, like most real code."""

    def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        time.sleep(args["seconds"])
        return {"slept": args["seconds"]}


async def test_virtual_sleep_fixture_makes_time_sleep_virtual_in_predict_only(
    fake_queue: FakeQueue, virtual_sleep: None, autojump_clock: MockClock
) -> None:
    rid = await fake_queue.submit({"seconds": 7200})
    async with run_worker(Sleeper(), queue=fake_queue, grace_period=3 * 3600) as w:
        await fake_queue.wait_status(rid, "done")
        assert trio.current_time() == 7200.0
        # Any other thread still sleeps for real (here 10 ms, not a virtual no-op).
        elapsed: list[float] = []

        def elsewhere() -> None:
            start = time.perf_counter()
            time.sleep(0.01)
            elapsed.append(time.perf_counter() - start)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert elapsed[0] >= 0.009
    assert w.exit_code == 0


def test_patch_time_sleep_restores_time_sleep() -> None:
    original = time.sleep
    with testing.patch_time_sleep():
        assert time.sleep is not original
    assert time.sleep is original


async def test_serve_api_answers_health_on_a_real_socket(fake_queue: FakeQueue) -> None:
    # Real clock: real sockets and the mock clock do not mix (docs/testing.md).
    async with run_worker(Probe(), queue=fake_queue, serve_api=True) as w:
        address = w.worker.http_addresses[0]
        async with httpx.AsyncClient() as client:
            r = await client.get(f"{address}/health")
        assert r.status_code == 200 and r.json() == {"status": "healthy"}


class AsyncEcho(sprocket.AsyncSprocket):
    async def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"echo": args["x"]}


async def test_async_sprocket_runs_under_the_real_clock(fake_queue: FakeQueue) -> None:
    rid = await fake_queue.submit({"x": 3})
    async with run_worker(AsyncEcho(), queue=fake_queue) as w:
        with trio.fail_after(10):
            await fake_queue.wait_status(rid, "done")
    assert (await fake_queue.status(rid))["outputs"] == {"echo": 3}
    assert w.exit_code == 0
