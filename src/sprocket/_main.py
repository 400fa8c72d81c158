"""``sprocket.run``: the command line of a user's worker script."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import NoReturn

import trio

from ._api import AsyncSprocket, Sprocket
from ._config import Settings
from ._errors import ConfigurationError
from ._events import EventLog
from ._executor import Predictor
from ._info import InfoBuffer
from ._lifecycle import Lifecycle
from ._logging import configure_logging
from ._worker import Worker, build_predictor

__all__ = ["run"]

logger = logging.getLogger("sprocket")

GIL_SWITCH_INTERVAL = 0.001


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run a sprocket worker.")
    parser.add_argument("--queue", action="store_true", help="take jobs from the managed queue")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--host", default="0.0.0.0", help="HTTP host (default 0.0.0.0)")
    return parser


def run(
    sprocket: Sprocket | AsyncSprocket, name: str | None = None, use_torchrun: bool = False
) -> NoReturn:
    """Run ``sprocket`` as this process's worker and exit with its status.

    ``name`` (the deployment name the queue routes by) falls back to
    ``TOGETHER_DEPLOYMENT_NAME``. Reads ``--queue``, ``--port`` and ``--host`` from the command
    line and the settings of ``docs/configuration.md`` from the environment. Exits 0 after a
    clean drain, 1 after a fatal fault, 2 for bad configuration.
    """
    if use_torchrun and "LOCAL_RANK" in os.environ:
        from ._rank import run_rank

        if not isinstance(sprocket, Sprocket):
            _fail("use_torchrun=True needs a sprocket.Sprocket subclass")
        run_rank(sprocket)
    args, unknown = _parser().parse_known_args(sys.argv[1:])
    resolved = name or os.environ.get("TOGETHER_DEPLOYMENT_NAME")
    if not resolved:
        _fail(
            "no deployment name: pass it as sprocket.run(MyModel(), 'my-org/my-model') "
            "or set TOGETHER_DEPLOYMENT_NAME"
        )
    try:
        settings = Settings.from_env(
            name=resolved, queue=args.queue, host=args.host, port=args.port
        )
    except ConfigurationError as exc:
        _fail(str(exc))
    configure_logging(settings.log_format, settings.log_level)
    # A CPU-bound predict holds the GIL; the event loop waits for it up to the switch interval
    # at each wake-up. 1 ms instead of 5 ms keeps /health fast and costs predict next to nothing
    # (the loop thread asks for the GIL only when it has work).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    if unknown:
        logger.info("ignoring arguments sprocket does not know: %s", " ".join(unknown))
    main: Callable[[], Awaitable[int]]
    try:
        if settings.run_and_exit is not None:
            lifecycle = Lifecycle(settings.grace_period)
            predictor = build_predictor(sprocket, settings, lifecycle, EventLog(), use_torchrun)
            main = partial(run_and_exit, predictor, settings.run_and_exit)
        else:
            main = Worker(sprocket, settings, use_torchrun=use_torchrun).run
    except (TypeError, ConfigurationError) as exc:
        _fail(str(exc))
    _exit(trio.run(main))


async def run_and_exit(predictor: Predictor, rounds: int) -> int:
    """``RUN_AND_EXIT=N``: set up, predict each warmup input N times, print the timings."""
    if not predictor.warmup_inputs:
        print("RUN_AND_EXIT needs warmup_inputs on the sprocket class", file=sys.stderr)
        return 2
    async with predictor:
        started = trio.current_time()
        await predictor.setup()
        print(f"cold start: {trio.current_time() - started:.3f} s", flush=True)
        for round_ in range(1, rounds + 1):
            for index, args in enumerate(predictor.warmup_inputs):
                t0 = trio.current_time()
                await predictor.predict(dict(args), InfoBuffer())
                took = trio.current_time() - t0
                print(f"predict round {round_} input {index}: {took:.3f} s", flush=True)
        await predictor.shutdown()
    return 0


def _fail(message: str) -> NoReturn:
    print(f"sprocket: error: {message}", file=sys.stderr)
    sys.exit(2)


def _exit(code: int) -> NoReturn:
    """Exit with ``code``; threads we could not stop (an overrun predict) do not delay it."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    if any(not t.daemon for t in others):
        os._exit(code)
    sys.exit(code)


def main_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` as ``sprocket.run`` would (for tests)."""
    return _parser().parse_known_args(list(argv))[0]
