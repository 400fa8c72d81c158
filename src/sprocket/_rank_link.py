"""The parent's end of the rank connections: who connected, what each rank said, job replies.

``RankLink`` is owned by ``TorchrunPredictor`` (``_torchrun``), which decides what a fault means
for the worker; the link only finds faults and reports them through ``on_fault``. It serves one
reader task per rank (in the predictor's nursery), keeps one record per connected rank and per
job in flight, broadcasts frames to every rank, and turns a job's replies into its outcome.

Flags the predictor reads and sets, and what a lost connection then means:

- ``stopping``: ``stop`` was sent (``stop()``); a rank lost now died during its ``shutdown()``.
- ``closing``: the connections are being closed (``close()``); a lost rank is expected.
- ``failing``: a fault is being handled; a rank lost now is part of that teardown, no new fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Callable
from typing import Any, Final

import trio

from ._errors import JobError
from ._events import EventLog
from ._info import InfoSink
from ._ipc import FrameError, RankError, TrioFrameStream, check_hello, encode_frame
from ._proctree import RankExited, TorchrunError, TorchrunProcess, describe_exit_code

__all__ = ["RankLink"]

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


class RankLink:
    """The ranks' connections and the bookkeeping of what they said (see module doc).

    ``settled`` is set once every rank is ready (or a fault released it, ``release()``);
    ``on_fault`` receives a rank's ``setup()`` error or a lost rank's ``RankExited``.
    """

    def __init__(
        self,
        world_size: int,
        token: str,
        events: EventLog,
        *,
        status_timeout: float,
        on_fault: Callable[[JobError], None],
    ) -> None:
        self.world_size = world_size
        self._token, self._events = token, events
        self._status_timeout, self._on_fault = status_timeout, on_fault
        self._ranks: dict[int, _Rank] = {}
        self._jobs: dict[int, _Job] = {}
        self._stale: list[_Job] = []
        self._job_ids = itertools.count(1)
        self._ready: set[int] = set()
        self.settled = trio.Event()  # every rank ready, or a fault
        self._all_stopped = trio.Event()
        self._shutdown_errors: dict[int, JobError] = {}
        self.failing = False
        self.stopping = False
        self.closing = False
        self._accept_scope = trio.CancelScope()

    # -- connections: one reader task per rank --------------------------------------------

    async def accept(
        self, listener: trio.SocketListener, tree: TorchrunProcess, nursery: trio.Nursery
    ) -> None:
        """Serve each rank of ``tree`` that connects, in a task of ``nursery``.

        Returns once all ``world_size`` ranks connected or ``close()`` was called; cancellation
        stops accepting only (the reader tasks live on in ``nursery``).
        """
        async with listener:
            with self._accept_scope:
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve_rank, TrioFrameStream(stream), tree)

    async def _serve_rank(self, stream: TrioFrameStream, tree: TorchrunProcess) -> None:
        rank: _Rank | None = None
        try:
            with trio.move_on_after(_HELLO_TIMEOUT):
                hello = await stream.receive()
                rank = self._register(stream, hello, tree)
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
            await self._rank_lost(rank, tree)

    def _register(
        self, stream: TrioFrameStream, hello: dict[str, Any] | None, tree: TorchrunProcess
    ) -> _Rank | None:
        checked = check_hello(hello, self._token, self.world_size)
        if checked is None or checked[0] in self._ranks:
            self._events.record("rank_rejected", logging.WARNING, hello=checked)
            return None
        number, pid = checked
        tree.add_rank(pid)
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
                self.settled.set()
        elif kind == "setup_failed":
            error = RankError(rank.rank, message["error"])
            self._record_rank_error(error, "setup")
            self.failing = True
            self._on_fault(error)
        elif kind == "stopped":
            rank.stopped = True
            self._events.record("rank_stopped", rank=rank.rank)
            if message.get("error"):
                error = self._shutdown_errors[rank.rank] = RankError(rank.rank, message["error"])
                self._record_rank_error(error, "shutdown")
            self._check_all_stopped()

    async def _rank_lost(self, rank: _Rank, tree: TorchrunProcess) -> None:
        if rank.stopped or self.closing:
            return
        if self.stopping or self.failing:
            # Dying during shutdown or as part of a teardown already under way: no new fault.
            self._events.record("rank_exited", logging.WARNING, rank=rank.rank, pid=rank.pid)
            if self.stopping and not self.failing:
                self._shutdown_errors[rank.rank] = RankExited(
                    rank.rank, rank.pid, "exited", "before its shutdown() finished"
                )
            rank.stopped = True
            self._check_all_stopped()
            return
        # Set before the wait below, so that the ranks torchrun stops meanwhile add no fault.
        self.failing = True
        phase = self.phase()
        # Only torchrun (the rank's parent) learns the exit status; it notices within its
        # monitor interval, stops the other ranks and exits, leaving its failure record.
        with trio.move_on_after(self._status_timeout):
            await tree.exited.wait()
        entry = tree.failures().get(rank.rank)
        status = describe_exit_code(entry[1]) if entry else "exited (exit status unknown)"
        self._on_fault(RankExited(rank.rank, rank.pid, status, phase))

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

    # -- the state the predictor acts on --------------------------------------------------

    def phase(self) -> str:
        """What the ranks were doing, for an error message: ``"during setup"`` and so on."""
        if not self.settled.is_set():
            return "during setup"
        return "during a job" if self._jobs else "while idle"

    def release(self) -> None:
        """A fault: wake every waiter (jobs in flight, ``settled``, ``stop()``) at once."""
        for job in self._jobs.values():
            job.done.set()
        self.settled.set()
        self._all_stopped.set()

    async def close(self) -> None:
        """Stop accepting and close every connection (each rank then exits at once).

        Closing is forceful, so this does not wait on the ranks; the predictor calls it shielded.
        """
        self.closing = True
        self._accept_scope.cancel()
        # A copy: a hello may register a rank while we await a close.
        for rank in list(self._ranks.values()):
            await trio.aclose_forcefully(rank.stream.stream)

    async def stop(self) -> None:
        """Send ``stop``; wait until every rank answered or was lost, or a fault (``release``).

        Cancellation stops the wait only.
        """
        self.stopping = True
        await self._broadcast(encode_frame({"t": "stop"}))
        await self._all_stopped.wait()

    def shutdown_error(self) -> JobError | None:
        """The lowest rank's ``shutdown()`` error (or its exit before finishing), if any."""
        if self._shutdown_errors:
            return self._shutdown_errors[min(self._shutdown_errors)]
        return None

    # -- jobs -----------------------------------------------------------------------------

    @property
    def stuck(self) -> bool:
        """True while a cancelled job still runs in the ranks (its late result is dropped)."""
        return any(not job.done.is_set() for job in self._stale)

    async def wait_abandoned(self) -> None:
        """Wait until every rank answered each cancelled job (its answers are discarded).

        Cancellation stops the wait; the abandoned jobs are still waited for next time.
        """
        for stale in self._stale:
            await stale.done.wait()
        self._stale.clear()

    async def run_job(self, args: dict[str, Any], sink: InfoSink) -> _Job:
        """Broadcast ``args``; return the job once every rank answered or a fault released it.

        Raises ``JobError`` if ``args`` cannot be sent. Cancellation returns at once: the job is
        abandoned (``stuck`` until every rank answered it) and the ranks are sent ``cancel``.
        """
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
        return job

    def outcome(self, job: _Job, fault: JobError | None) -> Any:
        """The job's output: the lowest rank's non-``None`` result.

        Raises ``fault`` (or ``TorchrunError``) if some rank never answered, ``RankError`` for
        the lowest rank that raised, ``JobError`` if every rank returned ``None``.
        """
        if len(job.replies) < self.world_size:
            raise fault or TorchrunError("the ranks stopped before answering")
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
