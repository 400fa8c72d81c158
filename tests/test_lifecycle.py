"""The shutdown order of HTTP mode, on Trio's mock clock (no real time, no real sleeps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import sprocket
from sprocket import testing
from sprocket._config import Settings
from sprocket._lifecycle import State
from sprocket._signals import deliver
from sprocket._worker import Worker

GRACE = 300.0


class Recorder(sprocket.Sprocket):
    """A sprocket that records its calls with the virtual time they happened at."""

    warmup_inputs = [{"warm": True}]

    def __init__(self, setup_seconds: float = 0.0) -> None:
        self.calls: list[tuple[str, float]] = []
        self.setup_seconds = setup_seconds

    def _note(self, name: str) -> None:
        self.calls.append((name, trio.from_thread.run_sync(trio.current_time)))

    def setup(self) -> None:
        self._note("setup")
        testing.sleep(self.setup_seconds)

    def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("warm"):
            self._note("warmup")
            return {}
        self._note("predict")
        testing.sleep(float(args.get("sleep", 0)))
        outputs: dict[str, Any] = {"ok": True}
        if "file" in args:
            path = Path(args["file"])
            path.write_bytes(b"x" * 1000)
            outputs["file"] = sprocket.FileOutput(path)
        return outputs

    def shutdown(self) -> None:
        self._note("shutdown")

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def _storage(put_seconds: float) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/storage/upload-request":
            return httpx.Response(200, json={"upload_url": {"url": "https://store.test/put/x"}})
        if request.method == "PUT":
            await request.aread()
            await trio.sleep(put_seconds)
            return httpx.Response(200)
        return httpx.Response(404)

    return httpx.MockTransport(handler)


async def _start(
    nursery: trio.Nursery, user: sprocket.Sprocket, tmp_path: Path, **kw: Any
) -> tuple[Worker, list[int]]:
    settings = Settings(
        name="lifecycle",
        host="127.0.0.1",
        port=0,
        grace_period=GRACE,
        work_dir=tmp_path,
        api_base_url="https://api.test",
        api_key="secret",
    )
    worker = Worker(
        user,
        settings,
        thread_runner=testing.VirtualThreads(),
        transport=kw.pop("transport", None),
        resolver=_no_dns,
    )
    exit_codes: list[int] = []

    async def run() -> None:
        exit_codes.append(await worker.run(handle_signals=False))

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    return worker, exit_codes


async def _no_dns(host: str, port: int) -> list[str]:
    return ["203.0.113.10"]


async def _until_state(worker: Worker, state: State) -> None:
    await worker.lifecycle.state.wait_value(state)


async def _offer(worker: Worker, payload: dict[str, Any]) -> Any:
    """Once the worker is healthy, hand it ``payload`` as ``POST /generate`` would."""
    await _until_state(worker, State.HEALTHY)
    assert worker.http_jobs is not None
    return worker.http_jobs.offer(payload)


async def test_sigterm_when_idle_exits_at_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    user = Recorder()
    async with trio.open_nursery() as nursery:
        worker, codes = await _start(nursery, user, tmp_path)
        await _until_state(worker, State.HEALTHY)
        await trio.sleep(60)
        sent = trio.current_time()
        deliver(worker.lifecycle, worker.events)
    assert codes == [0]
    assert trio.current_time() == sent
    assert user.names() == ["setup", "warmup", "shutdown"]
    names = worker.events.names()
    assert names.index("signal") < names.index("shutdown_started") < names.index("exited")


async def test_sigterm_during_setup_waits_for_setup_then_shuts_down(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    user = Recorder(setup_seconds=100)
    async with trio.open_nursery() as nursery:
        worker, codes = await _start(nursery, user, tmp_path)
        await trio.sleep(10)
        assert worker.lifecycle.current is State.STARTING
        deliver(worker.lifecycle, worker.events)
        assert worker.lifecycle.current is State.DRAINING
    assert codes == [0]
    # No warmup after a drain began; shutdown() once, after setup returned at t=100.
    assert user.names() == ["setup", "shutdown"]
    assert user.calls[1][1] == pytest.approx(100)
    assert worker.shutdown_calls == 1


async def test_setup_longer_than_grace_is_abandoned_without_shutdown(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    user = Recorder(setup_seconds=10_000)
    async with trio.open_nursery() as nursery:
        worker, _ = await _start(nursery, user, tmp_path)
        await trio.sleep(10)
        deliver(worker.lifecycle, worker.events)
    assert trio.current_time() == pytest.approx(10 + GRACE)
    assert user.names() == ["setup"]
    assert "setup_abandoned" in worker.events.names()


async def test_sigterm_during_predict_finishes_job_before_shutdown(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    user = Recorder()
    async with trio.open_nursery() as nursery:
        worker, codes = await _start(nursery, user, tmp_path)
        ticket = await _offer(worker, {"sleep": 50})
        await trio.sleep(10)
        deliver(worker.lifecycle, worker.events)
        deliver(worker.lifecycle, worker.events)  # a second SIGTERM changes nothing
        assert not worker.lifecycle.healthy
        outcome = await ticket.wait()
        assert outcome.outputs == {"ok": True}
    assert codes == [0]
    assert user.names() == ["setup", "warmup", "predict", "shutdown"]
    predict_end = worker.events.events[worker.events.names().index("predict_finished")].time
    assert predict_end == pytest.approx(trio.current_time())
    assert user.calls[-1][1] == pytest.approx(predict_end)
    assert worker.shutdown_calls == 1


async def test_predict_overrunning_the_drain_is_cut_at_the_grace_deadline(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    user = Recorder()
    async with trio.open_nursery() as nursery:
        worker, _ = await _start(nursery, user, tmp_path)
        ticket = await _offer(worker, {"sleep": 5_000})
        # Early enough that the drain deadline (not the prediction timeout) cuts the job.
        await trio.sleep(5)
        sigterm_at = trio.current_time()
        deliver(worker.lifecycle, worker.events)
        outcome = await ticket.wait()
        assert outcome.timed_out
        assert "shutdown deadline" in (outcome.error or "")
        # The job's deadline keeps the report reserve before the grace period ends.
        assert trio.current_time() == pytest.approx(
            sigterm_at + GRACE - worker.settings.report_reserve
        )
    assert user.names()[-1] == "shutdown"
    assert trio.current_time() <= sigterm_at + GRACE


async def test_prediction_timeout_outside_drain_turns_unhealthy_and_exits_nonzero(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    user = Recorder()
    async with trio.open_nursery() as nursery:
        worker, codes = await _start(nursery, user, tmp_path)
        ticket = await _offer(worker, {"sleep": 5_000})
        started = trio.current_time()
        outcome = await ticket.wait()
        assert trio.current_time() - started == pytest.approx(GRACE - 1)
        assert outcome.error is not None and outcome.error.startswith("PredictionTimeout")
    assert codes == [1]
    assert worker.lifecycle.current is State.UNHEALTHY
    assert "shutdown" not in user.names()


async def test_sigterm_during_upload_finishes_upload_then_shuts_down(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    user = Recorder()
    async with trio.open_nursery() as nursery:
        worker, codes = await _start(nursery, user, tmp_path, transport=_storage(put_seconds=40))
        ticket = await _offer(worker, {"file": str(tmp_path / "out.bin")})
        await trio.sleep(5)
        assert "predict_finished" in worker.events.names()
        assert "uploaded" not in worker.events.names()
        deliver(worker.lifecycle, worker.events)
        outcome = await ticket.wait()
    assert codes == [0]
    assert outcome.outputs is not None
    assert outcome.outputs["file"].startswith("https://api.test/v1/storage/")
    names = worker.events.names()
    assert names.index("signal") < names.index("uploaded") < names.index("shutdown_started")
    assert user.names().count("shutdown") == 1
