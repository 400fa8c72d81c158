"""Predictors: how the user's ``setup``/``predict``/``shutdown`` run without blocking Trio.

``SyncPredictor`` runs them in worker threads; ``AsyncPredictor`` on one asyncio loop thread
that lives as long as the predictor. The torchrun supervisor provides a third kind with the same
interface. Each call states its cancellation semantics.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol, TypeVar

import trio

from ._api import AsyncSprocket, InputOutputProcessor, Sprocket
from ._info import InfoSink, info_sink

__all__ = ["AsyncPredictor", "Predictor", "SyncPredictor", "ThreadRunner", "make_predictor"]

T = TypeVar("T")

#: Runs a blocking callable off the event loop. The testing kit swaps in one that keeps the
#: mock clock from jumping while the thread computes.
ThreadRunner = Callable[[Callable[[], Any]], Awaitable[Any]]

#: How long a cancelled asyncio predict may take to unwind before we stop waiting for it.
ASYNC_CANCEL_GRACE = 5.0


async def default_thread_runner(fn: Callable[[], T]) -> T:
    """``trio.to_thread.run_sync`` that returns at once when cancelled (the thread runs on)."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


class Predictor(Protocol):
    """What the runtime needs from a worker implementation.

    ``processor`` and ``warmup_inputs`` come from the user's class. ``stuck`` is true while a
    cancelled predict is still running somewhere we cannot stop (a thread), which makes the
    worker unhealthy.
    """

    processor: InputOutputProcessor
    warmup_inputs: list[dict[str, Any]]

    async def __aenter__(self) -> Predictor: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def setup(self) -> None: ...

    async def predict(self, args: dict[str, Any], sink: InfoSink) -> Any: ...

    async def shutdown(self) -> None: ...

    @property
    def stuck(self) -> bool: ...

    @property
    def interruptible(self) -> bool:
        """Whether cancelling ``predict`` really stops it (asyncio) or only abandons it."""
        ...


class _Base:
    def __init__(self, user: Sprocket | AsyncSprocket) -> None:
        self.user = user
        self.processor = type(user).processor()
        self.warmup_inputs = [dict(args) for args in type(user).warmup_inputs]

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    @property
    def stuck(self) -> bool:
        return False

    @property
    def interruptible(self) -> bool:
        return False


class SyncPredictor(_Base):
    """Runs a ``Sprocket``'s methods in worker threads, one call at a time.

    Cancelling a call returns at once, but the thread cannot be stopped: it keeps running and
    ``stuck`` stays true until it finishes.
    """

    def __init__(self, user: Sprocket, run_thread: ThreadRunner = default_thread_runner) -> None:
        super().__init__(user)
        self._sync_user = user
        self._run_thread = run_thread
        self._running: threading.Event | None = None

    @property
    def stuck(self) -> bool:
        return self._running is not None and not self._running.is_set()

    async def _call(self, fn: Callable[[], T]) -> T:
        finished = threading.Event()

        def target() -> T:
            try:
                return fn()
            finally:
                finished.set()

        try:
            result: T = await self._run_thread(target)
        except trio.Cancelled:
            if not finished.is_set():
                self._running = finished
            raise
        return result

    async def setup(self) -> None:
        await self._call(self._sync_user.setup)

    async def predict(self, args: dict[str, Any], sink: InfoSink) -> Any:
        with info_sink(sink):
            return await self._call(lambda: self._sync_user.predict(args))

    async def shutdown(self) -> None:
        await self._call(self._sync_user.shutdown)


class AsyncPredictor(_Base):
    """Runs an ``AsyncSprocket``'s coroutines on a dedicated asyncio loop thread.

    The loop starts in ``__aenter__`` and stops in ``__aexit__``. Cancelling a call cancels the
    asyncio task and waits up to ``ASYNC_CANCEL_GRACE`` seconds for it to unwind.
    """

    def __init__(self, user: AsyncSprocket) -> None:
        super().__init__(user)
        self._async_user = user
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._unfinished = 0

    @property
    def stuck(self) -> bool:
        return self._unfinished > 0

    @property
    def interruptible(self) -> bool:
        return True

    async def __aenter__(self) -> AsyncPredictor:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="sprocket-asyncio", daemon=True
        )
        self._thread.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        # A stuck coroutine may keep the loop from stopping; the thread is a daemon then.
        await trio.to_thread.run_sync(thread.join, 5.0, abandon_on_cancel=True)
        if not thread.is_alive():
            loop.close()

    async def _call(self, make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("AsyncPredictor used outside 'async with'")
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        context = contextvars.copy_context()
        tasks: list[asyncio.Task[T]] = []

        def notify(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(finished.set)

        def start() -> None:
            task = loop.create_task(make_coro(), context=context)
            task.add_done_callback(notify)
            tasks.append(task)

        loop.call_soon_threadsafe(start)
        try:
            await finished.wait()
        except trio.Cancelled:
            loop.call_soon_threadsafe(lambda: [t.cancel() for t in tasks])
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + ASYNC_CANCEL_GRACE
                self._unfinished += 1
                await finished.wait()
                self._unfinished -= 1
            raise
        return tasks[0].result()

    async def setup(self) -> None:
        await self._call(self._async_user.setup)

    async def predict(self, args: dict[str, Any], sink: InfoSink) -> Any:
        with info_sink(sink):
            return await self._call(lambda: self._async_user.predict(args))

    async def shutdown(self) -> None:
        await self._call(self._async_user.shutdown)


def make_predictor(
    user: Sprocket | AsyncSprocket, run_thread: ThreadRunner = default_thread_runner
) -> Predictor:
    """The predictor for ``user``'s kind of sprocket; a clear ``TypeError`` for anything else."""
    if isinstance(user, AsyncSprocket):
        for method in ("setup", "predict", "shutdown"):
            if not inspect.iscoroutinefunction(getattr(user, method)):
                raise TypeError(f"{type(user).__name__}.{method} must be 'async def'")
        return AsyncPredictor(user)
    if isinstance(user, Sprocket):
        if inspect.iscoroutinefunction(user.predict):
            raise TypeError(
                f"{type(user).__name__}.predict is 'async def': subclass sprocket.AsyncSprocket"
            )
        return SyncPredictor(user, run_thread)
    raise TypeError(
        f"sprocket.run() takes a sprocket.Sprocket or sprocket.AsyncSprocket instance, "
        f"not {type(user).__name__}"
    )
