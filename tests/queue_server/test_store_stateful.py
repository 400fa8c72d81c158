"""A hypothesis state machine driving QueueStore against a small reference model."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from sprocket._queue_server import MAX_RETRIES, JobConflict, QueueStore
from sprocket._queue_server._store import STATUSES, TERMINAL_STATUSES

MODELS = ("a", "b")
LEASE = 10.0


@dataclass
class Ref:
    """What the reference model knows about one job."""

    model: str
    seq: int
    priority: int
    status: str = "pending"
    retries: int = 0
    claim_id: str | None = None
    lease_expires: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] | None = None
    old_claims: list[str] = field(default_factory=list)


class StoreMachine(RuleBasedStateMachine):
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="sprocket-store-"))
        self.now = 1_000_000.0
        self.store = QueueStore(self.dir / "q.sqlite3", clock=lambda: self.now)
        self.ref: dict[str, Ref] = {}
        self.seq = 0
        self.terminal_snapshots: dict[str, tuple[Any, ...]] = {}

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the reference semantics ----------------------------------------------------------------

    def _expire_ref(self) -> None:
        for job in self.ref.values():
            expired = job.lease_expires is not None and job.lease_expires <= self.now
            if job.status == "running" and expired:
                if job.claim_id:
                    job.old_claims.append(job.claim_id)
                job.claim_id, job.lease_expires = None, None
                if job.retries >= MAX_RETRIES:
                    job.status = "failed"
                else:
                    job.status, job.retries = "pending", job.retries + 1

    # -- rules ------------------------------------------------------------------------------------

    @rule(
        target=jobs,
        model=st.sampled_from(MODELS),
        priority=st.integers(-2, 2),
        info=st.dictionaries(st.sampled_from("xyz"), st.integers(0, 9), max_size=2),
    )
    def submit(self, model: str, priority: int, info: dict[str, Any]) -> str:
        rid = self.store.submit(model, {"n": self.seq}, info=info, priority=priority)
        self._expire_ref()
        assert rid not in self.ref
        self.ref[rid] = Ref(model=model, seq=self.seq, priority=priority, info=dict(info))
        self.seq += 1
        return rid

    @rule(model=st.sampled_from(MODELS))
    def claim(self, model: str) -> None:
        job = self.store.claim(model, claim_timeout=LEASE)
        self._expire_ref()
        pending = [(rid, j) for rid, j in self.ref.items() if j.model == model]
        pending = [(rid, j) for rid, j in pending if j.status == "pending"]
        if not pending:
            assert job is None
            return
        rid, ref = min(pending, key=lambda item: (-item[1].priority, item[1].seq))
        assert job is not None and job.request_id == rid
        assert job.retries == ref.retries and job.info == ref.info
        assert job.claim_id is not None
        ref.status, ref.claim_id, ref.lease_expires = "running", job.claim_id, self.now + LEASE

    @rule(model=st.sampled_from(MODELS))
    def claim_and_lapse(self, model: str) -> None:
        # A worker that claims and then vanishes: drives jobs through the retry path quickly.
        self.claim(model)
        self.now += LEASE

    def _update(self, rid: str, status: Any, which: str, info: dict[str, Any]) -> None:
        ref = self.ref[rid]
        claim_id = {
            "own": ref.claim_id,
            "stale": ref.old_claims[-1] if ref.old_claims else "clm_bogus",
            "none": None,
        }[which]
        try:
            job = self.store.update(
                ref.model, rid, status, payload={"out": rid}, info=info, claim_id=claim_id
            )
        except JobConflict as conflict:
            self._expire_ref()
            assert ref.status != "running" or (claim_id is not None and claim_id != ref.claim_id)
            assert conflict.status == ref.status
            return
        self._expire_ref()
        assert ref.status == "running" and claim_id in (None, ref.claim_id)
        ref.info.update(info)
        if status == "running":
            ref.lease_expires = self.now + LEASE
        else:
            ref.status = status
            if ref.claim_id:
                ref.old_claims.append(ref.claim_id)
            ref.claim_id, ref.lease_expires = None, None
            if status == "done":
                ref.outputs = {"out": rid}
        assert job.status == ref.status

    @rule(
        rid=jobs,
        which=st.sampled_from(["own", "stale", "none"]),
        info=st.dictionaries(st.sampled_from("xyz"), st.integers(0, 9), max_size=2),
    )
    def renew(self, rid: str, which: str, info: dict[str, Any]) -> None:
        self._update(rid, "running", which, info)

    @rule(rid=jobs, which=st.sampled_from(["own", "stale", "none"]))
    def done(self, rid: str, which: str) -> None:
        self._update(rid, "done", which, {"finished": 1})

    @rule(rid=jobs, which=st.sampled_from(["own", "stale", "none"]))
    def fail(self, rid: str, which: str) -> None:
        self._update(rid, "failed", which, {"error": "boom"})

    @rule(rid=jobs, running=st.booleans())
    def cancel(self, rid: str, running: bool) -> None:
        ref = self.ref[rid]
        job = self.store.cancel(ref.model, rid, running=running)
        self._expire_ref()
        if ref.status == "pending" or (running and ref.status == "running"):
            if ref.claim_id:
                ref.old_claims.append(ref.claim_id)
            ref.status, ref.claim_id, ref.lease_expires = "canceled", None, None
        assert job.status == ref.status

    @rule(model=st.sampled_from(MODELS))
    def clear(self, model: str) -> None:
        count = self.store.clear(model)
        self._expire_ref()
        expected = 0
        for job in self.ref.values():
            if job.model == model and job.status == "pending":
                job.status = "canceled"
                expected += 1
        assert count == expected

    @rule(seconds=st.sampled_from([0.5, 3.0, 9.99, 10.0, 25.0]))
    def advance_clock(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def expire(self) -> None:
        self.store.expire_leases()
        self._expire_ref()

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = QueueStore(self.dir / "q.sqlite3", clock=lambda: self.now)

    @precondition(lambda self: bool(self.ref))
    @rule(data=st.data())
    def metrics(self, data: st.DataObject) -> None:
        model = data.draw(st.sampled_from(MODELS))
        metrics = self.store.metrics(model)
        self._expire_ref()
        mine = [j for j in self.ref.values() if j.model == model]
        assert metrics.waiting == sum(j.status == "pending" for j in mine)
        assert metrics.running == sum(j.status == "running" for j in mine)

    @rule(rid=consumes(jobs))
    def forget(self, rid: str) -> None:
        # Keeps the bundle small so rules hit recent jobs; the job stays in the reference.
        pass

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def store_matches_reference(self) -> None:
        stored = {job.request_id: job for job in self.store.all_jobs()}
        # No acknowledged job ever disappears (nor appears from nowhere).
        assert set(stored) == set(self.ref)
        claim_ids = [job.claim_id for job in stored.values() if job.claim_id is not None]
        assert len(claim_ids) == len(set(claim_ids))
        for rid, job in stored.items():
            ref = self.ref[rid]
            # One state per job, and (before lazy expiry) the one the model expects, except that
            # the store may still show as running a job whose lease is due (expired on next use).
            assert job.status in STATUSES
            assert job.status == ref.status or (
                job.status == "running"
                and job.lease_expires_at is not None
                and job.lease_expires_at <= self.now
            )
            # At most one live claim: only a running job holds one, with a lease.
            assert (job.claim_id is not None) == (job.status == "running")
            assert (job.lease_expires_at is not None) == (job.status == "running")
            assert 0 <= job.retries <= MAX_RETRIES
            if job.status in TERMINAL_STATUSES:
                snapshot = (job.status, job.outputs, job.info, job.retries, job.done_at)
                previous = self.terminal_snapshots.setdefault(rid, snapshot)
                assert previous == snapshot, "a terminal job changed"


StoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreStateMachine = StoreMachine.TestCase
