"""Running a synchronous ``predict`` in a thread under Trio's mock clock.

The rule: Trio's autojump clock advances whenever no Trio task can run, and a task waiting on a
thread counts as blocked, so virtual time would race ahead while ``predict`` computes. The
``VirtualThreads`` runner closes that gap: while the user's thread runs real code, a Trio task
stays runnable and virtual time stands still; the thread lets virtual time pass only inside
``sleep()`` or ``wait()`` below, which block it on the Trio side. Real time spent in predict
therefore takes no virtual time, and virtual time passes only where the test says so.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

__all__ = ["Gate", "VirtualThreads", "sleep", "wait"]

T = TypeVar("T")


class _Call:
    """One thread started by the runner; ``computing`` is false while it waits in Trio."""

    def __init__(self, runner: VirtualThreads) -> None:
        self.runner = runner
        self.computing = True


_current_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "sprocket_virtual_thread", default=None
)


class VirtualThreads:
    """A thread runner for ``Worker`` that keeps the mock clock still while threads compute.

    Cancellation: like the default runner, a cancelled call returns at once and the thread
    runs on (it is abandoned, and no longer holds the clock); the worker counts it as stuck.
    """

    def __init__(self) -> None:
        self._calls: set[_Call] = set()
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _hold_clock(self) -> None:
        while True:
            if any(call.computing for call in self._calls):
                await trio.lowlevel.checkpoint()
            else:
                await self._changed.wait()

    async def __call__(self, fn: Callable[[], T]) -> T:
        call = _Call(self)
        token = _current_call.set(call)
        self._calls.add(call)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._hold_clock)
                try:
                    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._calls.discard(call)
            self._notify()
            _current_call.reset(token)


async def _idle_while(call: _Call, waiter: Callable[[], Awaitable[object]]) -> None:
    # Runs on the Trio side, so "not computing" and the wait begin atomically: virtual time
    # cannot jump in between.
    call.computing = False
    call.runner._notify()
    try:
        await waiter()
    finally:
        call.computing = True
        call.runner._notify()


class Gate:
    """A gate a test opens to let a waiting predict go on: ``gate.open()`` from Trio code."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def open(self) -> None:
        self._event.set()

    @property
    def is_open(self) -> bool:
        return self._event.is_set()

    async def wait_open(self) -> None:
        await self._event.wait()


def _current() -> _Call:
    call = _current_call.get()
    if call is None:
        raise RuntimeError(
            "sprocket.testing.sleep()/wait() work only in code run by a worker under "
            "sprocket.testing (run_worker), in predict's thread"
        )
    return call


def sleep(seconds: float) -> None:
    """From predict's thread: let ``seconds`` of virtual time pass (instant under autojump)."""
    call = _current()

    async def pause() -> None:
        await trio.sleep(seconds)

    trio.from_thread.run(_idle_while, call, pause)


def wait(gate: Gate) -> None:
    """From predict's thread: block until the test calls ``gate.open()``."""
    trio.from_thread.run(_idle_while, _current(), gate.wait_open)
