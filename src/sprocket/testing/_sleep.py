"""Making a predict's ``time.sleep`` virtual, for code that cannot call ``testing.sleep``."""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Iterator
from typing import SupportsIndex

from ._threads import _current_call, sleep

__all__ = ["patch_time_sleep"]

_real_sleep = time.sleep


def _sleep_virtually_in_workers(seconds: float | SupportsIndex) -> None:
    # Only threads started by VirtualThreads (setup/predict/shutdown under run_worker) have a
    # current call; any other thread in the process keeps sleeping in real time.
    if _current_call.get() is None:
        _real_sleep(seconds)
    else:
        sleep(seconds if isinstance(seconds, float | int) else operator.index(seconds))


@contextlib.contextmanager
def patch_time_sleep() -> Iterator[None]:
    """Within the block, ``time.sleep`` in the worker's threads takes virtual time.

    It replaces ``time.sleep`` process-wide, so code that did ``import time`` sees it; calls
    from any thread not run by ``VirtualThreads`` (and code that did
    ``from time import sleep`` before the patch) still sleep for real. The pytest fixture
    ``virtual_sleep`` does the same for one test.
    """
    original = time.sleep
    time.sleep = _sleep_virtually_in_workers
    try:
        yield
    finally:
        time.sleep = original
