"""HTTP-mode intake: hands ``/generate`` requests to the serving scope, one job at a time.

The request handler never runs the job itself: the job runs in the serving scope of the
worker's tree, so the drain waits for it and a client that disconnects does not cancel it.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Any

import trio

from ._lifecycle import Lifecycle
from ._pipeline import Job, Outcome, Pipeline

__all__ = ["Busy", "HttpJobs"]

logger = logging.getLogger("sprocket.http")


class Busy(Exception):
    """The worker cannot take a job now (busy, starting or draining); the text says which."""


@dataclasses.dataclass
class _Ticket:
    job: Job
    finished: trio.Event = dataclasses.field(default_factory=trio.Event)
    outcome: Outcome | None = None

    async def wait(self) -> Outcome:
        await self.finished.wait()
        assert self.outcome is not None
        return self.outcome


class HttpJobs:
    """A zero-capacity door: an offer succeeds only while the serving loop is idle."""

    def __init__(self, pipeline: Pipeline, lifecycle: Lifecycle, *, enabled: bool = True) -> None:
        self._enabled = enabled
        self._pipeline = pipeline
        self._lifecycle = lifecycle
        self._send, self._receive = trio.open_memory_channel[_Ticket](0)
        self._busy = False

    def offer(self, payload: Any) -> _Ticket:
        """Hand ``payload`` to the idle serving loop, or raise ``Busy`` at once."""
        if not self._enabled:
            raise Busy("this worker takes its jobs from the queue (--queue); /generate is off")
        if self._lifecycle.draining.is_set():
            raise Busy("the worker is shutting down")
        if not self._lifecycle.healthy:
            raise Busy(f"the worker is {self._lifecycle.current.value}")
        if self._busy:
            raise Busy("a job is already running; this worker runs one at a time")
        ticket = _Ticket(Job(request_id=uuid.uuid4().hex, payload=payload, source="http"))
        try:
            self._send.send_nowait(ticket)
        except trio.WouldBlock:
            raise Busy("a job is already running; this worker runs one at a time") from None
        self._busy = True
        return ticket

    async def serve(self) -> None:
        """Run offered jobs until the drain begins; a job in flight always completes.

        Returns when draining, or early when a job left a predict thread running that cannot
        be stopped (the lifecycle has then failed).
        """
        async with trio.open_nursery() as nursery:
            idle = trio.CancelScope()

            async def stop_waiting_on_drain() -> None:
                await self._lifecycle.draining.wait()
                idle.cancel()

            nursery.start_soon(stop_waiting_on_drain)
            while not self._lifecycle.draining.is_set():
                with idle:
                    ticket = await self._receive.receive()
                if idle.cancelled_caught:
                    break
                await self._run(ticket)
                outcome = ticket.outcome
                if (
                    outcome is not None
                    and outcome.timed_out
                    and not self._lifecycle.draining.is_set()
                ):
                    self._lifecycle.fail(outcome.error or "predict overran its timeout")
                    break
                idle = trio.CancelScope()
                if self._lifecycle.draining.is_set():
                    break
            nursery.cancel_scope.cancel()

    async def _run(self, ticket: _Ticket) -> None:
        try:
            ticket.outcome = await self._pipeline.execute(ticket.job)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("info of %s: %s", ticket.job.request_id, ticket.job.info.merged())
        finally:
            self._busy = False
            ticket.finished.set()
