"""``FakeQueue``: the local queue server, in memory and in-process, with injectable faults.

The queue's semantics are not re-implemented here: requests go to the very QuartTrio app that
``sprocket queue serve`` runs (``create_app``), over a ``QueueService`` whose store is an
in-memory SQLite ``QueueStore`` called inline on the Trio loop, with Trio's clock as its clock.
This module only adds what a test needs around it: an ``httpx`` transport with no sockets (so the
mock clock stays exact), fault injection per endpoint, a record of every request and of every
job's status history, and "external" https files for input downloads.

Those parts live beside it: ``_records`` (requests, endpoints, queries over them),
``_history`` (job histories), ``_faults`` (fault rules and the methods that register them),
``_transport`` (the transport, throttled bodies) and ``_fake_files`` (published files,
redirects, fake DNS).
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import trio

from .._queue_server import FileStorage, Job, QueueService, QueueStore, create_app, run_inline
from ._fake_files import FakeFiles, ServedFile
from ._faults import Fault, FaultInjection
from ._history import JobHistories, Transition
from ._records import ENDPOINTS, Endpoint, RecordedRequest, RequestQueries
from ._transport import QueueTransport

__all__ = [
    "ENDPOINTS",
    "Endpoint",
    "FakeQueue",
    "Fault",
    "RecordedRequest",
    "Transition",
]


class FakeQueue(FaultInjection, RequestQueries):
    """An in-memory managed queue speaking the wire protocol, served in-process.

    Give ``transport`` to the worker (``run_worker`` does) and ``resolve`` as its DNS. Every
    request is recorded in ``requests``; every job's status changes in ``history()``. Faults are
    injected per endpoint with ``fail``, ``delay``, ``hang``, ``drop_response``, ``disconnect``
    and ``throttle``. ``serve_file`` and ``redirect`` publish "external" https files.

    Construct it inside a Trio run. ``async with queue:`` (or ``run_worker``) also runs the lease
    reaper, so an expired claim goes back to the queue exactly on time; without it expiry still
    happens, lazily, at the next request. Leaving the ``async with`` block closes the queue.
    """

    def __init__(
        self,
        model: str = "sprocket-test",
        *,
        api_base_url: str = "https://api.test",
        upload_base_url: str = "https://uploads.test",
        api_key: str = "test-api-key",
        storage_dir: str | Path | None = None,
        seed: int = 0,
        max_upload_bytes: int = 1024**3,
        default_claim_timeout: float = 300.0,
        max_retries: int = 3,
    ) -> None:
        self.model = model
        self.api_base_url = api_base_url.rstrip("/")
        self.upload_base_url = upload_base_url.rstrip("/")
        self.api_key = api_key
        if httpx.URL(self.api_base_url).path not in ("", "/"):
            raise ValueError("api_base_url must be an origin (scheme://host[:port]) without path")
        # The store's clock is Trio's: under a MockClock leases expire in virtual time, and
        # every time in a Job equals the trio.current_time() at which it was set.
        self.store = QueueStore(":memory:", clock=trio.current_time, max_retries=max_retries)
        # Inline: a thread would look blocked to Trio and let the autojump clock leap ahead.
        self.service = QueueService(
            self.store, offload=run_inline, default_claim_timeout=default_claim_timeout
        )
        if storage_dir is None:
            self._tmp: str | None = tempfile.mkdtemp(prefix="sprocket-fake-queue-")
            weakref.finalize(self, shutil.rmtree, self._tmp, True)
            storage_dir = self._tmp
        else:
            self._tmp = None
        self.storage = FileStorage(
            Path(storage_dir),
            secret=b"sprocket fake queue",
            max_upload_bytes=max_upload_bytes,
            clock=trio.current_time,
            offload=run_inline,
        )
        self.app = create_app(
            self.service, api_key=api_key, storage=self.storage, public_url=self.upload_base_url
        )
        # Quart would time out a body that arrives slower than this (a throttled upload) in
        # *virtual* time; the fault, not Quart, decides how slow an upload may be here.
        self.app.config["BODY_TIMEOUT"] = None
        self.app.config["RESPONSE_TIMEOUT"] = None
        self.transport: httpx.AsyncBaseTransport = QueueTransport(self)
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self._rng = random.Random(seed)
        self._files = FakeFiles()
        for origin in (self.api_base_url, self.upload_base_url):
            self.add_host(httpx.URL(origin).host)
        self._histories = JobHistories()
        self._changed = trio.Event()
        self._reapers = 0
        self._closed = False

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> FakeQueue:
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        self._nursery = nursery
        await nursery.start(self.run_reaper)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_cm.__aexit__(exc_type, exc, tb)
        finally:
            self.close()

    async def run_reaper(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Expire leases exactly when they fall due, until cancelled (the server's reaper).

        Cancellation: stops the reaper; expiry then still happens lazily on the next request.
        """
        self._reapers += 1
        try:
            await self.service.run_reaper(task_status=task_status)
        finally:
            self._reapers -= 1

    @property
    def reaping(self) -> bool:
        """Whether a lease reaper runs for this queue now."""
        return self._reapers > 0

    def close(self) -> None:
        """Close the store and remove the storage folder if the queue created it."""
        if self._closed:
            return
        self._closed = True
        self.store.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # -- the client side, for tests -----------------------------------------------------------

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` on the API base with the API key, through the fake.

        Its requests are recorded and subject to faults like the worker's.
        """
        headers = {**self.auth_headers, **kwargs.pop("headers", {})}
        return httpx.AsyncClient(
            transport=self.transport, base_url=self.api_base_url, headers=headers, **kwargs
        )

    async def submit(
        self,
        payload: Any,
        *,
        model: str | None = None,
        info: dict[str, Any] | None = None,
        priority: int = 0,
    ) -> str:
        """Submit a job straight to the store (not recorded, no faults); returns its id.

        ``payload`` is normally a dict; anything else JSON-encodable is stored as given, to test
        a worker's handling of bad payloads (the HTTP endpoint would refuse it).
        """
        rid = await self.service.submit(model or self.model, payload, info=info, priority=priority)
        self._observe()
        self._notify()
        return rid

    async def status(self, request_id: str, *, model: str | None = None) -> dict[str, Any]:
        """The job object of ``GET /v1/queue/status`` (raises ``KeyError`` if unknown)."""
        from .._queue_server import JobNotFound

        try:
            job = await self.service.get(model or self.model, request_id)
        except JobNotFound:
            raise KeyError(request_id) from None
        self._observe()
        return job.public()

    async def cancel(
        self, request_id: str, *, running: bool = False, model: str | None = None
    ) -> str:
        """Cancel a pending job (or, with ``running``, a running one); returns its status."""
        job = await self.service.cancel(model or self.model, request_id, running=running)
        self._observe()
        self._notify()
        return job.status

    def job(self, request_id: str) -> Job:
        """A snapshot of the stored job (``Job`` of the queue server), without expiring leases."""
        for job in self.store.all_jobs():
            if job.request_id == request_id:
                return job
        raise KeyError(request_id)

    def jobs(self) -> list[Job]:
        """Every job, in submission order."""
        return self.store.all_jobs()

    def history(self, request_id: str) -> list[Transition]:
        """The job's status transitions, with the Trio time of each (expiry times exact)."""
        self._observe()
        return list(self._histories[request_id])

    def statuses(self, request_id: str) -> list[str]:
        """Just the statuses of ``history()``, e.g. ``["pending", "running", "done"]``."""
        return [t.status for t in self.history(request_id)]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is checked after every request, every change
        made through this object, and every lease expiry.

        Cancellation: only this wait is cancelled.
        """
        while not predicate():
            expiry = self.store.next_lease_expiry()
            with trio.move_on_at(math.inf if expiry is None else expiry):
                await self._changed.wait()
                continue
            # A lease fell due with no request to notice it: any service call expires due
            # leases first (and wakes long-polling workers), so make one.
            await self.service.metrics(self.model)
            self._observe()
            self._notify()

    async def wait_status(self, request_id: str, *statuses: str) -> Transition:
        """Wait until the job's status is one of ``statuses``; returns the transition to it.

        Cancellation: only this wait is cancelled.
        """
        wanted = set(statuses)
        last: list[Transition] = []

        def reached() -> bool:
            self._observe()
            history = self._histories.get(request_id)
            last[:] = history[-1:]
            return bool(last) and last[0].status in wanted

        await self.wait_until(reached)
        return last[0]

    # -- external files and DNS ---------------------------------------------------------------

    def add_host(self, host: str, *addresses: str) -> None:
        """Make ``host`` resolve (for the worker's address check) to ``addresses``.

        Without addresses it gets a fresh public test address (203.0.113.x). Map a host to
        ``169.254.169.254`` to test that the worker refuses link-local targets.
        """
        self._files.add_host(host, addresses)

    async def resolve(self, host: str, port: int) -> list[str]:
        """The worker's resolver: the fake DNS of the hosts this queue knows."""
        return await self._files.resolve(host)

    def serve_file(
        self,
        url: str,
        data: bytes,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        bytes_per_second: float | None = None,
        declare_length: bool = True,
    ) -> str:
        """Serve ``data`` at ``url`` (any host; https normally); returns ``url``.

        ``bytes_per_second`` makes the body arrive that slowly in virtual time;
        ``declare_length=False`` omits ``Content-Length`` (for size-limit tests).
        """
        served = ServedFile(data, status, dict(headers or {}), bytes_per_second, declare_length)
        self._files.serve(url, served)
        return url

    def redirect(self, url: str, location: str, *, status: int = 302) -> str:
        """Answer ``url`` with a redirect to ``location``; returns ``url``."""
        self._files.redirect(url, location, status)
        return url

    def stored_file(self, url_or_name: str) -> bytes:
        """The bytes of an uploaded output, by its output URL or storage name."""
        name = url_or_name.rsplit("/", 1)[-1]
        return self.storage.path_for(name).read_bytes()

    # -- change notification and histories (also for the transport) ----------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _observe(self) -> None:
        """Fold the store's current state into each job's history."""
        if self._closed:
            return
        now = trio.current_time()
        self._histories.observe(self.store.all_jobs(), now)
