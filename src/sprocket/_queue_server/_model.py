"""What the queue stores about a job, and the errors of job operations."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

__all__ = [
    "STATUSES",
    "TERMINAL_STATUSES",
    "Job",
    "JobConflict",
    "JobNotFound",
    "JobStatus",
    "Metrics",
]

JobStatus = Literal["pending", "running", "done", "failed", "canceled"]
STATUSES: Final = ("pending", "running", "done", "failed", "canceled")
TERMINAL_STATUSES: Final = frozenset({"done", "failed", "canceled"})


class JobNotFound(LookupError):
    """No job with this request id exists for this model."""


class JobConflict(Exception):
    """A status update for a job that the sender no longer holds; nothing was changed."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Job:
    """A snapshot of one job as stored."""

    request_id: str
    model: str
    status: JobStatus
    priority: int
    payload: dict[str, Any]
    info: dict[str, Any]
    outputs: dict[str, Any] | None
    retries: int
    created_at: float
    claimed_at: float | None
    done_at: float | None
    claim_id: str | None
    claim_timeout: float | None
    lease_expires_at: float | None
    hostname: str | None

    def public(self) -> dict[str, Any]:
        """The job object of ``GET /v1/queue/status`` (snake_case, ISO 8601 timestamps)."""
        return {
            "request_id": self.request_id,
            "model": self.model,
            "status": self.status,
            "inputs": self.payload,
            "outputs": self.outputs,
            "info": self.info,
            "priority": self.priority,
            "retries": self.retries,
            "created_at": _iso(self.created_at),
            "claimed_at": _iso(self.claimed_at),
            "done_at": _iso(self.done_at),
            "warnings": [],
        }

    def claim_data(self) -> dict[str, Any]:
        """The ``data`` object handed to the worker that claimed the job."""
        return {
            "request_id": self.request_id,
            "model": self.model,
            "payload": self.payload,
            "info": self.info,
            "priority": self.priority,
            "retries": self.retries,
            "claim_id": self.claim_id,
            "created_at": _iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class Metrics:
    """Queue depth of one model."""

    waiting: int
    running: int

    def public(self) -> dict[str, int]:
        """The body of ``GET /v1/queue/metrics``."""
        return {
            "messages_waiting": self.waiting,
            "messages_running": self.running,
            "total_jobs": self.waiting + self.running,
        }
