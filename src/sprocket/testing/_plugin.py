"""pytest plugin of sprocket.testing (registered through the pytest11 entry point).

Fixtures (async ones need pytest-trio, e.g. ``trio_mode = true``; they work with and without
its ``autojump_clock``):

- ``fake_queue``: a running ``FakeQueue`` (model ``"sprocket-test"``, lease reaper on), its
  storage under the test's ``tmp_path``.
- ``sprocket_worker``: a factory ``sprocket_worker(my_sprocket, **options)`` returning the
  ``run_worker`` async context manager bound to ``fake_queue`` with a fresh work folder.
- ``virtual_sleep``: ``time.sleep`` in the worker's threads takes virtual time for the test.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from .._api import AsyncSprocket, Sprocket
from ._fake_queue import FakeQueue
from ._harness import WorkerHandle, run_worker
from ._sleep import patch_time_sleep

__all__ = ["WorkerFactory", "fake_queue", "sprocket_worker", "virtual_sleep"]

#: ``sprocket_worker(sprocket, name=None, **run_worker_options)``.
WorkerFactory = Callable[..., AbstractAsyncContextManager[WorkerHandle]]


@pytest.fixture
async def fake_queue(tmp_path: Path) -> AsyncIterator[FakeQueue]:
    """A ``FakeQueue`` with its lease reaper running for the whole test."""
    async with FakeQueue(storage_dir=tmp_path / "fake-queue-storage") as queue:
        yield queue


@pytest.fixture
def sprocket_worker(fake_queue: FakeQueue, tmp_path: Path) -> WorkerFactory:
    """A factory of ``run_worker`` contexts against ``fake_queue``, one work folder each."""
    counter = itertools.count(1)

    def start(
        sprocket: Sprocket | AsyncSprocket, name: str | None = None, **options: Any
    ) -> AbstractAsyncContextManager[WorkerHandle]:
        options.setdefault("queue", fake_queue)
        options.setdefault("work_dir", tmp_path / f"worker-{next(counter)}")
        return run_worker(sprocket, name, **options)

    return start


@pytest.fixture
def virtual_sleep() -> Iterator[None]:
    """Make ``time.sleep`` in the worker's threads virtual for this test (real elsewhere)."""
    with patch_time_sleep():
        yield
