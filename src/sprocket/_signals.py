"""The signal watcher: SIGTERM and SIGINT start the drain; repeats change nothing."""

from __future__ import annotations

import signal

import trio

from ._events import EventLog
from ._lifecycle import Lifecycle

__all__ = ["watch_signals"]


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
            first = lifecycle.begin_drain()
            events.record(
                "signal",
                signal=signal.Signals(signum).name,
                drain_started=first,
                deadline_in=lifecycle.time_left(),
            )
