"""The async face of the store: offloading, long-poll wake-ups and the lease reaper."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol, TypeVar

import trio

from ._store import Job, Metrics, QueueStore

__all__ = [
    "DEFAULT_CLAIM_TIMEOUT",
    "MAX_POLL_TIMEOUT",
    "Offload",
    "QueueService",
    "run_inline",
    "thread_offload",
]

T = TypeVar("T")

#: Lease length (seconds) when a worker's claim request names no ``claim_timeout``.
DEFAULT_CLAIM_TIMEOUT = 300.0
#: Upper bound on how long one ``retrieve`` long-poll may be held open (seconds).
MAX_POLL_TIMEOUT = 60.0


class Offload(Protocol):
    """Runs one synchronous store or file operation and returns its result."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


async def run_inline(fn: Callable[[], T], /) -> T:
    """Offload strategy that calls ``fn`` right on the event loop.

    Meant for in-memory stores under a mock clock: a thread would look "blocked" to Trio and let
    an autojump clock leap ahead.
    """
    return fn()


def thread_offload(limiter: trio.CapacityLimiter | None = None) -> Offload:
    """Offload strategy that runs each call in a worker thread, so commits never stall the loop.

    The store serializes itself with a lock; a limiter of one (the default) keeps a burst of
    requests from parking dozens of threads on that lock.
    """
    lim = limiter if limiter is not None else trio.CapacityLimiter(1)

    async def offload(fn: Callable[[], T], /) -> T:
        return await trio.to_thread.run_sync(fn, limiter=lim)

    return offload


class QueueService:
    """Queue operations for the HTTP layer, waking long-polling workers in-process.

    Every store call goes through ``offload``. Wake-ups use one :class:`trio.Event` per model,
    replaced each time it fires, so a waiter that looked for a job and found none cannot miss a
    submit that lands before it starts waiting.
    """

    def __init__(
        self,
        store: QueueStore,
        *,
        offload: Offload = run_inline,
        default_claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
        max_poll_timeout: float = MAX_POLL_TIMEOUT,
    ) -> None:
        self.store = store
        self.offload = offload
        self.default_claim_timeout = default_claim_timeout
        self.max_poll_timeout = max_poll_timeout
        self._job_events: dict[str, trio.Event] = {}
        self._lease_event = trio.Event()
        self._reaper_target = math.inf
        self._polls_closed = False

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await self.offload(fn)
        finally:
            # Wake-ups are collected by the store (it may run in a thread, where Trio objects
            # must not be touched) and delivered here, back on the loop.
            self._deliver_wakeups()

    def _deliver_wakeups(self) -> None:
        for model in self.store.take_wakeups():
            event = self._job_events.pop(model, None)
            if event is not None:
                event.set()

    def _job_event(self, model: str) -> trio.Event:
        event = self._job_events.get(model)
        if event is None:
            event = self._job_events[model] = trio.Event()
        return event

    # -- client side --------------------------------------------------------------------------

    async def submit(
        self, model: str, payload: dict[str, Any], *, info: dict[str, Any] | None, priority: int
    ) -> str:
        """Store a job; returns its request id after the commit."""
        return await self._call(
            lambda: self.store.submit(model, payload, info=info, priority=priority)
        )

    async def get(self, model: str | None, request_id: str) -> Job:
        """Return a job (raises :class:`~._store.JobNotFound`)."""
        return await self._call(lambda: self.store.get(model, request_id))

    async def cancel(self, model: str, request_id: str, *, running: bool) -> Job:
        """Cancel a pending (or, opted in, running) job; returns the job afterwards."""
        return await self._call(lambda: self.store.cancel(model, request_id, running=running))

    async def clear(self, model: str) -> int:
        """Cancel all pending jobs of a model."""
        return await self._call(lambda: self.store.clear(model))

    async def metrics(self, model: str) -> Metrics:
        """Queue depth of a model."""
        return await self._call(lambda: self.store.metrics(model))

    # -- worker side --------------------------------------------------------------------------

    async def claim(
        self,
        model: str,
        *,
        wait: float,
        claim_timeout: float | None = None,
        hostname: str | None = None,
    ) -> Job | None:
        """Claim a job, waiting up to ``wait`` seconds for one to arrive (``None`` if none did)."""
        lease = self.default_claim_timeout if claim_timeout is None else claim_timeout
        deadline = trio.current_time() + min(max(wait, 0.0), self.max_poll_timeout)
        while True:
            if self._polls_closed:
                return None  # shutting down: hand out nothing that might not be delivered
            # Take the event before looking: a submit between the look and the wait sets it.
            event = self._job_event(model)
            job = await self._call(
                lambda: self.store.claim(model, claim_timeout=lease, hostname=hostname)
            )
            if job is not None:
                expiry = job.lease_expires_at
                if expiry is not None and expiry < self._reaper_target:
                    # The reaper sleeps towards a later expiry; make it look again.
                    self._lease_event.set()
                    self._lease_event = trio.Event()
                return job
            with trio.move_on_at(deadline):
                await event.wait()
                continue
            return None

    def close_polls(self) -> None:
        """Answer every waiting (and later) long-poll at once, for a quick graceful shutdown."""
        self._polls_closed = True
        events, self._job_events = self._job_events, {}
        for event in events.values():
            event.set()

    async def update(
        self,
        model: str,
        request_id: str,
        status: Literal["running", "done", "failed"],
        *,
        payload: dict[str, Any] | None,
        info: dict[str, Any] | None,
        claim_id: str | None,
    ) -> Job:
        """Apply a worker's status update (raises JobNotFound / JobConflict)."""
        return await self._call(
            lambda: self.store.update(
                model, request_id, status, payload=payload, info=info, claim_id=claim_id
            )
        )

    async def run_reaper(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Expire leases as they fall due, forever, waking workers for requeued jobs.

        Correctness does not depend on this task (every store call expires due leases first); it
        makes an expired job reach waiting workers without any client traffic.
        """
        task_status.started()
        while True:
            lease_event = self._lease_event
            next_expiry = await self._call(self.store.next_lease_expiry)
            self._reaper_target = math.inf if next_expiry is None else next_expiry
            delay = self._reaper_target - self.store.clock()
            if delay > 0:
                with trio.move_on_after(delay):
                    # A new claim may expire before the one we are sleeping towards.
                    await lease_event.wait()
                    continue
            await self._call(self.store.expire_leases)
