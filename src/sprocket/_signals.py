"""The signal watcher: SIGTERM and SIGINT start the drain; repeats change nothing."""

from __future__ import annotations

import signal

import trio

from ._events import EventLog
from ._lifecycle import Lifecycle

__all__ = ["deliver", "watch_signals"]


async def watch_signals(
    lifecycle: Lifecycle,
    events: EventLog,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Turn each SIGTERM/SIGINT into ``lifecycle.begin_drain()``; runs until cancelled.

    The handlers are installed before ``task_status.started()``, so a signal that arrives
    after start-up is never lost to Python's default handler.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            deliver(lifecycle, events, signal.Signals(signum).name)


def deliver(lifecycle: Lifecycle, events: EventLog, name: str = "SIGTERM") -> None:
    """Act on a termination signal: begin the drain (once) and record it."""
    first = lifecycle.begin_drain()
    events.record("signal", signal=name, drain_started=first, deadline_in=lifecycle.time_left())
