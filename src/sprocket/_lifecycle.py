"""The lifecycle state: one observable value that every task of the tree can wait on."""

from __future__ import annotations

import enum
import math
from typing import Any

import trio
from trio_util import AsyncValue

__all__ = ["Lifecycle", "State"]


class State(enum.Enum):
    """Where the worker is in its life; only ``HEALTHY`` answers ``/health`` with 200."""

    STARTING = "starting"
    HEALTHY = "healthy"
    DRAINING = "draining"
    STOPPING = "stopping"
    UNHEALTHY = "unhealthy"


class Lifecycle:
    """The worker's state and the one clock every shutdown deadline derives from.

    ``begin_drain()`` (SIGTERM) fixes ``drain_deadline`` = now + grace period; later calls
    change nothing. ``fail()`` records why the process must exit non-zero.
    """

    def __init__(self, grace_period: float) -> None:
        self.grace_period = grace_period
        self.state: Any = AsyncValue(State.STARTING)
        self.drain_deadline = math.inf
        self.draining = trio.Event()
        self.fatal_reason: str | None = None

    @property
    def current(self) -> State:
        state: State = self.state.value
        return state

    @property
    def healthy(self) -> bool:
        return self.current is State.HEALTHY

    def set_healthy(self) -> None:
        """Setup and warmup are done; only moves forward from ``STARTING``."""
        if self.current is State.STARTING:
            self.state.value = State.HEALTHY

    def begin_drain(self) -> bool:
        """Start the drain (SIGTERM). Returns False if a drain or failure already began."""
        if self.draining.is_set():
            return False
        self.drain_deadline = trio.current_time() + self.grace_period
        self.draining.set()
        if self.current in (State.STARTING, State.HEALTHY):
            self.state.value = State.DRAINING
        return True

    def begin_stopping(self) -> None:
        """The drain is over; ``shutdown()`` runs next."""
        if self.current is not State.UNHEALTHY:
            self.state.value = State.STOPPING

    def fail(self, reason: str) -> None:
        """A fatal fault: turn unhealthy; the process will exit non-zero."""
        if self.fatal_reason is None:
            self.fatal_reason = reason
        self.state.value = State.UNHEALTHY
        self.draining.set()
        if math.isinf(self.drain_deadline):
            self.drain_deadline = trio.current_time() + self.grace_period

    def time_left(self) -> float:
        """Seconds until the drain deadline (inf before SIGTERM)."""
        return self.drain_deadline - trio.current_time()
