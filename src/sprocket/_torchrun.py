"""The torchrun supervisor: the parent side of ``sprocket.run(..., use_torchrun=True)``.

``TorchrunPredictor`` is a ``Predictor`` whose ``setup``/``predict``/``shutdown`` run in ranks
started by ``torchrun --standalone --nnodes=1 --nproc-per-node=$WORLD_SIZE`` on the same script.
Ranks connect back over a Unix socket (``_ipc``); each rank serves jobs in ``_rank.run_rank``.

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
import dataclasses
import importlib.util
import itertools
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import trio

from ._api import AsyncSprocket, Sprocket
from ._config import Settings
from ._errors import ConfigurationError, JobError
from ._events import EventLog
from ._info import InfoSink
from ._ipc import (
    FrameError,
    RankError,
    TrioFrameStream,
    check_hello,
    encode_frame,
    open_unix_listener,
)
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

__all__ = ["RankError", "RankExited", "TorchrunError", "TorchrunPredictor"]

#: How long a connected rank may take to say hello before it is dropped.
_HELLO_TIMEOUT: Final = 30.0
#: Bound on sending one job's args to the ranks (a rank that stops reading is dead anyway).
_SEND_TIMEOUT: Final = 30.0


@dataclasses.dataclass(eq=False)
class _Rank:
    rank: int
    pid: int
    stream: TrioFrameStream
    stopped: bool = False


@dataclasses.dataclass(eq=False)
class _Job:
    id: int
    sink: InfoSink
    replies: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    done: trio.Event = dataclasses.field(default_factory=trio.Event)


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
        self._kill_after, self._status_timeout = kill_after, status_timeout
        self._token = secrets.token_hex(16)
        self._ranks: dict[int, _Rank] = {}
        self._jobs: dict[int, _Job] = {}
        self._stale: list[_Job] = []
        self._job_ids = itertools.count(1)
        self._job_lock = trio.Lock()
        self._ready: set[int] = set()
        self._settled = trio.Event()  # every rank ready, or a fault
        self._all_stopped = trio.Event()
        self._fault: JobError | None = None
        self._shutdown_errors: dict[int, JobError] = {}
        self._failing = False
        self._stopping = False
        self._closing = False
        self._torchrun: TorchrunProcess | None = None
        self._dir: Path | None = None
        self._stack = contextlib.AsyncExitStack()
        self._service_scope = trio.CancelScope(shield=True)
        self._accept_scope = trio.CancelScope()
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
                nursery.start_soon(self._accept, listener)
                env = {**os.environ, ENV_SOCKET: path, ENV_TOKEN: self._token}
                self._torchrun = TorchrunProcess(
                    self.world_size, self._entrypoint, env, self._dir, self._events
                )
                await nursery.start(self._watch_torchrun, self._torchrun)
                task_status.started()

    async def _watch_torchrun(
        self, torchrun: TorchrunProcess, *, task_status: trio.TaskStatus[None]
    ) -> None:
        await torchrun.run(task_status=task_status)
        code = torchrun.returncode
        expected = self._closing or (self._stopping and code == 0)
        level = logging.INFO if expected else logging.ERROR
        self._events.record("torchrun_exited", level, status=describe_exit_code(code))
        if not expected and not self._failing:
            self._failing = True
            if failures := torchrun.failures():
                rank, (pid, exitcode) = first_failure(failures)
                self._set_fault(RankExited(rank, pid, describe_exit_code(exitcode), self._phase()))
            else:
                self._set_fault(TorchrunError(f"torchrun {describe_exit_code(code)}"))

    # -- IPC: one reader task per rank ----------------------------------------------------

    async def _accept(self, listener: trio.SocketListener) -> None:
        async with listener:
            with self._accept_scope:
                while True:
                    stream = await listener.accept()
                    assert self._nursery is not None
                    self._nursery.start_soon(self._serve_rank, TrioFrameStream(stream))

    async def _serve_rank(self, stream: TrioFrameStream) -> None:
        rank: _Rank | None = None
        try:
            with trio.move_on_after(_HELLO_TIMEOUT):
                hello = await stream.receive()
                rank = self._register(stream, hello)
            if rank is None:
                await stream.aclose()
                return
            while (message := await stream.receive()) is not None:
                self._dispatch(rank, message)
        except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError):
            pass
        except (KeyError, TypeError, ValueError) as exc:
            # A malformed message: treat the rank as lost rather than crash the services.
            self._events.record("rank_protocol_error", logging.ERROR, error=repr(exc))
            await trio.aclose_forcefully(stream.stream)
        if rank is not None:
            await self._rank_lost(rank)

    def _register(self, stream: TrioFrameStream, hello: dict[str, Any] | None) -> _Rank | None:
        checked = check_hello(hello, self._token, self.world_size)
        if checked is None or checked[0] in self._ranks:
            self._events.record("rank_rejected", logging.WARNING, hello=checked)
            return None
        number, pid = checked
        self._tree.add_rank(pid)
        rank = self._ranks[number] = _Rank(number, pid, stream)
        self._events.record("rank_connected", rank=number, pid=pid)
        if len(self._ranks) == self.world_size:
            self._accept_scope.cancel()
        return rank

    def _dispatch(self, rank: _Rank, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind in ("result", "error"):
            job = self._jobs.get(int(message["id"]))
            if job is not None:
                job.replies[rank.rank] = message
                if len(job.replies) == self.world_size:
                    del self._jobs[job.id]
                    job.done.set()
        elif kind == "info":
            job = self._jobs.get(int(message["id"]))
            # Only rank 0's progress counts (the SDK's rule); a cancelled job's is stale.
            if rank.rank == 0 and job is not None and job not in self._stale:
                job.sink.update(message["info"])
        elif kind == "ready":
            self._ready.add(rank.rank)
            self._events.record("rank_ready", rank=rank.rank)
            if len(self._ready) == self.world_size:
                self._events.record("ranks_ready", world_size=self.world_size)
                self._settled.set()
        elif kind == "setup_failed":
            error = RankError(rank.rank, message["error"])
            self._record_rank_error(error, "setup")
            self._failing = True
            self._set_fault(error)
        elif kind == "stopped":
            rank.stopped = True
            self._events.record("rank_stopped", rank=rank.rank)
            if message.get("error"):
                error = self._shutdown_errors[rank.rank] = RankError(rank.rank, message["error"])
                self._record_rank_error(error, "shutdown")
            self._check_all_stopped()

    async def _rank_lost(self, rank: _Rank) -> None:
        if rank.stopped or self._closing:
            return
        if self._stopping or self._failing:
            # Dying during shutdown or as part of a teardown already under way: no new fault.
            self._events.record("rank_exited", logging.WARNING, rank=rank.rank, pid=rank.pid)
            if self._stopping and not self._failing:
                self._shutdown_errors[rank.rank] = RankExited(
                    rank.rank, rank.pid, "exited", "before its shutdown() finished"
                )
            rank.stopped = True
            self._check_all_stopped()
            return
        self._failing = True
        phase = self._phase()
        # Only torchrun (the rank's parent) learns the exit status; it notices within its
        # monitor interval, stops the other ranks and exits, leaving its failure record.
        with trio.move_on_after(self._status_timeout):
            await self._tree.exited.wait()
        entry = self._tree.failures().get(rank.rank)
        status = describe_exit_code(entry[1]) if entry else "exited (exit status unknown)"
        self._set_fault(RankExited(rank.rank, rank.pid, status, phase))

    # -- faults and teardown --------------------------------------------------------------

    def _phase(self) -> str:
        if not self._settled.is_set():
            return "during setup"
        return "during a job" if self._jobs else "while idle"

    def _set_fault(self, error: JobError) -> None:
        if self._fault is not None:
            return
        self._fault = error
        fields = {"rank": getattr(error, "rank", None), "error": str(error)}
        self._events.record("torchrun_fault", logging.ERROR, **fields)
        if self._settled.is_set():
            # Before that, setup() raises this error and the runtime fails the lifecycle with
            # its "setup() failed: ..." message.
            self._lifecycle.fail(str(error))
        for job in self._jobs.values():
            job.done.set()
        self._settled.set()
        self._all_stopped.set()
        if self._nursery is not None:
            self._nursery.start_soon(self._terminate_tree)

    def _check_all_stopped(self) -> None:
        if all(r.stopped for r in self._ranks.values()):
            self._all_stopped.set()

    def _record_rank_error(self, error: RankError, phase: str) -> None:
        self._events.record(
            "rank_error",
            logging.ERROR,
            rank=error.rank,
            phase=phase,
            error=str(error),
            traceback=error.traceback,
        )

    async def _terminate_tree(self) -> None:
        """Stop torchrun and every rank group: SIGTERM, SIGKILL after ``kill_after``; reap."""
        self._closing = True
        self._accept_scope.cancel()
        for rank in self._ranks.values():
            await trio.aclose_forcefully(rank.stream.stream)
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
        return any(not job.done.is_set() for job in self._stale)

    async def setup(self) -> None:
        """Wait until every rank's ``setup()`` finished.

        Raises ``RankError`` (a rank's ``setup()`` raised) or ``TorchrunError`` (a rank or
        torchrun died). Cancelling stops the wait only; ``__aexit__`` stops the ranks.
        """
        await self._settled.wait()
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
            for stale in self._stale:
                await stale.done.wait()
            self._stale.clear()
            if self._fault is not None:
                raise self._fault
            if not self._settled.is_set() or self._stopping:
                raise JobError("the torchrun ranks are not ready for jobs")
            job = _Job(next(self._job_ids), sink)
            try:
                frame = encode_frame({"t": "job", "id": job.id, "args": args})
            except FrameError as exc:
                raise JobError(f"the job's args cannot be sent to the ranks: {exc}") from None
            self._jobs[job.id] = job
            try:
                # Shielded: a frame cut by a cancellation would close that rank's connection
                # (and so stop the rank); the ranks' reader threads take frames without delay.
                with trio.move_on_after(_SEND_TIMEOUT, shield=True):
                    await self._broadcast(frame)
                await job.done.wait()
            except trio.Cancelled:
                if not job.done.is_set():
                    self._stale.append(job)
                    with trio.move_on_after(1.0, shield=True):
                        await self._broadcast(encode_frame({"t": "cancel", "id": job.id}))
                raise
        return self._outcome(job)

    def _outcome(self, job: _Job) -> Any:
        if len(job.replies) < self.world_size:
            raise self._fault or TorchrunError("the ranks stopped before answering")
        failed = sorted(r for r, reply in job.replies.items() if reply["t"] == "error")
        if failed:
            error = RankError(failed[0], job.replies[failed[0]]["error"])
            self._record_rank_error(error, "predict")
            raise error
        outputs = [reply["value"] for _, reply in sorted(job.replies.items())]
        results = [value for value in outputs if value is not None]
        if not results:
            raise JobError(
                "every rank returned None: one rank (rank 0 by convention) must return the outputs"
            )
        # Several ranks returning outputs is common (every rank runs the same code): rank order
        # decides, as the SDK's "rank 0 by convention" implies.
        return results[0]

    async def _broadcast(self, frame: bytes) -> None:
        async def send(rank: _Rank) -> None:
            # A rank that cannot be reached has died; its reader task reports that.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await rank.stream.send_frame(frame)

        async with trio.open_nursery() as nursery:
            for rank in list(self._ranks.values()):
                nursery.start_soon(send, rank)

    async def shutdown(self) -> None:
        """Tell every rank to stop and wait until each ran ``shutdown()`` and torchrun exited.

        Returns at once after a fault (``__aexit__`` kills what is left). Raises ``RankError``
        (or ``RankExited``) for the lowest rank whose ``shutdown()`` raised (or that died before
        it finished). Cancellation stops the wait;
        ``__aexit__`` then terminates the tree.
        """
        if self._fault is not None or self._tree.exited.is_set() or not self._settled.is_set():
            return
        self._stopping = True
        await self._broadcast(encode_frame({"t": "stop"}))
        await self._all_stopped.wait()
        with trio.move_on_after(self._kill_after):
            await self._tree.exited.wait()
        if self._shutdown_errors:
            raise self._shutdown_errors[min(self._shutdown_errors)]
