"""The queue's durable state: a synchronous SQLite store with an injectable clock.

The store is deliberately synchronous and free of any event-loop dependency: the real server runs
its operations in a worker thread (so that an fsync never stalls the loop), while the in-process
fake used by tests calls it directly on the Trio loop under a mock clock. Every time it needs
("now") comes from ``clock``, and lease expiries are stored as absolute clock values, so a restart
on the same database keeps them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, Literal

from ._ids import new_claim_id, uuid7
from ._model import (
    STATUSES,
    TERMINAL_STATUSES,
    Job,
    JobConflict,
    JobNotFound,
    Metrics,
)

__all__ = [
    "MAX_RETRIES",
    "STATUSES",
    "TERMINAL_STATUSES",
    "Job",
    "JobConflict",
    "JobNotFound",
    "Metrics",
    "QueueStore",
]

#: How many times a job whose claim expired is handed out again before it fails for good.
MAX_RETRIES: Final = 3
#: Bounds of SQLite's INTEGER; a priority outside them could not be stored.
PRIORITY_MIN: Final = -(2**63)
PRIORITY_MAX: Final = 2**63 - 1

_SCHEMA_VERSION: Final = 1
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    payload TEXT NOT NULL,
    info TEXT NOT NULL,
    outputs TEXT,
    retries INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    claimed_at REAL,
    done_at REAL,
    claim_id TEXT,
    claim_timeout REAL,
    lease_expires_at REAL,
    hostname TEXT
);
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (model, priority DESC, seq)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS jobs_leases ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS jobs_model_status ON jobs (model, status);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLUMNS: Final = (
    "request_id, model, status, priority, payload, info, outputs, retries, created_at, "
    "claimed_at, done_at, claim_id, claim_timeout, lease_expires_at, hostname"
)


def _dumps(value: object) -> str:
    # allow_nan=False: NaN/Infinity are not JSON and would break every other client.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _row_to_job(row: sqlite3.Row | tuple[Any, ...]) -> Job:
    (rid, model, status, prio, payload, info, outputs, retries, created, claimed, done) = row[:11]
    claim_id, claim_timeout, lease, hostname = row[11:15]
    return Job(
        request_id=rid,
        model=model,
        status=status,
        priority=prio,
        payload=json.loads(payload),
        info=json.loads(info),
        outputs=None if outputs is None else json.loads(outputs),
        retries=retries,
        created_at=created,
        claimed_at=claimed,
        done_at=done,
        claim_id=claim_id,
        claim_timeout=claim_timeout,
        lease_expires_at=lease,
        hostname=hostname,
    )


class QueueStore:
    """SQLite-backed job store: one connection, serialized by a lock, safe to call from threads.

    ``path`` is a file path (WAL mode, ``synchronous=FULL``: a method that changed state returns
    only after its transaction is committed to disk) or ``":memory:"``. ``clock`` returns Unix-like
    seconds; it stamps jobs and decides lease expiry. Every public method first expires the leases
    that are due, so results never depend on a background reaper having run.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        max_retries: int = MAX_RETRIES,
    ) -> None:
        self.clock = clock
        self.max_retries = max_retries
        self.path = os.fspath(path)
        self._lock = threading.RLock()
        # Models that gained a pending job since the last take_wakeups(); the async layer turns
        # them into wake-ups for long-polling workers (it cannot be woken from a thread directly).
        self._wakeups: set[str] = set()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout = 5000")
        if self.path != ":memory:":
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"SQLite refused WAL mode for {self.path!r} (got {mode!r})")
            self._conn.execute("PRAGMA synchronous = FULL")
        with self._lock:
            # Idempotent DDL; executescript manages its own transaction.
            self._conn.executescript(_SCHEMA)
        with self._write():
            self._conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(_SCHEMA_VERSION),),
            )

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction under the lock; committed (durably) on normal exit."""
        with self._lock:
            conn = self._conn
            # IMMEDIATE takes the write lock up front, so a read-then-update (claim) is atomic
            # even against another process that opened the same file.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close the database (checkpointing the WAL)."""
        with self._lock:
            self._conn.close()

    def take_wakeups(self) -> set[str]:
        """Return and forget the models that gained a pending job since the last call."""
        with self._lock:
            models, self._wakeups = self._wakeups, set()
            return models

    def _fetch(self, conn: sqlite3.Connection, request_id: str, model: str | None) -> Job | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE request_id = ?", (request_id,))
        found = row.fetchone()
        if found is None:
            return None
        job = _row_to_job(found)
        if model is not None and job.model != model:
            return None
        return job

    def _expire_due(self, conn: sqlite3.Connection, now: float) -> list[Job]:
        """Return expired claims to the queue (or fail them); must run inside a transaction."""
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE status = 'running' AND lease_expires_at <= ?",
            (now,),
        ).fetchall()
        changed: list[Job] = []
        for row in rows:
            job = _row_to_job(row)
            if job.retries >= self.max_retries:
                info = dict(job.info)
                info["error"] = (
                    f"claim expired: no status update within the claim timeout "
                    f"({job.claim_timeout:g} s), {job.retries + 1} times; "
                    f"giving up after {self.max_retries} retries"
                )
                conn.execute(
                    "UPDATE jobs SET status = 'failed', info = ?, done_at = ?, claim_id = NULL, "
                    "lease_expires_at = NULL WHERE request_id = ?",
                    (_dumps(info), now, job.request_id),
                )
            else:
                conn.execute(
                    "UPDATE jobs SET status = 'pending', retries = retries + 1, claim_id = NULL, "
                    "claimed_at = NULL, lease_expires_at = NULL, hostname = NULL "
                    "WHERE request_id = ?",
                    (job.request_id,),
                )
                self._wakeups.add(job.model)
            changed.append(job)
        return changed

    # -- client operations --------------------------------------------------------------------

    def submit(
        self,
        model: str,
        payload: dict[str, Any],
        *,
        info: dict[str, Any] | None = None,
        priority: int = 0,
    ) -> str:
        """Store a new pending job and return its request id once committed."""
        if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise ValueError("priority out of range")
        payload_json, info_json = _dumps(payload), _dumps(info or {})
        with self._write() as conn:
            now = self.clock()
            self._expire_due(conn, now)
            request_id = uuid7(now)
            conn.execute(
                "INSERT INTO jobs (request_id, model, status, priority, payload, info, created_at)"
                " VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                (request_id, model, priority, payload_json, info_json, now),
            )
            self._wakeups.add(model)
        return request_id

    def get(self, model: str | None, request_id: str) -> Job:
        """Return the job; raise :class:`JobNotFound` if unknown (or of another model)."""
        with self._write() as conn:
            self._expire_due(conn, self.clock())
            job = self._fetch(conn, request_id, model)
        if job is None:
            raise JobNotFound(request_id)
        return job

    def cancel(self, model: str, request_id: str, *, running: bool = False) -> Job:
        """Cancel a pending job (and a running one if ``running``); return the job afterwards.

        Any other job is left unchanged, as the managed queue does.
        """
        with self._write() as conn:
            now = self.clock()
            self._expire_due(conn, now)
            job = self._fetch(conn, request_id, model)
            if job is None:
                raise JobNotFound(request_id)
            allowed = ("pending", "running") if running else ("pending",)
            if job.status in allowed:
                conn.execute(
                    "UPDATE jobs SET status = 'canceled', done_at = ?, claim_id = NULL, "
                    "lease_expires_at = NULL WHERE request_id = ?",
                    (now, request_id),
                )
                job = self._fetch(conn, request_id, model)
                assert job is not None
        return job

    def clear(self, model: str) -> int:
        """Cancel every pending job of ``model``; return how many were canceled."""
        with self._write() as conn:
            now = self.clock()
            self._expire_due(conn, now)
            cur = conn.execute(
                "UPDATE jobs SET status = 'canceled', done_at = ? "
                "WHERE model = ? AND status = 'pending'",
                (now, model),
            )
            return cur.rowcount

    def metrics(self, model: str) -> Metrics:
        """Count the pending and running jobs of ``model``."""
        with self._write() as conn:
            self._expire_due(conn, self.clock())
            counts = dict(
                conn.execute(
                    "SELECT status, COUNT(*) FROM jobs WHERE model = ? "
                    "AND status IN ('pending', 'running') GROUP BY status",
                    (model,),
                ).fetchall()
            )
        return Metrics(waiting=counts.get("pending", 0), running=counts.get("running", 0))

    # -- worker operations --------------------------------------------------------------------

    def claim(self, model: str, *, claim_timeout: float, hostname: str | None = None) -> Job | None:
        """Atomically hand out the best pending job of ``model`` (highest priority, oldest first).

        The job becomes ``running`` with a fresh ``claim_id`` and a lease that expires
        ``claim_timeout`` seconds from now. Returns ``None`` if nothing is pending.
        """
        if not claim_timeout > 0:
            raise ValueError("claim_timeout must be positive")
        with self._write() as conn:
            now = self.clock()
            self._expire_due(conn, now)
            row = conn.execute(
                "SELECT request_id FROM jobs WHERE model = ? AND status = 'pending' "
                "ORDER BY priority DESC, seq LIMIT 1",
                (model,),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status = 'running', claim_id = ?, claimed_at = ?, "
                "claim_timeout = ?, lease_expires_at = ?, hostname = ? WHERE request_id = ?",
                (new_claim_id(), now, claim_timeout, now + claim_timeout, hostname, row[0]),
            )
            job = self._fetch(conn, row[0], None)
        assert job is not None
        return job

    def update(
        self,
        model: str,
        request_id: str,
        status: Literal["running", "done", "failed"],
        *,
        payload: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
        claim_id: str | None = None,
    ) -> Job:
        """Apply a worker's status update and return the job afterwards.

        ``running`` renews the lease and merges ``info``; ``done`` also stores ``payload`` as the
        outputs; ``failed`` is terminal. Raises :class:`JobConflict` (changing nothing) when the
        job is not running, or when ``claim_id`` is given and is not the job's current claim; a
        sender without a claim id can only be fenced by the job's state.
        """
        if status not in ("running", "done", "failed"):
            raise ValueError(f"invalid status update {status!r}")
        _dumps(info or {})  # reject unencodable info before touching anything
        payload_json = _dumps(payload or {})
        with self._write() as conn:
            now = self.clock()
            self._expire_due(conn, now)
            job = self._fetch(conn, request_id, model)
            if job is None:
                raise JobNotFound(request_id)
            if job.status != "running":
                raise JobConflict(job.status, f"job is {job.status}, not running")
            if claim_id is not None and claim_id != job.claim_id:
                raise JobConflict(job.status, "claim_id does not match the job's current claim")
            merged = dict(job.info)
            if info:
                merged.update(info)
            merged_json = _dumps(merged)
            if status == "running":
                timeout = job.claim_timeout or 0.0
                conn.execute(
                    "UPDATE jobs SET info = ?, lease_expires_at = ? WHERE request_id = ?",
                    (merged_json, now + timeout, request_id),
                )
            else:
                conn.execute(
                    "UPDATE jobs SET status = ?, info = ?, outputs = ?, done_at = ?, "
                    "claim_id = NULL, lease_expires_at = NULL WHERE request_id = ?",
                    (
                        status,
                        merged_json,
                        payload_json if status == "done" else None,
                        now,
                        request_id,
                    ),
                )
            job = self._fetch(conn, request_id, model)
        assert job is not None
        return job

    # -- leases -------------------------------------------------------------------------------

    def expire_leases(self) -> list[Job]:
        """Expire every claim that is due now; return the jobs as they were before expiry."""
        with self._write() as conn:
            return self._expire_due(conn, self.clock())

    def next_lease_expiry(self) -> float | None:
        """The earliest lease expiry among running jobs (clock seconds), or ``None``."""
        with self._lock:
            row = self._conn.execute(
                "SELECT MIN(lease_expires_at) FROM jobs WHERE status = 'running'"
            ).fetchone()
        value = row[0] if row else None
        return None if value is None else float(value)

    # -- inspection (tests, tooling) ----------------------------------------------------------

    def all_jobs(self) -> list[Job]:
        """Every job, in submission order, without expiring anything."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY seq").fetchall()
        return [_row_to_job(row) for row in rows]
