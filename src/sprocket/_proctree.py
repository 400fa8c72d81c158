"""torchrun's process tree: how it is started, what it reports, how it is stopped.

torchrun puts each rank in a session of its own, so "the process tree" is a set of process
groups (torchrun's and one per rank). A group is gone when ``/proc`` lists no process in it, not
even a zombie. ``/proc`` is Linux (the platform runs Linux containers); elsewhere a group reads
as gone once ``killpg(pgid, 0)`` fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

import trio

from ._errors import JobError
from ._events import EventLog

__all__ = [
    "ENV_REPORT",
    "ProcInfo",
    "RankExited",
    "TorchrunError",
    "TorchrunProcess",
    "default_entrypoint",
    "describe_exit_code",
    "first_failure",
    "group_members",
    "read_failures",
    "signal_groups",
    "terminate_groups",
    "torchrun_command",
    "wait_groups_gone",
]

_POLL: Final = 0.02
ENV_REPORT: Final = "SPROCKET_TORCHRUN_REPORT"
_REPORT_NAME: Final = "failures.json"

# Runs torchrun's own entry point and, when ranks fail, writes torchrun's structured failure
# record (rank -> exit code, pid) to a file: a rank's exit status is known only to its parent,
# torchrun, and parsing torchrun's log text would be brittle.
_LAUNCHER: Final = """\
import atexit, json, os, sys
from torch.distributed.run import main
try:
    main(sys.argv[1:])
    # Skip the half-second teardown of an interpreter that imported torch (as the ranks do).
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
except BaseException as exc:
    failures, path = getattr(exc, "failures", None), os.environ.get("SPROCKET_TORCHRUN_REPORT")
    if isinstance(failures, dict) and path:
        record = {str(r): {"exitcode": f.exitcode, "pid": f.pid} for r, f in failures.items()}
        with open(path, "w") as fh:
            json.dump(record, fh)
    raise
"""


class TorchrunError(JobError):
    """The rank process tree failed: a rank died or torchrun exited on its own."""


class RankExited(TorchrunError):
    """A rank process ended unexpectedly; ``str()`` names the rank, pid and exit status."""

    def __init__(self, rank: int, pid: int, status: str, during: str) -> None:
        self.rank, self.pid, self.status = rank, pid, status
        super().__init__(f"rank {rank} (pid {pid}) {status} {during}")


def torchrun_command(world_size: int, entrypoint: Sequence[str]) -> list[str]:
    """The torchrun command line that runs ``entrypoint`` (script and args) on each rank.

    ``--max-restarts=0``: a failed rank is a fault of the worker, which the platform restarts;
    ``--monitor-interval=0.1``: torchrun notices a dead rank (and reports it) quickly.
    """
    return [
        sys.executable,
        "-c",
        _LAUNCHER,
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={world_size}",
        "--max-restarts=0",
        "--monitor-interval=0.1",
        *entrypoint,
    ]


def default_entrypoint() -> list[str]:
    """This process's own script (or ``-m module``) and arguments, for the ranks to run."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return ["-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    return [os.path.abspath(sys.argv[0]), *sys.argv[1:]]


def read_failures(run_dir: Path | None) -> dict[int, tuple[int, int]]:
    """torchrun's failure record: rank -> (pid, exit code); empty when there is none."""
    if run_dir is None:
        return {}
    try:
        raw = json.loads((run_dir / _REPORT_NAME).read_text())
        return {int(r): (int(f["pid"]), int(f["exitcode"])) for r, f in raw.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


@dataclasses.dataclass(frozen=True)
class ProcInfo:
    """One line of ``/proc/<pid>/stat``, the fields we need."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int


def describe_exit_code(code: int | None) -> str:
    """``"exited with status 3"`` / ``"was killed by signal 9 (SIGKILL)"`` (Popen convention)."""
    if code is None:
        return "is still running"
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"was killed by signal {-code}"
    return f"was killed by signal {-code} ({name})"


def _read_stat(pid: str) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return ProcInfo(int(pid), fields[0], int(fields[1]), int(fields[2]), int(fields[3]))
    except (IndexError, ValueError):
        return None


def iter_processes() -> Iterator[ProcInfo]:
    """Every process visible in ``/proc`` (nothing where there is no ``/proc``)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if name.isdigit() and (info := _read_stat(name)) is not None:
            yield info


def group_members(groups: Collection[int]) -> list[ProcInfo]:
    """Processes (zombies included) whose process group is in ``groups``."""
    if not os.path.isdir("/proc"):
        return [ProcInfo(g, "?", 0, g, g) for g in groups if _group_exists(g)]
    return [p for p in iter_processes() if p.pgrp in groups]


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap_orphans(members: list[ProcInfo], keep: Collection[int]) -> None:
    # Ranks orphaned by a dead torchrun are re-parented to init, or to us when we are PID 1 in a
    # container or a subreaper; then nobody else would ever reap them.
    me = os.getpid()
    for p in members:
        if p.state == "Z" and p.ppid == me and p.pid not in keep:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, os.WNOHANG)


def first_failure(failures: dict[int, tuple[int, int]]) -> tuple[int, tuple[int, int]]:
    """The rank to blame in torchrun's failure record, and its ``(pid, exit code)``.

    Ranks that torchrun itself stopped with SIGTERM after the first failure are victims, not
    the cause; among the rest the lowest rank wins.
    """
    rank = min(failures, key=lambda r: (failures[r][1] == -signal.SIGTERM, r))
    return rank, failures[rank]


def signal_groups(groups: Collection[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each of ``groups`` that has members now.

    Only groups seen alive just now are signalled, so a long-gone group id (which the kernel
    may hand out again) is never signalled.
    """
    for pgid in {p.pgrp for p in group_members(groups)}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def _adopt_children(groups: set[int], parent: int | None) -> None:
    # torchrun starts each rank as the leader of a new session; a rank that has not said hello
    # yet (or never will) is known only as torchrun's child.
    if parent is not None:
        groups.update(p.pid for p in iter_processes() if p.ppid == parent)


async def wait_groups_gone(
    groups: set[int], keep: Collection[int] = (), parent: int | None = None
) -> None:
    """Return once no process (zombies included) of ``groups`` remains.

    ``groups`` grows by every child of ``parent`` seen meanwhile. Reaps orphaned zombies that
    were re-parented to this process, except the pids in ``keep`` (children someone else
    reaps: torchrun's ``trio.Process``). Cancellation stops the wait; bound it with
    ``trio.move_on_after``.
    """
    while True:
        _adopt_children(groups, parent)
        members = group_members(groups)
        if not members:
            return
        _reap_orphans(members, keep)
        await trio.sleep(_POLL)


async def terminate_groups(
    groups: set[int], kill_after: float, torchrun: int | None, events: EventLog
) -> bool:
    """SIGTERM every group, SIGKILL what is left after ``kill_after`` s; wait until all gone.

    ``groups`` grows by the children of ``torchrun`` (whose ``trio.Process`` reaps it). Returns
    whether everything is gone; waits at most ``kill_after`` + 10 s.
    """
    keep = () if torchrun is None else (torchrun,)
    _adopt_children(groups, torchrun)
    signal_groups(groups, signal.SIGTERM)
    with trio.move_on_after(kill_after):
        await wait_groups_gone(groups, keep, torchrun)
        return True
    events.record("process_tree_killed", logging.WARNING, groups=sorted(groups))
    _adopt_children(groups, torchrun)
    signal_groups(groups, signal.SIGKILL)
    with trio.move_on_after(10.0):
        await wait_groups_gone(groups, keep, torchrun)
        return True
    return False


class TorchrunProcess:
    """torchrun and the process groups of its tree, from start to the last process reaped.

    ``groups`` holds torchrun's group and, once known (``add_rank``), each rank's. ``exited``
    is set when torchrun has exited and was reaped; ``returncode`` is then its status.
    """

    def __init__(
        self,
        world_size: int,
        entrypoint: Sequence[str],
        env: Mapping[str, str],
        run_dir: Path,
        events: EventLog,
    ) -> None:
        self._command = torchrun_command(world_size, entrypoint)
        self._env = {**env, ENV_REPORT: str(run_dir / _REPORT_NAME)}
        self._run_dir, self._events, self._world_size = run_dir, events, world_size
        self._proc: trio.Process | None = None
        self.groups: set[int] = set()
        self.exited = trio.Event()
        self._terminated: trio.Event | None = None
        self.gone = False

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    def add_rank(self, pid: int) -> None:
        """A rank said hello: its group (it leads a session of its own) is part of the tree."""
        self.groups.add(pid)

    def failures(self) -> dict[int, tuple[int, int]]:
        """torchrun's failure record (see ``read_failures``)."""
        return read_failures(self._run_dir)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start torchrun, report started, return once it exited (cancellation: stop waiting)."""
        # Its own session and process group, so that signals for the tree reach no one else.
        proc = await trio.lowlevel.open_process(
            self._command, env=self._env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self._proc = proc
        self.groups.add(proc.pid)
        self._events.record("torchrun_started", pid=proc.pid, world_size=self._world_size)
        task_status.started()
        await proc.wait()
        self.exited.set()

    async def terminate(self, kill_after: float) -> bool:
        """Stop the whole tree (see ``terminate_groups``) and reap torchrun; run once.

        Later calls wait for the first to finish. Returns whether every process is gone.
        """
        if self._terminated is not None:
            await self._terminated.wait()
            return self.gone
        self._terminated = trio.Event()
        try:
            pid = self._proc.pid if self._proc is not None else None
            self.gone = await terminate_groups(self.groups, kill_after, pid, self._events)
            if self._proc is not None:
                with trio.move_on_after(5.0):
                    await self._proc.wait()
            self._events.record("process_tree_gone" if self.gone else "process_tree_survived")
        finally:
            self._terminated.set()
        return self.gone
