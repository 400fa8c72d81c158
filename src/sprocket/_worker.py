"""The root of the nursery tree: one worker, from start-up to exit.

``Worker.run`` is the one function to read for the shutdown order.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
import trio

from ._api import AsyncSprocket, Sprocket
from ._config import Settings
from ._errors import describe_exception
from ._events import EventLog
from ._executor import Predictor, ThreadRunner, default_thread_runner, make_predictor
from ._http_app import create_app, serve_http
from ._http_jobs import HttpJobs
from ._lifecycle import Lifecycle, State
from ._metrics import Metrics
from ._pipeline import Pipeline
from ._signals import watch_signals
from ._transfer import Resolver, Transfers, system_resolver
from ._version import __version__

__all__ = ["Worker"]

logger = logging.getLogger("sprocket")

#: Seconds the HTTP server waits for open connections once it is told to stop. Every answer
#: has been sent by then (the drain is over), so this only bounds idle keep-alive connections.
HTTP_DRAIN_SECONDS = 2.0


class Worker:
    """One worker: its settings, state, metrics, event log and user code.

    ``transport``, ``resolver`` and ``thread_runner`` are seams for in-process tests (the
    testing kit's fake queue and mock-clock thread runner); production leaves the defaults.
    """

    def __init__(
        self,
        user: Sprocket | AsyncSprocket,
        settings: Settings,
        *,
        use_torchrun: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver = system_resolver,
        thread_runner: ThreadRunner = default_thread_runner,
    ) -> None:
        self.settings = settings
        self.lifecycle = Lifecycle(settings.grace_period)
        self.events = EventLog()
        self.metrics = Metrics()
        self.predictor = build_predictor(
            user, settings, self.lifecycle, self.events, use_torchrun, thread_runner
        )
        self.http_addresses: list[str] = []
        self.http_jobs: HttpJobs | None = None
        self.shutdown_calls = 0
        self._transport = transport
        self._resolver = resolver

    async def run(
        self,
        *,
        handle_signals: bool = True,
        serve_api: bool = True,
        task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED,
    ) -> int:
        """Run the worker until it has drained; return the process exit status.

        The order below is the shutdown contract: the serving scope (setup, warmup, jobs)
        ends first — on SIGTERM it stops taking work and lets the job in flight finish and
        report — then ``shutdown()`` runs once within what is left of the grace period, then
        the HTTP server stops, last, so ``/health`` answers until the end.
        """
        lifecycle, events = self.lifecycle, self.events
        async with self._clients() as (api, plain), self.predictor:
            transfers = Transfers(
                self.settings, api, plain, self.metrics, events, resolver=self._resolver
            )
            pipeline = Pipeline(
                self.predictor, transfers, self.settings, lifecycle, self.metrics, events
            )
            http_jobs = self.http_jobs = HttpJobs(
                pipeline, lifecycle, enabled=not self.settings.queue
            )
            async with trio.open_nursery() as root:
                watcher = trio.CancelScope()
                if handle_signals:
                    await root.start(_scoped, watcher, watch_signals, lifecycle, events)
                http_stop = trio.Event()
                if serve_api:
                    app = create_app(lifecycle, self.metrics, http_jobs)
                    self.http_addresses = await root.start(
                        partial(serve_http, graceful_timeout=HTTP_DRAIN_SECONDS),
                        app,
                        self.settings.host,
                        self.settings.port,
                        http_stop,
                    )
                    events.record("http_listening", addresses=",".join(self.http_addresses))
                task_status.started(self)

                set_up = await self._serve(pipeline, http_jobs, api)
                lifecycle.begin_stopping()
                if set_up and lifecycle.current is State.STOPPING:
                    await self._shutdown_user_code()
                http_stop.set()
                watcher.cancel()
        code = 0 if lifecycle.fatal_reason is None else 1
        events.record("exited", status=code, reason=lifecycle.fatal_reason or "drained")
        return code

    async def _serve(self, pipeline: Pipeline, http_jobs: HttpJobs, api: httpx.AsyncClient) -> bool:
        """The serving scope: setup → warmup → healthy → jobs, until drained.

        Returns whether ``setup()`` completed (only then does ``shutdown()`` run). A drain
        during setup waits for it within the grace period and skips warmup.
        """
        lifecycle, events = self.lifecycle, self.events
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_bound_by_drain, scope, lifecycle)
                events.record("setup_started")
                try:
                    await self.predictor.setup()
                except Exception as exc:
                    logger.error("setup() failed", exc_info=exc)
                    lifecycle.fail(f"setup() failed: {describe_exception(exc)}")
                    return False
                events.record("setup_finished")
                if not lifecycle.draining.is_set():
                    try:
                        await pipeline.warm_up()
                    except Exception as exc:
                        logger.error("a warmup input failed", exc_info=exc)
                        lifecycle.fail(f"warmup failed: {describe_exception(exc)}")
                        return True
                nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            events.record("setup_abandoned", level=logging.WARNING)
            return False
        if lifecycle.draining.is_set():
            return True
        lifecycle.set_healthy()
        events.record("healthy")
        if self.settings.queue:
            from ._queue_loop import QueueLoop

            await QueueLoop(pipeline, api, self.settings, lifecycle, self.metrics, events).run()
        else:
            await http_jobs.serve()
        return True

    async def _shutdown_user_code(self) -> None:
        """Call the user's ``shutdown()`` exactly once, bounded by the drain deadline."""
        self.shutdown_calls += 1
        self.events.record("shutdown_started")
        with trio.move_on_at(self.lifecycle.drain_deadline) as scope:
            try:
                await self.predictor.shutdown()
            except Exception as exc:
                logger.error("shutdown() raised", exc_info=exc)
                self.lifecycle.fail(f"shutdown() failed: {describe_exception(exc)}")
        if scope.cancelled_caught:
            self.events.record("shutdown_timed_out", level=logging.WARNING)
        else:
            self.events.record("shutdown_finished")

    @asynccontextmanager
    async def _clients(self) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
        """The API client (credentials, API base) and the plain client (no credentials)."""
        agent = {"User-Agent": f"sprocket/{__version__} (trio)"}
        api_headers = dict(agent)
        if self.settings.api_key:
            api_headers["Authorization"] = f"Bearer {self.settings.api_key}"
        timeout = httpx.Timeout(30.0, read=60.0)
        async with (
            httpx.AsyncClient(
                base_url=self.settings.api_base_url,
                headers=api_headers,
                transport=self._transport,
                timeout=timeout,
            ) as api,
            httpx.AsyncClient(headers=agent, transport=self._transport, timeout=timeout) as plain,
        ):
            yield api, plain


def build_predictor(
    user: Sprocket | AsyncSprocket,
    settings: Settings,
    lifecycle: Lifecycle,
    events: EventLog,
    use_torchrun: bool,
    thread_runner: ThreadRunner = default_thread_runner,
) -> Predictor:
    """The user's code behind the Predictor interface: in threads, on the asyncio loop thread,
    or in torchrun ranks (the parent then never runs it). ``TypeError`` for a wrong kind."""
    if not use_torchrun:
        return make_predictor(user, thread_runner)
    from ._torchrun import TorchrunPredictor

    if not isinstance(user, Sprocket):
        raise TypeError("use_torchrun=True needs a sprocket.Sprocket subclass")
    return TorchrunPredictor(user, settings, lifecycle, events)


async def _bound_by_drain(scope: trio.CancelScope, lifecycle: Lifecycle) -> None:
    """Once the drain begins, ``scope`` may last only until the drain deadline."""
    await lifecycle.draining.wait()
    scope.deadline = min(scope.deadline, lifecycle.drain_deadline)


async def _scoped(
    scope: trio.CancelScope,
    fn: object,
    *args: object,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await fn(*args, task_status=task_status)  # type: ignore[operator]
