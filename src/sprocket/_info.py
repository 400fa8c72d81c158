"""``emit_info``: progress from inside ``predict()``, merged into the running job's info.

The job in flight is found through a context variable, so ``emit_info`` works on the predict
thread (Trio copies the context into it), on the asyncio loop thread and in a torchrun rank, and
needs no process-wide state.
"""

from __future__ import annotations

import contextvars
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["MAX_INFO_BYTES", "InfoBuffer", "InfoSink", "emit_info", "info_sink"]

MAX_INFO_BYTES = 4096


class InfoSink(Protocol):
    """Where ``emit_info`` sends validated updates for the current job."""

    def update(self, info: dict[str, Any]) -> None: ...


_current_sink: contextvars.ContextVar[InfoSink | None] = contextvars.ContextVar(
    "sprocket_info_sink", default=None
)


# One encoder for all calls: json.dumps with options builds a new encoder every time, which
# would dominate the cost of a predict that emits at every step.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _surely_small(info: dict[Any, Any]) -> bool:
    """True when ``info`` is a flat dict of JSON scalars whose encoding is certainly under the
    limit, judged from an upper bound on its size without encoding it (the common progress
    update). False means "encode it to know", never "invalid"."""
    size = 2
    for key, value in info.items():
        if type(key) is not str:
            return False
        # A character takes at most 6 bytes in JSON (an escape like \u001f).
        size += 6 * len(key) + 4
        kind = type(value)
        if value is None or kind is bool:
            size += 5
        elif kind is str:
            size += 6 * len(value) + 2
        elif kind is float:
            if value != value or value in (_INF, -_INF):
                return False
            size += 32
        elif kind is int:
            size += value.bit_length() // 3 + 2
        else:
            return False
        if size >= MAX_INFO_BYTES:
            return False
    return True


_INF = float("inf")


def validate_info(info: object) -> dict[str, Any]:
    """Check an ``emit_info`` argument: a JSON object under ``MAX_INFO_BYTES`` bytes."""
    if not isinstance(info, dict):
        raise ValueError(f"emit_info() takes a dict, not {type(info).__name__}")
    if _surely_small(info):
        return info
    try:
        encoded = _ENCODER.encode(info)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"emit_info() needs a JSON-serialisable dict: {exc}") from None
    size = len(encoded.encode())
    if size >= MAX_INFO_BYTES:
        raise ValueError(
            f"emit_info() payload is {size} bytes of JSON; it must be under {MAX_INFO_BYTES}"
        )
    return info


def emit_info(info: dict[str, Any]) -> None:
    """Merge ``info`` into the running job's info; later keys overwrite earlier ones.

    Never blocks: updates are buffered and sent at a bounded rate by the runtime. Call it from
    ``predict()`` or code that runs in its thread. Raises ``ValueError`` for a non-dict or for
    JSON of 4,096 bytes or more, and ``RuntimeError`` when no job is running in this context.
    """
    checked = validate_info(info)
    sink = _current_sink.get()
    if sink is None:
        raise RuntimeError(
            "emit_info() was called outside a job: call it from predict() or from code running "
            "in predict()'s thread (threads you start yourself need "
            "contextvars.copy_context().run(...) to see the job)"
        )
    sink.update(checked)


@contextmanager
def info_sink(sink: InfoSink) -> Iterator[None]:
    """Make ``sink`` the target of ``emit_info`` in this context (and threads started from it)."""
    token = _current_sink.set(sink)
    try:
        yield
    finally:
        _current_sink.reset(token)


class InfoBuffer:
    """The merged info of one job, filled from any thread, drained by the flusher.

    ``update`` takes a lock only for a dict merge and calls ``on_dirty`` once per batch (when
    the pending updates go from empty to non-empty), so a predict that emits 100,000 updates
    wakes the flusher only as often as the flusher drains the batch.
    """

    def __init__(self, on_dirty: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._merged: dict[str, Any] = {}
        self._on_dirty = on_dirty
        self.updates = 0

    def update(self, info: dict[str, Any]) -> None:
        with self._lock:
            was_clean = not self._pending
            self._pending.update(info)
            self._merged.update(info)
            self.updates += 1
        if was_clean and info and self._on_dirty is not None:
            self._on_dirty()

    def take_pending(self) -> dict[str, Any]:
        """Return and clear the updates not yet sent ({} if none)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def restore_pending(self, info: dict[str, Any]) -> None:
        """Put back updates whose send failed, under any newer values for the same keys."""
        with self._lock:
            self._pending = {**info, **self._pending}

    def merged(self) -> dict[str, Any]:
        """A copy of everything emitted so far, merged."""
        with self._lock:
            return dict(self._merged)
