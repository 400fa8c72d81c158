"""The ordered record of what the worker did, shared by logs, tests and the testing kit."""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import trio

__all__ = ["Event", "EventLog"]

logger = logging.getLogger("sprocket")


@dataclasses.dataclass(frozen=True)
class Event:
    """One lifecycle or job event: its name, Trio time, and small log-safe fields."""

    name: str
    time: float
    fields: dict[str, Any]


class EventLog:
    """Records events in order and logs each one as one line carrying the request id.

    ``keep`` bounds memory in long-lived workers; tests read ``events`` and ``names()``.
    """

    def __init__(self, keep: int = 10_000) -> None:
        self.events: collections.deque[Event] = collections.deque(maxlen=keep)
        self.counts: collections.Counter[str] = collections.Counter()
        self._changed: trio.Event | None = None

    def record(self, name: str, level: int = logging.INFO, **fields: Any) -> None:
        self.events.append(Event(name, _now(), fields))  # the oldest fall off past ``keep``
        self.counts[name] += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        if logger.isEnabledFor(level):
            logger.log(level, "%s", name, extra={"sprocket_event": name, "sprocket_fields": fields})

    async def wait_count(self, name: str, count: int = 1) -> None:
        """Wait until ``name`` has been recorded ``count`` times in all (call from Trio)."""
        while self.counts[name] < count:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()

    def names(self, *, request_id: str | None = None) -> list[str]:
        return [
            e.name
            for e in self.events
            if request_id is None or e.fields.get("request_id") == request_id
        ]


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:
        return float("nan")
