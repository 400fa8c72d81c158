"""The torchrun supervisor driven directly: real torchrun, WORLD_SIZE=2, gloo on CPU."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

import sprocket
from sprocket._errors import JobError
from sprocket._info import InfoBuffer
from sprocket._lifecycle import State
from sprocket._torchrun import RankError, RankExited, TorchrunError

from .conftest import Supervised

pytestmark = pytest.mark.e2e

GONE_TIMEOUT = 30.0


def assert_tree_gone(s: Supervised, ranks: int = 2) -> None:
    s.snapshot()
    left = s.tree.wait_gone(GONE_TIMEOUT)
    assert not left, f"processes outlived the supervisor: {left}"
    assert len(s.pids("rank_connected")) >= ranks


async def test_jobs_progress_files_errors_and_graceful_shutdown(
    supervise, marker_dir: Path
) -> None:
    async with supervise() as s:
        p = s.predictor
        assert p.warmup_inputs == [{"empty": True}]
        await p.setup()
        s.snapshot()

        info = InfoBuffer()
        out = await p.predict({"progress": 4, "sleep": 0.2, "file_bytes": 1000}, info)
        assert out["world_size"] == 2 and out["sum"] == 3
        assert info.merged() == {"progress": 1.0}
        assert isinstance(out["file"], sprocket.FileOutput)
        assert out["file"].is_absolute() and out["file"].stat().st_size == 1000

        with pytest.raises(RankError) as caught:
            await p.predict({"fail_rank": 1}, InfoBuffer())
        assert str(caught.value) == "rank 1 raised RuntimeError: rank 1 was asked to fail"
        assert caught.value.rank == 1 and "Traceback" in caught.value.traceback
        assert "rank_error" in s.events.names()

        # The worker carries on after a job's failure.
        assert await p.predict({}, InfoBuffer()) == {"world_size": 2, "sum": 3}
        assert s.lifecycle.fatal_reason is None and not p.stuck

        await p.shutdown()
    assert sorted(os.listdir(marker_dir)) == ["shutdown-0", "shutdown-1"]
    assert s.lifecycle.fatal_reason is None
    assert "process_tree_gone" in s.events.names()
    assert_tree_gone(s)


async def test_lowest_failing_rank_wins_and_none_everywhere_is_an_error(supervise) -> None:
    async with supervise() as s:
        p = s.predictor
        await p.setup()
        # Both ranks raise: rank 0's error is the job's.
        with pytest.raises(RankError, match=r"^rank 0 raised RuntimeError"):
            await p.predict({"fail_rank": [1, 0]}, InfoBuffer())
        with pytest.raises(JobError, match="every rank returned None"):
            await p.predict({"none": True}, InfoBuffer())
        await p.shutdown()
    assert_tree_gone(s)


async def test_rank_crash_during_job_fails_job_and_worker(supervise) -> None:
    async with supervise() as s:
        p = s.predictor
        await p.setup()
        s.snapshot()
        s.lifecycle.set_healthy()
        with pytest.raises(RankExited) as caught:
            await p.predict({"crash_rank": 1, "sleep": 0.1}, InfoBuffer())
        message = str(caught.value)
        assert message.startswith("rank 1 (pid ") and "exited with status 3 during a job" in message
        assert s.lifecycle.current is State.UNHEALTHY
        assert s.lifecycle.fatal_reason == message
        # Later calls fail fast with the same fault.
        with pytest.raises(RankExited):
            await p.predict({}, InfoBuffer())
        await p.shutdown()  # a no-op after a fault
    assert_tree_gone(s)


async def test_rank_killed_while_idle_fails_worker(supervise) -> None:
    async with supervise() as s:
        await s.predictor.setup()
        s.snapshot()
        s.lifecycle.set_healthy()
        os.kill(s.pids("rank_connected")[0], signal.SIGKILL)
        with trio.fail_after(GONE_TIMEOUT):
            await s.lifecycle.state.wait_value(State.UNHEALTHY)
        reason = s.lifecycle.fatal_reason or ""
        assert "was killed by signal 9 (SIGKILL) while idle" in reason, reason
    assert_tree_gone(s)


async def test_rank_setup_failure(supervise, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRUN_SINK_FAIL_SETUP_RANK", "1")
    async with supervise() as s:
        with pytest.raises(RankError) as caught:
            await s.predictor.setup()
        s.snapshot()
    assert str(caught.value) == "rank 1 raised ValueError: rank 1 could not load its weights"
    # Rank 0 may not have connected before the teardown: it is stopped as torchrun's child.
    assert_tree_gone(s, ranks=1)


async def test_cancelled_predict_is_stuck_until_the_ranks_answer(supervise) -> None:
    async with supervise() as s:
        p = s.predictor
        await p.setup()
        with trio.move_on_after(0.3):
            await p.predict({"sleep": 2.0}, InfoBuffer())
        assert p.stuck
        # The next job waits for the abandoned one, then runs normally.
        assert await p.predict({}, InfoBuffer()) == {"world_size": 2, "sum": 3}
        assert not p.stuck
        await p.shutdown()
    assert_tree_gone(s)


async def test_exit_without_shutdown_kills_a_busy_tree(supervise) -> None:
    async with supervise(kill_after=1.0) as s:
        p = s.predictor
        await p.setup()
        s.snapshot()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.predict, {"sleep": 600}, InfoBuffer())
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    assert_tree_gone(s)


async def test_torchrun_killed_is_a_fault(supervise) -> None:
    async with supervise() as s:
        await s.predictor.setup()
        s.snapshot()
        s.lifecycle.set_healthy()
        os.kill(s.pids("torchrun_started")[0], signal.SIGKILL)
        with trio.fail_after(GONE_TIMEOUT):
            await s.lifecycle.state.wait_value(State.UNHEALTHY)
        assert "torchrun was killed by signal 9" in (s.lifecycle.fatal_reason or "")
        with pytest.raises(TorchrunError):
            await s.predictor.predict({}, InfoBuffer())
    assert_tree_gone(s)


async def test_body_exception_propagates_unwrapped(supervise) -> None:
    with pytest.raises(KeyError):
        async with supervise() as s:
            await s.predictor.setup()
            s.snapshot()
            raise KeyError("from the body")
    assert_tree_gone(s)


async def test_ranks_that_never_connect_and_ignore_sigterm_are_killed(supervise) -> None:
    stubborn = Path(__file__).with_name("stubborn_rank.py")
    async with supervise(entrypoint=[str(stubborn)], kill_after=1.0) as s:
        with trio.move_on_after(3.0):
            await s.predictor.setup()  # never settles: nobody connects
        s.snapshot()
        assert len(s.tree.members) == 3  # torchrun and its two ranks
    assert "process_tree_killed" in s.events.names()
    assert "process_tree_gone" in s.events.names()
    assert_tree_gone(s, ranks=0)


async def test_rank_shutdown_error_is_raised_after_every_rank_stopped(
    supervise, marker_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHRUN_SINK_FAIL_SHUTDOWN_RANK", "1")
    async with supervise() as s:
        await s.predictor.setup()
        s.snapshot()
        with pytest.raises(
            RankError, match=r"^rank 1 raised RuntimeError: rank 1 could not release"
        ):
            await s.predictor.shutdown()
    assert sorted(os.listdir(marker_dir)) == ["shutdown-0", "shutdown-1"]
    assert s.lifecycle.fatal_reason is None  # the runtime decides what a shutdown error means
    assert_tree_gone(s)
