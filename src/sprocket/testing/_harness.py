"""``run_worker``: the real runtime, in-process, against a ``FakeQueue``, on the mock clock.

Nothing here re-implements the worker: ``run_worker`` builds the same ``Worker`` that
``sprocket.run`` builds in queue mode and runs ``Worker.run`` in a nursery. It only swaps the
seams meant for tests: the HTTP transport (the fake queue), the DNS resolver (the fake's) and
the thread runner (``VirtualThreads``, so a synchronous predict can take virtual time).
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .._api import AsyncSprocket, Sprocket
from .._config import Settings
from .._events import Event
from .._executor import ThreadRunner
from .._lifecycle import State
from .._signals import deliver
from .._worker import Worker
from ._fake_queue import FakeQueue
from ._records import RecordedRequest
from ._threads import VirtualThreads

__all__ = ["WorkerHandle", "run_worker"]


class WorkerHandle:
    """A worker running under ``run_worker``: signal it, watch it, wait for it.

    ``worker`` is the runtime's own ``Worker``; ``events`` its ordered event log.
    """

    def __init__(self, worker: Worker, queue: FakeQueue) -> None:
        self.worker = worker
        self.queue = queue
        self.exit_code: int | None = None
        self.sigterm_at: float | None = None
        #: ``len(queue.requests)`` when the first SIGTERM was delivered.
        self.sigterm_request_index: int | None = None
        self._log = worker.events
        self._exited = trio.Event()

    # -- control ----------------------------------------------------------------------------

    def sigterm(self, signal: str = "SIGTERM") -> None:
        """Do what a real SIGTERM does: ``deliver()`` it to the worker's lifecycle.

        The drain starts now (grace period from this virtual time); repeats change nothing.
        """
        if self.sigterm_at is None:
            self.sigterm_at = trio.current_time()
            self.sigterm_request_index = len(self.queue.requests)
        deliver(self.worker.lifecycle, self.worker.events, signal)

    async def wait_exit(self) -> int:
        """Wait until ``Worker.run`` returned; its exit status (0 drained, 1 fatal).

        Cancellation: only this wait is cancelled; the worker goes on.
        """
        await self._exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    async def wait_state(self, *states: State) -> State:
        """Wait until the lifecycle state is one of ``states`` (or the worker exited).

        Cancellation: only this wait is cancelled; the worker goes on.
        """
        if self.state not in states:
            await self._until_exit_or(
                lambda: self.worker.lifecycle.state.wait_value(lambda s: s in states)
            )
        return self.state

    async def _until_exit_or(self, wait: Callable[[], Awaitable[object]]) -> None:
        # Waiting on the worker alone would hang a test forever if the worker exited first.
        if self._exited.is_set():
            return
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(waiter)
            await self._exited.wait()
            nursery.cancel_scope.cancel()

    async def wait_healthy(self) -> None:
        """Wait until setup and warmup are done and the worker serves (or it gave up)."""
        await self.wait_state(State.HEALTHY, State.DRAINING, State.STOPPING, State.UNHEALTHY)

    async def wait_event(
        self, name: str, *, request_id: str | None = None, count: int = 1
    ) -> Event:
        """Wait until the worker recorded its ``count``-th event ``name``; returns that event.

        Cancellation: only this wait is cancelled; the worker goes on.
        """
        while True:
            found = self.find(name, request_id=request_id)
            if len(found) >= count:
                return found[count - 1]
            if self._exited.is_set():
                raise RuntimeError(
                    f"the worker exited (status {self.exit_code}) before event {name!r}"
                    f" #{count}; events: {self.names()}"
                )
            # Woken by the log itself: polling would move the mock clock.
            seen = self._log.counts[name]
            await self._until_exit_or(functools.partial(self._log.wait_count, name, seen + 1))

    # -- observation ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The lifecycle state now (``State.HEALTHY`` is what /health reports as 200)."""
        return self.worker.lifecycle.current

    @property
    def healthy(self) -> bool:
        return self.worker.lifecycle.healthy

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    @property
    def events(self) -> list[Event]:
        """Every event so far, in order (name, Trio time, fields)."""
        return list(self._log.events)

    def names(self, request_id: str | None = None) -> list[str]:
        """Event names in order, optionally only those of one job."""
        return self._log.names(request_id=request_id)

    def find(self, name: str, *, request_id: str | None = None) -> list[Event]:
        """All events called ``name`` (of one job if ``request_id``)."""
        return [
            e
            for e in self._log.events
            if e.name == name and (request_id is None or e.fields.get("request_id") == request_id)
        ]

    def time_of(self, name: str, *, request_id: str | None = None) -> float:
        """The Trio time of the first event ``name`` (``KeyError`` if none)."""
        found = self.find(name, request_id=request_id)
        if not found:
            raise KeyError(name)
        return found[0].time

    def requests_after_sigterm(self, endpoint: str = "*") -> list[RecordedRequest]:
        """Requests (to ``endpoint``) the queue received after the first ``sigterm()``."""
        if self.sigterm_request_index is None:
            return []
        return [
            r
            for r in self.queue.requests[self.sigterm_request_index :]
            if endpoint == "*" or r.endpoint == endpoint
        ]

    @property
    def shutdown_calls(self) -> int:
        """How many times the user's ``shutdown()`` was called (the contract says once)."""
        return self.worker.shutdown_calls

    async def _run(self, serve_api: bool, task_status: trio.TaskStatus[Worker]) -> None:
        try:
            self.exit_code = await self.worker.run(
                handle_signals=False, serve_api=serve_api, task_status=task_status
            )
        finally:
            self._exited.set()


@contextlib.asynccontextmanager
async def run_worker(
    sprocket: Sprocket | AsyncSprocket,
    name: str | None = None,
    *,
    queue: FakeQueue,
    grace_period: float = 300.0,
    claim_timeout: float = 90.0,
    serve_api: bool = False,
    work_dir: str | Path | None = None,
    thread_runner: ThreadRunner | None = None,
    wait_healthy: bool = True,
    **settings: Any,
) -> AsyncIterator[WorkerHandle]:
    """Run the real worker runtime in queue mode against ``queue``; yield its handle.

    ``name`` is the deployment (model) name, by default ``queue.model``. Other keyword
    arguments are ``Settings`` fields (``report_reserve``, ``requeue_on_shutdown``,
    ``max_download_bytes``, ``info_flush_interval``, ``poll_timeout``...). ``serve_api=True``
    also starts the worker's HTTP server on a real socket at 127.0.0.1 (a free port; see
    ``handle.worker.http_addresses``); by default it stays off, so nothing leaves the process.
    ``work_dir`` defaults to a temporary folder removed afterwards. Unless ``wait_healthy`` is
    false, entering waits until setup and warmup are done.

    Leaving the block normally sends SIGTERM (if the test has not) and waits for the worker to
    drain and exit; leaving it with an exception cancels the worker at once. The queue's lease
    reaper runs meanwhile unless the queue runs one already.
    """
    tmp: str | None = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="sprocket-worker-")
        work_dir = tmp
    try:
        config = Settings(
            name=name or queue.model,
            queue=True,
            host="127.0.0.1",
            port=0,
            grace_period=grace_period,
            claim_timeout=claim_timeout,
            api_base_url=queue.api_base_url,
            api_key=queue.api_key,
            work_dir=Path(work_dir),
            **settings,
        )
        worker = Worker(
            sprocket,
            config,
            transport=queue.transport,
            resolver=queue.resolve,
            thread_runner=thread_runner if thread_runner is not None else VirtualThreads(),
        )
        handle = WorkerHandle(worker, queue)
        async with trio.open_nursery() as nursery:
            if not queue.reaping:
                nursery.start_soon(queue.run_reaper)
            await nursery.start(handle._run, serve_api)
            if wait_healthy:
                await handle.wait_healthy()
            try:
                yield handle
            except BaseException:
                nursery.cancel_scope.cancel()
                raise
            if not handle.exited:
                handle.sigterm()
                await handle.wait_exit()
            nursery.cancel_scope.cancel()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
