"""The public surface, emit_info, settings, and the asyncio predictor."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import sprocket
from sprocket._config import Settings
from sprocket._errors import ConfigurationError
from sprocket._executor import AsyncPredictor, SyncPredictor, make_predictor
from sprocket._info import MAX_INFO_BYTES, InfoBuffer, _surely_small, info_sink, validate_info


def test_public_names_are_pinned() -> None:
    assert sorted(sprocket.__all__) == [
        "AsyncSprocket",
        "FileOutput",
        "InputOutputProcessor",
        "Sprocket",
        "__version__",
        "emit_info",
        "run",
    ]
    public = {n for n in dir(sprocket) if n.isidentifier() and not n.startswith("_")}
    public -= {"testing"}  # the test kit is a subpackage, imported on its own
    assert public <= set(sprocket.__all__)


def test_file_output_is_a_posix_path() -> None:
    out = sprocket.FileOutput("/tmp/x.bin")
    assert isinstance(out, Path) and out.name == "x.bin"


def test_defaults_match_the_sdk() -> None:
    assert sprocket.Sprocket.processor is sprocket.InputOutputProcessor
    assert sprocket.Sprocket.warmup_inputs == []
    assert sprocket.AsyncSprocket.warmup_inputs == []


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ([1, 2], "takes a dict"),
        ("progress", "takes a dict"),
        ({"x": object()}, "JSON-serialisable"),
        ({"x": float("nan")}, "JSON-serialisable"),
        ({"blob": "x" * MAX_INFO_BYTES}, "must be under 4096"),
    ],
)
def test_emit_info_rejects_bad_info(info: Any, message: str) -> None:
    with info_sink(InfoBuffer()), pytest.raises(ValueError, match=message):
        sprocket.emit_info(info)


def test_emit_info_size_limit_is_exclusive() -> None:
    buffer = InfoBuffer()
    overhead = len('{"b":""}')
    with info_sink(buffer):
        sprocket.emit_info({"b": "x" * (MAX_INFO_BYTES - overhead - 1)})
        with pytest.raises(ValueError):
            sprocket.emit_info({"b": "x" * (MAX_INFO_BYTES - overhead)})


def test_emit_info_outside_a_job_says_so() -> None:
    with pytest.raises(RuntimeError, match="outside a job"):
        sprocket.emit_info({"progress": 0.5})


def test_emit_info_merges_later_keys_over_earlier() -> None:
    dirty: list[int] = []
    buffer = InfoBuffer(on_dirty=lambda: dirty.append(1))
    with info_sink(buffer):
        sprocket.emit_info({"progress": 0.1, "status": "a"})
        sprocket.emit_info({"progress": 0.2})
    assert buffer.merged() == {"progress": 0.2, "status": "a"}
    assert dirty == [1]  # one wake-up per batch, not per call
    assert buffer.take_pending() == {"progress": 0.2, "status": "a"}
    assert buffer.take_pending() == {}


def test_settings_from_env_parses_and_names_bad_values() -> None:
    s = Settings.from_env(
        {"TERMINATION_GRACE_PERIOD_SECONDS": "30", "SPROCKET_REQUEUE_ON_SHUTDOWN": "yes"},
        name="m",
    )
    assert s.grace_period == 30 and s.prediction_timeout == 29 and s.requeue_on_shutdown
    assert s.heartbeat_interval == 30
    with pytest.raises(ConfigurationError, match="SPROCKET_CLAIM_TIMEOUT_SECONDS"):
        Settings.from_env({"SPROCKET_CLAIM_TIMEOUT_SECONDS": "-1"}, name="m")
    with pytest.raises(ConfigurationError, match="SPROCKET_LOG_FORMAT"):
        Settings.from_env({"SPROCKET_LOG_FORMAT": "xml"}, name="m")


def test_make_predictor_checks_the_kind() -> None:
    class Sync(sprocket.Sprocket):
        def predict(self, args: dict[str, Any]) -> dict[str, Any]:
            return {}

    class WrongAsync(sprocket.Sprocket):
        async def predict(self, args: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
            return {}

    assert isinstance(make_predictor(Sync()), SyncPredictor)
    with pytest.raises(TypeError, match="AsyncSprocket"):
        make_predictor(WrongAsync())
    with pytest.raises(TypeError, match=r"sprocket\.Sprocket"):
        make_predictor(object())  # type: ignore[arg-type]


class Engine(sprocket.AsyncSprocket):
    """An asyncio engine: one loop for the whole process, cancellable predicts."""

    async def setup(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.cancelled = asyncio.Event()

    async def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        assert asyncio.get_running_loop() is self.loop
        sprocket.emit_info({"step": 1})
        if args.get("hang"):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return {"echo": args.get("x")}


async def test_async_sprocket_runs_on_one_asyncio_loop_and_cancels() -> None:
    engine = Engine()
    predictor = make_predictor(engine)
    assert isinstance(predictor, AsyncPredictor) and predictor.interruptible
    async with predictor:
        await predictor.setup()
        info = InfoBuffer()
        assert await predictor.predict({"x": 1}, info) == {"echo": 1}
        assert await predictor.predict({"x": 2}, info) == {"echo": 2}
        assert info.merged() == {"step": 1}
        with trio.move_on_after(0.2) as scope:
            await predictor.predict({"hang": True}, info)
        assert scope.cancelled_caught
        assert engine.cancelled.is_set()
        assert not predictor.stuck
        await predictor.shutdown()


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=800)
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=300), _scalars, max_size=12))
def test_emit_info_fast_path_agrees_with_encoding(info: dict[str, Any]) -> None:
    try:
        encoded = json.dumps(info, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        valid = len(encoded.encode()) < MAX_INFO_BYTES
    except ValueError:
        valid = False
    if _surely_small(info):
        assert valid
    try:
        validate_info(info)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == valid
