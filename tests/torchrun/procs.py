"""Process-tree bookkeeping for the torchrun tests, read from ``/proc`` (psutil is not used).

A test snapshots the tree it started (a root pid and every descendant, with start times so a
recycled pid never counts), then asserts that none of those processes, and nothing in their
sessions, is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stat:
    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    start: int


def stat(pid: int) -> Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    # fields[0] is field 3 (state); start time is field 22.
    return Stat(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))


def all_processes() -> list[Stat]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (s := stat(int(name))) is not None:
            found.append(s)
    return found


def descendants(root: int) -> list[Stat]:
    """``root`` and every process below it (by parent pid), at this moment."""
    procs = all_processes()
    children: dict[int, list[Stat]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out = [p for p in procs if p.pid == root]
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


@dataclass
class Tree:
    """Processes seen in a tree; ``survivors()`` lists those still there."""

    members: dict[int, int] = field(default_factory=dict)  # pid -> start time
    sessions: set[int] = field(default_factory=set)

    def add(self, procs: Iterable[Stat]) -> None:
        for p in procs:
            self.members[p.pid] = p.start
            self.sessions.add(p.session)
        # Never count the test's own session (its parent shell or pytest) as the tree's.
        self.sessions.discard(os.getsid(0))

    def add_root(self, root: int) -> None:
        self.add(descendants(root))

    def survivors(self) -> list[Stat]:
        left = []
        for p in all_processes():
            same = self.members.get(p.pid) == p.start
            if same or p.session in self.sessions:
                left.append(p)
        return left

    def wait_gone(self, timeout: float) -> list[Stat]:
        """Poll until nothing is left or ``timeout`` passes; returns the survivors."""
        deadline = time.monotonic() + timeout
        while (left := self.survivors()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def kill_all(self) -> None:
        """Test clean-up: SIGKILL whatever of the tree is left (only processes it recorded)."""
        for p in self.survivors():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, signal.SIGKILL)
