"""The job pipeline, shared by HTTP and queue mode: download → predict → finalize → upload."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import traceback
from typing import Any

import trio

from ._config import Settings
from ._errors import JobError, PayloadError, PredictionTimeout, describe_exception
from ._events import EventLog
from ._executor import Predictor
from ._info import InfoBuffer
from ._lifecycle import Lifecycle
from ._metrics import Metrics
from ._transfer import Transfers, new_job_dir

__all__ = ["Job", "Outcome", "Pipeline"]

logger = logging.getLogger("sprocket.job")


@dataclasses.dataclass
class Job:
    """One unit of work: where it came from, its payload and its info buffer."""

    request_id: str
    payload: Any
    info: InfoBuffer = dataclasses.field(default_factory=InfoBuffer)
    source: str = "http"
    #: Set when the queue took the job back (409): its result is discarded, not finalized.
    abandoned: bool = False


@dataclasses.dataclass
class Outcome:
    """How a job ended: outputs when done, else the error text reported as ``info.error``.

    ``stuck`` means predict overran and its thread could not be stopped: the worker must turn
    unhealthy and exit once the outcome is reported.
    """

    outputs: dict[str, Any] | None = None
    error: str | None = None
    timed_out: bool = False
    stuck: bool = False

    @property
    def done(self) -> bool:
        return self.error is None


class Pipeline:
    """Runs jobs one at a time under the deadlines of the lifecycle."""

    def __init__(
        self,
        predictor: Predictor,
        transfers: Transfers,
        settings: Settings,
        lifecycle: Lifecycle,
        metrics: Metrics,
        events: EventLog,
    ) -> None:
        self.predictor = predictor
        self.transfers = transfers
        self.settings = settings
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.events = events

    def job_deadline(self, started: float) -> float:
        """min(prediction timeout, drain deadline - report reserve)."""
        deadline = started + self.settings.prediction_timeout
        if not math.isinf(self.lifecycle.drain_deadline):
            deadline = min(deadline, self.lifecycle.drain_deadline - self.settings.report_reserve)
        return deadline

    async def execute(self, job: Job) -> Outcome:
        """Run ``job`` to an ``Outcome``; never raises for a job's own failure.

        The job's deadline tightens the moment a drain begins. When it passes, the job is
        cancelled and reported as timed out; a synchronous predict thread keeps running
        (``Outcome.stuck``). Cancellation from outside propagates as usual.
        """
        started = trio.current_time()
        self.events.record("received", request_id=job.request_id, source=job.source)
        self.metrics.requests_inflight.set(1)
        outcome = Outcome()
        try:
            with trio.CancelScope(deadline=self.job_deadline(started)) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._tighten_on_drain, scope, started)
                    try:
                        outcome.outputs = await self.run(job)
                    except Exception as exc:
                        outcome.error = describe_exception(exc)
                        self._log_failure(job, exc)
                    nursery.cancel_scope.cancel()
            if scope.cancelled_caught:
                outcome.outputs = None
                outcome.timed_out = True
                outcome.error = describe_exception(self._timeout_error(started))
                outcome.stuck = self.predictor.stuck
        finally:
            self.metrics.requests_inflight.set(0)
        result = "done" if outcome.done else ("timeout" if outcome.timed_out else "failed")
        self.metrics.jobs.labels(result).inc()
        self.events.record(
            "job_finished",
            request_id=job.request_id,
            outcome=result,
            seconds=trio.current_time() - started,
        )
        return outcome

    async def _tighten_on_drain(self, scope: trio.CancelScope, started: float) -> None:
        await self.lifecycle.draining.wait()
        scope.deadline = min(scope.deadline, self.job_deadline(started))

    def _timeout_error(self, started: float) -> PredictionTimeout:
        elapsed = trio.current_time() - started
        if self.lifecycle.draining.is_set():
            return PredictionTimeout(
                f"the job did not finish before the worker's shutdown deadline "
                f"(grace period {self.settings.grace_period:g} s after SIGTERM, "
                f"{self.settings.report_reserve:g} s kept to report); ran {elapsed:.1f} s"
            )
        return PredictionTimeout(
            f"predict did not finish within the prediction timeout of "
            f"{self.settings.prediction_timeout:g} s (TERMINATION_GRACE_PERIOD_SECONDS - 1)"
        )

    def _log_failure(self, job: Job, exc: BaseException) -> None:
        if isinstance(exc, JobError):
            logger.warning("job failed: %s", exc, extra={"sprocket_fields": _rid(job)})
        else:
            logger.error(
                "the job raised:\n%s", user_traceback(exc), extra={"sprocket_fields": _rid(job)}
            )

    async def run(self, job: Job) -> dict[str, Any]:
        """Download, predict, finalize, upload; raise on failure. Inputs are always removed."""
        if not isinstance(job.payload, dict):
            raise PayloadError(
                f"the job's payload must be a JSON object, not {type(job.payload).__name__}"
            )
        processor = self.predictor.processor
        job_dir = new_job_dir(self.settings.inputs_dir)
        try:
            args = await self.transfers.download_inputs(job.payload, job_dir, processor)
            self.events.record("predict_started", request_id=job.request_id)
            t0 = trio.current_time()
            try:
                outputs = await self.predictor.predict(args, job.info)
            finally:
                seconds = trio.current_time() - t0
                self.metrics.predict_seconds.observe(seconds)
            self.events.record("predict_finished", request_id=job.request_id, seconds=seconds)
            if job.abandoned:
                raise JobError("the queue took the job back while predict ran; result discarded")
            if not isinstance(outputs, dict):
                raise TypeError(f"predict() must return a dict, not {type(outputs).__name__}")
            outputs = await processor.finalize(job.request_id, args, outputs)
            if not isinstance(outputs, dict):
                raise TypeError(f"finalize() must return a dict, not {type(outputs).__name__}")
            outputs = await self.transfers.upload_outputs(outputs, job.request_id)
            _check_json(outputs)
            return outputs
        finally:
            self.transfers.remove_job_dir(job_dir)

    async def warm_up(self) -> None:
        """Predict each ``warmup_inputs`` entry once (no downloads, finalize or uploads)."""
        for index, args in enumerate(self.predictor.warmup_inputs):
            rid = f"warmup-{index}"
            self.events.record("warmup_started", request_id=rid)
            await self.predictor.predict(dict(args), InfoBuffer())
            self.events.record("warmup_finished", request_id=rid)


def user_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` without the frames of Trio's and sprocket's own machinery."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not any(part in frame.filename for part in _MACHINERY)
    ]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip()


_MACHINERY = (f"{os.sep}trio{os.sep}", f"{os.sep}outcome{os.sep}", f"{os.sep}sprocket{os.sep}_")


def _check_json(outputs: dict[str, Any]) -> None:
    try:
        json.dumps(outputs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"the outputs are not JSON-serialisable: {exc}") from None


def _rid(job: Job) -> dict[str, str]:
    return {"request_id": job.request_id}
