"""Every job's status history (``Transition``), folded from successive snapshots of the store:
the store keeps only a job's current state."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Final

from .._queue_server import Job

__all__ = ["JobHistories", "Transition"]

_TERMINAL: Final = frozenset({"done", "failed", "canceled"})


@dataclasses.dataclass(frozen=True)
class Transition:
    """A job's status change: when (Trio time), to what, and why."""

    time: float
    status: str
    reason: str
    retries: int = 0


class JobHistories:
    """Every job's status transitions, folded from successive snapshots of the store."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Job] = {}
        self._histories: dict[str, list[Transition]] = {}

    def __getitem__(self, request_id: str) -> list[Transition]:
        return self._histories[request_id]

    def get(self, request_id: str) -> list[Transition]:
        return self._histories.get(request_id, [])

    def observe(self, jobs: Iterable[Job], now: float) -> None:
        """Fold the store's current state (``jobs``, seen at ``now``) into each history."""
        for job in jobs:
            prev = self._snapshots.get(job.request_id)
            history = self._histories.setdefault(job.request_id, [])
            self._snapshots[job.request_id] = job
            if prev is None:
                history.append(Transition(job.created_at, "pending", "submitted"))
                if job.status != "pending":
                    _append_current(history, job, now)
                continue
            if prev.status == "running" and (
                job.retries > prev.retries
                or (
                    job.status == "failed"
                    and str(job.info.get("error", "")).startswith("claim expired")
                )
            ):
                # Expired: the store applies expiry lazily, but the lease ran out at a known time.
                expired_at = prev.lease_expires_at if prev.lease_expires_at is not None else now
                status = (
                    "failed"
                    if job.status == "failed" and job.retries == prev.retries
                    else "pending"
                )
                history.append(Transition(expired_at, status, "lease expired", job.retries))
                if job.status == "running":  # already handed out again
                    _append_current(history, job, now)
                continue
            reclaimed = job.status == "running" and job.claim_id != prev.claim_id
            if job.status != prev.status or reclaimed:
                _append_current(history, job, now)


def _append_current(history: list[Transition], job: Job, now: float) -> None:
    if job.status == "running":
        at, reason = (job.claimed_at if job.claimed_at is not None else now), "claimed"
    elif job.status in _TERMINAL:
        at = job.done_at if job.done_at is not None else now
        reason = "canceled" if job.status == "canceled" else "reported"
    else:
        at, reason = now, "requeued"
    history.append(Transition(at, job.status, reason, job.retries))
