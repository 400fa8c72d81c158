"""Queue mode: claim one job at a time, run it, report it; stop claiming the moment a drain
begins.

Each job gets its own nursery: the heartbeat (which also flushes ``emit_info``) runs beside
the pipeline and is cancelled before the final report is sent.
"""

from __future__ import annotations

import logging
import math
import socket
from typing import Any

import httpx
import trio

from ._config import Settings
from ._events import EventLog
from ._info import InfoBuffer
from ._lifecycle import Lifecycle
from ._metrics import Metrics
from ._pipeline import Job, Outcome, Pipeline
from ._reporter import Backoff, Reporter
from ._version import __version__

__all__ = ["QueueLoop"]

logger = logging.getLogger("sprocket.queue")

RETRIEVE_PATH = "/internal/v1/queue/retrieve"


class QueueLoop:
    """Claims and runs jobs until the drain begins or a fatal fault stops the worker."""

    def __init__(
        self,
        pipeline: Pipeline,
        api: httpx.AsyncClient,
        settings: Settings,
        lifecycle: Lifecycle,
        metrics: Metrics,
        events: EventLog,
    ) -> None:
        self._pipeline = pipeline
        self._api = api
        self._settings = settings
        self._lifecycle = lifecycle
        self._metrics = metrics
        self._events = events
        self._hostname = socket.gethostname()

    async def run(self) -> None:
        """Claim → run → report, until draining.

        The claim (and any backoff sleep) runs in a cancel scope that the drain cancels at
        once. A claim whose answer already arrived is read to the end under a shield, so a job
        the server handed out is always run and reported, never dropped.
        """
        lifecycle = self._lifecycle
        backoff = Backoff(self._settings.backoff_initial, self._settings.backoff_max)
        idle_since = trio.current_time()
        async with trio.open_nursery() as nursery:
            claiming = trio.CancelScope()

            async def stop_claiming_on_drain() -> None:
                await lifecycle.draining.wait()
                claiming.cancel()

            nursery.start_soon(stop_claiming_on_drain)
            while not lifecycle.draining.is_set():
                data: dict[str, Any] | None = None
                with claiming:
                    try:
                        data = await self._claim(trio.current_time() - idle_since)
                        backoff.reset()
                    except _ClaimFailed as exc:
                        self._metrics.claim_errors.inc()
                        delay = backoff.next_delay()
                        logger.warning("claim failed (%s); retrying in %.1f s", exc, delay)
                        await trio.sleep(delay)
                claiming = trio.CancelScope()
                if data is not None:
                    await self._run_job(data)
                    idle_since = trio.current_time()
                    if lifecycle.fatal_reason is not None:
                        break
            nursery.cancel_scope.cancel()

    async def _claim(self, idle_seconds: float) -> dict[str, Any] | None:
        s = self._settings
        params = {
            "model": s.name,
            "timeout": f"{s.poll_timeout:g}s",
            "hostname": self._hostname,
            "claim_timeout": f"{s.claim_timeout:g}",
        }
        headers = {"x-idle-time": f"{idle_seconds:.3f}", "x-worker-version": __version__}
        request = self._api.build_request(
            "GET",
            RETRIEVE_PATH,
            params=params,
            headers=headers,
            timeout=httpx.Timeout(30.0, read=s.poll_timeout + 30.0),
        )
        self._events.record("claim_sent", logging.DEBUG)
        try:
            resp = await self._api.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _ClaimFailed(f"{type(exc).__name__}: {exc}") from None
        # The server may have handed us a job already: reading the answer must not be cut.
        with trio.CancelScope(shield=True):
            try:
                await resp.aread()
            except httpx.HTTPError as exc:
                raise _ClaimFailed(f"reading the answer: {type(exc).__name__}") from None
            finally:
                await resp.aclose()
        if resp.status_code >= 400:
            raise _ClaimFailed(f"HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            body = resp.json()
        except ValueError:
            raise _ClaimFailed("the answer is not JSON") from None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or not data.get("request_id"):
            return None
        return data

    async def _run_job(self, data: dict[str, Any]) -> None:
        """Run one claimed job with its heartbeat, then report its outcome exactly once."""
        request_id = str(data["request_id"])
        claim_id = data.get("claim_id")
        self._metrics.claims.inc()
        self._events.record("claimed", request_id=request_id, retries=data.get("retries", 0))
        reporter = Reporter(
            self._api,
            self._settings,
            self._metrics,
            self._events,
            request_id,
            None if claim_id is None else str(claim_id),
        )
        job = Job(request_id, data.get("payload"), InfoBuffer(reporter.info_changed), "queue")
        outcome: Outcome | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reporter.keep_alive, job.info)
            with trio.CancelScope() as work:
                nursery.start_soon(_cancel_when_lost, reporter, work, job, self._pipeline)
                outcome = await self._pipeline.execute(job)
            nursery.cancel_scope.cancel()
        if reporter.lost.is_set() or outcome is None:
            self._events.record("job_abandoned", logging.WARNING, request_id=request_id)
            return
        await self._finish(job, reporter, outcome)

    async def _finish(self, job: Job, reporter: Reporter, outcome: Outcome) -> None:
        lifecycle = self._lifecycle
        draining = lifecycle.draining.is_set()
        if outcome.timed_out and draining and self._settings.requeue_on_shutdown:
            self._events.record("job_left_for_requeue", logging.WARNING, request_id=job.request_id)
            return
        info = job.info.take_pending()
        if outcome.done:
            status, outputs = "done", outcome.outputs or {}
        else:
            status, outputs = "failed", {}
            info["error"] = outcome.error
        deadline = lifecycle.drain_deadline
        if math.isinf(deadline):
            deadline = trio.current_time() + self._settings.claim_timeout
        await reporter.report(status, outputs, info, deadline)
        if outcome.timed_out and not draining:
            lifecycle.fail(outcome.error or "predict overran its timeout")


async def _cancel_when_lost(
    reporter: Reporter, work: trio.CancelScope, job: Job, pipeline: Pipeline
) -> None:
    """On a 409, stop the job: cancel an interruptible predict; a thread is left to finish
    and its result discarded."""
    await reporter.lost.wait()
    job.abandoned = True
    if pipeline.predictor.interruptible:
        work.cancel()


class _ClaimFailed(Exception):
    pass
