"""The torchrun supervisor: the parent side of ``sprocket.run(..., use_torchrun=True)``.

``TorchrunPredictor`` is a ``Predictor`` whose ``setup``/``predict``/``shutdown`` run in ranks
started by ``torchrun --standalone --nnodes=1 --nproc-per-node=$WORLD_SIZE`` on the same script.
Ranks connect back over a Unix socket (``_ipc``); each rank serves jobs in ``_rank.run_rank``,
and ``_rank_link.RankLink`` keeps the parent's end of those connections: this module keeps the
process tree's lifetime and decides what a fault means for the worker.

Ownership: torchrun and every rank are owned by the nursery the predictor opens in
``__aenter__``; ``__aexit__`` does not return before the whole process tree is gone. torchrun
starts each rank in its own session, so the tree is torchrun's process group plus one group per
rank (each rank's pid, learnt from its hello); every one of them is signalled and waited for.

Failure: a rank that dies, a rank whose ``setup()`` raises, or torchrun exiting on its own is a
fault: the job in flight fails with an error naming the rank and its exit status,
``lifecycle.fail()`` turns the worker unhealthy, and the tree is torn down at once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from ._api import AsyncSprocket, Sprocket
from ._config import Settings
from ._errors import ConfigurationError, JobError
from ._events import EventLog
from ._info import InfoSink
from ._ipc import RankError, open_unix_listener
from ._lifecycle import Lifecycle
from ._proctree import (
    RankExited,
    TorchrunError,
    TorchrunProcess,
    default_entrypoint,
    describe_exit_code,
    first_failure,
)
from ._rank import ENV_SOCKET, ENV_TOKEN
from ._rank_link import RankLink

__all__ = ["RankError", "RankExited", "TorchrunError", "TorchrunPredictor"]


class TorchrunPredictor:
    """Runs the user's sprocket in ``settings.world_size`` torchrun ranks (see module doc).

    Use as ``async with predictor:``; the context owns torchrun and the ranks, and on exit
    terminates them (SIGTERM, SIGKILL after ``kill_after`` seconds) and waits until every process
    of the tree is gone, even when cancelled. ``entrypoint`` (script and arguments) defaults to
    this process's own command line.
    """

    def __init__(
        self,
        user: Sprocket | AsyncSprocket,
        settings: Settings,
        lifecycle: Lifecycle,
        events: EventLog,
        *,
        entrypoint: Sequence[str] | None = None,
        kill_after: float = 3.0,
        status_timeout: float = 5.0,
    ) -> None:
        self.processor = type(user).processor()
        self.warmup_inputs = [dict(args) for args in type(user).warmup_inputs]
        self.world_size = settings.world_size
        self._interruptible = isinstance(user, AsyncSprocket)
        self._lifecycle, self._events = lifecycle, events
        self._entrypoint = list(entrypoint) if entrypoint is not None else default_entrypoint()
        self._kill_after = kill_after
        self._token = secrets.token_hex(16)
        self._link = RankLink(
            self.world_size,
            self._token,
            events,
            status_timeout=status_timeout,
            on_fault=self._set_fault,
        )
        self._job_lock = trio.Lock()
        self._fault: JobError | None = None
        self._torchrun: TorchrunProcess | None = None
        self._dir: Path | None = None
        self._stack = contextlib.AsyncExitStack()
        self._service_scope = trio.CancelScope(shield=True)
        self._nursery: trio.Nursery | None = None

    # -- context: the process tree's lifetime ---------------------------------------------

    async def __aenter__(self) -> TorchrunPredictor:
        """Start the IPC server and torchrun. Raises if torchrun cannot be started."""
        if importlib.util.find_spec("torch") is None:
            raise ConfigurationError(
                "use_torchrun=True needs PyTorch installed (pip install 'sprocket[torchrun]')"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="sprocket-torchrun-"))
        outer = await self._stack.enter_async_context(trio.open_nursery())
        try:
            await outer.start(self._services)
        except BaseException:
            await self._stack.aclose()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Tear the tree down (bounded, shielded from cancellation), then close the nursery."""
        try:
            with trio.CancelScope(shield=True):
                await self._terminate_tree()
        finally:
            self._service_scope.cancel()
            try:
                await self._stack.__aexit__(exc_type, exc, tb)
            except BaseExceptionGroup as group:
                # Our service tasks never raise, so the nursery's group can only wrap the body's
                # own exception: let it propagate unwrapped, as if no nursery were there.
                if exc is None or list(group.exceptions) != [exc]:
                    raise
            finally:
                if self._dir is not None:
                    shutil.rmtree(self._dir, ignore_errors=True)

    async def _services(self, *, task_status: trio.TaskStatus[None]) -> None:
        # Shielded: the services end only when __aexit__ cancels them, after the teardown, so
        # an outer cancellation never leaves ranks without a reader or torchrun unwatched.
        with self._service_scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                assert self._dir is not None
                path = str(self._dir / "ipc.sock")
                listener = await open_unix_listener(path, self.world_size)
                env = {**os.environ, ENV_SOCKET: path, ENV_TOKEN: self._token}
                self._torchrun = TorchrunProcess(
                    self.world_size, self._entrypoint, env, self._dir, self._events
                )
                # The ranks' reader tasks run in this nursery, beside torchrun's watcher.
                nursery.start_soon(self._link.accept, listener, self._torchrun, nursery)
                await nursery.start(self._watch_torchrun, self._torchrun)
                task_status.started()

    async def _watch_torchrun(
        self, torchrun: TorchrunProcess, *, task_status: trio.TaskStatus[None]
    ) -> None:
        await torchrun.run(task_status=task_status)
        code = torchrun.returncode
        link = self._link
        expected = link.closing or (link.stopping and code == 0)
        level = logging.INFO if expected else logging.ERROR
        self._events.record("torchrun_exited", level, status=describe_exit_code(code))
        if not expected and not link.failing:
            link.failing = True
            if failures := torchrun.failures():
                rank, (pid, exitcode) = first_failure(failures)
                self._set_fault(RankExited(rank, pid, describe_exit_code(exitcode), link.phase()))
            else:
                self._set_fault(TorchrunError(f"torchrun {describe_exit_code(code)}"))

    # -- faults and teardown --------------------------------------------------------------

    def _set_fault(self, error: JobError) -> None:
        """The first fault wins: fail the worker, wake every waiter, tear the tree down."""
        if self._fault is not None:
            return
        self._fault = error
        fields = {"rank": getattr(error, "rank", None), "error": str(error)}
        self._events.record("torchrun_fault", logging.ERROR, **fields)
        if self._link.settled.is_set():
            # Before that, setup() raises this error and the runtime fails the lifecycle with
            # its "setup() failed: ..." message.
            self._lifecycle.fail(str(error))
        self._link.release()
        if self._nursery is not None:
            self._nursery.start_soon(self._terminate_tree)

    async def _terminate_tree(self) -> None:
        """Stop torchrun and every rank group: SIGTERM, SIGKILL after ``kill_after``; reap."""
        await self._link.close()
        if self._torchrun is not None:
            await self._torchrun.terminate(self._kill_after)

    @property
    def _tree(self) -> TorchrunProcess:
        if self._torchrun is None:
            raise RuntimeError("TorchrunPredictor used outside 'async with'")
        return self._torchrun

    # -- the Predictor interface ----------------------------------------------------------

    @property
    def interruptible(self) -> bool:
        """Whether a cancelled job is stopped in the ranks (an ``AsyncSprocket``) or abandoned."""
        return self._interruptible

    @property
    def stuck(self) -> bool:
        """True while a cancelled job still runs in the ranks (its late result is dropped)."""
        return self._link.stuck

    async def setup(self) -> None:
        """Wait until every rank's ``setup()`` finished.

        Raises ``RankError`` (a rank's ``setup()`` raised) or ``TorchrunError`` (a rank or
        torchrun died). Cancelling stops the wait only; ``__aexit__`` stops the ranks.
        """
        await self._link.settled.wait()
        if self._fault is not None:
            raise self._fault

    async def predict(self, args: dict[str, Any], sink: InfoSink) -> Any:
        """Broadcast ``args`` to every rank and return the one non-``None`` result.

        Rank 0's ``emit_info`` updates go to ``sink``. Raises ``RankError`` for the lowest rank
        that raised, ``JobError`` if every rank returned ``None``, ``TorchrunError`` if a rank
        died. Cancellation returns at once and asks the ranks to cancel (an ``AsyncSprocket``
        predict is cancelled; a sync one runs on); ``stuck`` is true until they all answered,
        and the next job waits for that.
        """
        async with self._job_lock:
            await self._link.wait_abandoned()
            if self._fault is not None:
                raise self._fault
            if not self._link.settled.is_set() or self._link.stopping:
                raise JobError("the torchrun ranks are not ready for jobs")
            job = await self._link.run_job(args, sink)
        return self._link.outcome(job, self._fault)

    async def shutdown(self) -> None:
        """Tell every rank to stop and wait until each ran ``shutdown()`` and torchrun exited.

        Returns at once after a fault (``__aexit__`` kills what is left). Raises ``RankError``
        (or ``RankExited``) for the lowest rank whose ``shutdown()`` raised (or that died before
        it finished). Cancellation stops the wait; ``__aexit__`` then terminates the tree.
        """
        if self._fault is not None or self._tree.exited.is_set() or not self._link.settled.is_set():
            return
        await self._link.stop()
        with trio.move_on_after(self._kill_after):
            await self._tree.exited.wait()
        if (error := self._link.shutdown_error()) is not None:
            raise error
