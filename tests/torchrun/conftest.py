"""Fixtures for the torchrun tests: a supervisor driven directly, with real torchrun ranks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

import sprocket
from sprocket._config import Settings
from sprocket._events import EventLog
from sprocket._lifecycle import Lifecycle
from sprocket._torchrun import TorchrunPredictor

from .procs import Tree
from .workers import EXAMPLE, START_TIMEOUT


class SinkStub(sprocket.Sprocket):
    """What the parent sees of the example: its class attributes, never its code."""

    warmup_inputs = [{"empty": True}]


@dataclass
class Supervised:
    predictor: TorchrunPredictor
    lifecycle: Lifecycle
    events: EventLog
    tree: Tree = field(default_factory=Tree)

    def pids(self, event: str) -> list[int]:
        return [e.fields["pid"] for e in self.events.events if e.name == event]

    def snapshot(self) -> None:
        """Record torchrun and every rank (with their children) as the tree to check."""
        for pid in self.pids("torchrun_started") + self.pids("rank_connected"):
            self.tree.add_root(pid)


@pytest.fixture
def marker_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where each rank's ``shutdown()`` leaves ``shutdown-<rank>`` (ranks inherit the env)."""
    path = tmp_path / "markers"
    path.mkdir()
    monkeypatch.setenv("TORCHRUN_SINK_MARKER_DIR", str(path))
    return path


@pytest.fixture
def supervise() -> Iterator[Callable[..., contextlib.AbstractAsyncContextManager[Supervised]]]:
    """``async with supervise(**kwargs) as s:`` enters a TorchrunPredictor on the example."""
    made: list[Supervised] = []

    @contextlib.asynccontextmanager
    async def enter(world_size: int = 2, **kwargs: Any) -> AsyncIterator[Supervised]:
        settings = Settings(name="torchrun-sink", world_size=world_size, grace_period=30.0)
        lifecycle, events = Lifecycle(settings.grace_period), EventLog()
        kwargs.setdefault("entrypoint", [str(EXAMPLE)])
        predictor = TorchrunPredictor(SinkStub(), settings, lifecycle, events, **kwargs)
        s = Supervised(predictor, lifecycle, events)
        made.append(s)
        with trio.fail_after(START_TIMEOUT):
            async with predictor:
                s.snapshot()
                yield s
                s.snapshot()

    yield enter
    for s in made:
        s.tree.kill_all()
