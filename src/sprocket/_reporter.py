"""Status updates of one claimed job: the heartbeat that carries info, and the final report.

One ``Reporter`` per job. ``keep_alive`` is the job's only sender of ``running`` updates: it
renews the lease at least every third of ``claim_timeout`` and flushes ``emit_info`` at most
once per ``info_flush_interval``. ``report`` sends the terminal status once, retrying errors
until acknowledged or until its deadline.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from typing import Any

import httpx
import trio

from ._config import Settings
from ._events import EventLog
from ._info import InfoBuffer
from ._metrics import Metrics

__all__ = ["Backoff", "ClaimLost", "Reporter"]

logger = logging.getLogger("sprocket.queue")

STATUS_PATH = "/internal/v1/videos/status"


class ClaimLost(Exception):
    """The server answered 409: the claim expired, was re-claimed, or the job was canceled."""


class Backoff:
    """Capped exponential backoff with full jitter; ``reset()`` after a success."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * 2**self.failures)
        self.failures += 1
        # Full jitter, but never below a tenth of the ceiling: the worker must not spin.
        return self._rng.uniform(ceiling / 10, ceiling)

    def reset(self) -> None:
        self.failures = 0


class Reporter:
    """Sends the ``running``/``done``/``failed`` updates of one job, fenced by its claim id."""

    def __init__(
        self,
        api: httpx.AsyncClient,
        settings: Settings,
        metrics: Metrics,
        events: EventLog,
        request_id: str,
        claim_id: str | None,
    ) -> None:
        self._api = api
        self._settings = settings
        self._metrics = metrics
        self._events = events
        self.request_id = request_id
        self._claim_id = claim_id
        self._dirty = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self.lost = trio.Event()
        self.last_renewed = trio.current_time()

    def info_changed(self) -> None:
        """Called by the info buffer from any thread when new info waits to be sent."""
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._dirty.set)

    def _body(self, status: str, payload: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._settings.name,
            "request_id": self.request_id,
            "status": status,
            "payload": payload,
        }
        if info:
            body["info"] = info
        if self._claim_id is not None:
            body["claim_id"] = self._claim_id
        return body

    async def _post(self, body: dict[str, Any], seconds: float) -> httpx.Response:
        # httpx's own per-request timeout: a hung request fails without cancelling the task.
        return await self._api.post(STATUS_PATH, json=body, timeout=seconds)

    async def keep_alive(self, info: InfoBuffer) -> None:
        """Send ``running`` updates until cancelled; sets ``lost`` and returns on a 409.

        A failed update keeps its info for the next one and is retried after a short backoff,
        so the lease survives a run of errors well shorter than ``claim_timeout``.
        """
        interval = self._settings.heartbeat_interval
        gap = self._settings.info_flush_interval
        retry = Backoff(min(1.0, interval / 10), interval / 3)
        next_beat = trio.current_time() + interval
        while True:
            with trio.move_on_at(next_beat):
                await self._dirty.wait()
                await trio.sleep_until(self.last_renewed + gap)
            self._dirty = trio.Event()
            pending = info.take_pending()
            try:
                resp = await self._post(self._body("running", {}, pending), interval / 2)
            except httpx.HTTPError as exc:
                resp = None
                failure = f"{type(exc).__name__}: {exc}"
            except BaseException:
                # Cancelled mid-send (the job ended): the final report carries this info.
                info.restore_pending(pending)
                raise
            if resp is not None and resp.status_code == 409:
                self._mark_lost(resp)
                return
            if resp is not None and resp.status_code < 400:
                self.last_renewed = trio.current_time()
                retry.reset()
                if pending:
                    self._metrics.info_flushes.inc()
                    self._events.record("info_flushed", logging.DEBUG, request_id=self.request_id)
                next_beat = self.last_renewed + interval
                continue
            if resp is not None:
                failure = f"HTTP {resp.status_code}"
            info.restore_pending(pending)
            self._metrics.heartbeat_failures.inc()
            logger.warning(
                "status update failed: %s",
                failure,
                extra={"sprocket_fields": {"request_id": self.request_id}},
            )
            next_beat = trio.current_time() + retry.next_delay()

    def _mark_lost(self, resp: httpx.Response) -> None:
        try:
            status = resp.json().get("status")
        except (ValueError, AttributeError):
            status = None
        self._events.record(
            "claim_lost", logging.WARNING, request_id=self.request_id, status=status
        )
        self.lost.set()

    async def report(
        self, status: str, outputs: dict[str, Any], info: dict[str, Any], deadline: float
    ) -> bool:
        """Send the terminal status once; retry errors until acknowledged or ``deadline``.

        Returns True when acknowledged. A 409 means the server no longer counts this claim
        (possibly because an earlier attempt landed and only its answer was lost): the report
        is not sent again. Cancellation propagates; the caller bounds it with ``deadline``.
        """
        body = self._body(status, outputs, info)
        backoff = Backoff(self._settings.backoff_initial, self._settings.backoff_max)
        with trio.move_on_at(deadline):
            while True:
                left = deadline - trio.current_time()
                timeout = 30.0 if math.isinf(left) else max(min(30.0, left), 0.1)
                try:
                    resp = await self._post(body, timeout)
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                else:
                    if resp.status_code < 400:
                        self._events.record("reported", request_id=self.request_id, status=status)
                        return True
                    if resp.status_code == 409:
                        self._mark_lost(resp)
                        return False
                    problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    if 400 <= resp.status_code < 500 and resp.status_code != 429:
                        logger.error(
                            "the queue refused the %s report: %s",
                            status,
                            problem,
                            extra={"sprocket_fields": {"request_id": self.request_id}},
                        )
                        return False
                self._metrics.report_retries.inc()
                logger.warning(
                    "report failed, retrying: %s",
                    problem,
                    extra={"sprocket_fields": {"request_id": self.request_id}},
                )
                await trio.sleep(backoff.next_delay())
        self._events.record(
            "report_abandoned", logging.ERROR, request_id=self.request_id, status=status
        )
        return False
