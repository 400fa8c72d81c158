"""``FakeQueue``: the local queue server, in memory and in-process, with injectable faults.

The queue's semantics are not re-implemented here: requests go to the very QuartTrio app that
``sprocket queue serve`` runs (``create_app``), over a ``QueueService`` whose store is an
in-memory SQLite ``QueueStore`` called inline on the Trio loop, with Trio's clock as its clock.
This module only adds what a test needs around it: an ``httpx`` transport with no sockets (so the
mock clock stays exact), fault injection per endpoint, a record of every request and of every
job's status history, and "external" https files for input downloads.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import shutil
import tempfile
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, cast
from urllib.parse import parse_qsl, urlsplit

import httpx
import trio

from .._queue_server import FileStorage, Job, QueueService, QueueStore, create_app, run_inline

__all__ = [
    "ENDPOINTS",
    "Endpoint",
    "FakeQueue",
    "Fault",
    "RecordedRequest",
    "Transition",
]

#: The endpoints a fault can target (``"*"``: every request, files included).
Endpoint = Literal[
    "claim",
    "update",
    "upload_request",
    "upload",
    "storage",
    "submit",
    "job_status",
    "cancel",
    "clear",
    "metrics",
    "file",
    "other",
    "*",
]
ENDPOINTS: Final = (
    "claim",
    "update",
    "upload_request",
    "upload",
    "storage",
    "submit",
    "job_status",
    "cancel",
    "clear",
    "metrics",
    "file",
    "other",
)
_ROUTES: Final = {
    ("POST", "/v1/queue/submit"): "submit",
    ("GET", "/v1/queue/status"): "job_status",
    ("POST", "/v1/queue/cancel"): "cancel",
    ("POST", "/v1/queue/clear"): "clear",
    ("GET", "/v1/queue/metrics"): "metrics",
    ("GET", "/internal/v1/queue/retrieve"): "claim",
    ("POST", "/internal/v1/videos/status"): "update",
    ("POST", "/v1/storage/upload-request"): "upload_request",
}
_UPLOAD_PREFIX: Final = "/v1/storage/_upload/"
_STORAGE_PREFIX: Final = "/v1/storage/"
#: Bodies larger than this are counted, not kept, in the request record.
_MAX_RECORDED_BODY: Final = 256 * 1024
#: Largest piece of a throttled body: each piece is one virtual-time sleep.
_THROTTLE_PIECE: Final = 64 * 1024


def _piece_size(rate: float) -> int:
    # About one second per piece, like bytes trickling over TCP: a timeout applies per
    # piece, so a slow-but-moving body does not look hung.
    return max(1, min(_THROTTLE_PIECE, int(rate)))


_TERMINAL: Final = frozenset({"done", "failed", "canceled"})

_OUTCOME_KINDS: Final = frozenset({"error", "disconnect", "drop"})
FaultKind = Literal["error", "delay", "hang", "drop", "disconnect", "throttle"]


# -- records ----------------------------------------------------------------------------------


@dataclasses.dataclass
class RecordedRequest:
    """One request the fake queue (or one of its file hosts) received, as it happened.

    Times are Trio times (virtual under a ``MockClock``). ``status`` is the HTTP status the
    server produced (``None`` if it never answered); ``error`` says why the client did not get
    that answer (``"dropped"``, ``"disconnected"``, ``"timeout"``, ``"cancelled"``), so
    ``delivered`` is what the worker saw and ``applied`` what the server did.
    """

    time: float
    method: str
    url: str
    endpoint: str
    headers: dict[str, str]
    query: dict[str, str]
    json: Any = None
    body_bytes: int = 0
    status: int | None = None
    response_json: Any = None
    error: str | None = None
    faults: list[str] = dataclasses.field(default_factory=list)
    applied_at: float | None = None
    finished_at: float | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def path(self) -> str:
        return urlsplit(self.url).path

    @property
    def request_id(self) -> str | None:
        """The job this request is about (body or query ``request_id``), if any."""
        if isinstance(self.json, dict) and isinstance(self.json.get("request_id"), str):
            return str(self.json["request_id"])
        if "request_id" in self.query:
            return self.query["request_id"]
        if self.endpoint == "claim" and isinstance(self.response_json, dict):
            data = self.response_json.get("data")
            if isinstance(data, dict) and isinstance(data.get("request_id"), str):
                return str(data["request_id"])
        return None

    @property
    def update_status(self) -> str | None:
        """For a status update: the ``status`` it carried (``running``, ``done``, ``failed``)."""
        if self.endpoint == "update" and isinstance(self.json, dict):
            value = self.json.get("status")
            return value if isinstance(value, str) else None
        return None

    @property
    def applied(self) -> bool:
        """The server answered 2xx (whether or not the answer reached the client)."""
        return self.status is not None and 200 <= self.status < 300

    @property
    def delivered(self) -> bool:
        """The client received the server's answer (any status)."""
        return self.status is not None and self.error is None

    @property
    def claimed(self) -> bool:
        """For a claim: the server handed out a job."""
        return self.endpoint == "claim" and self.applied and self.request_id is not None

    @property
    def authorization(self) -> str | None:
        """The ``Authorization`` header as sent, if any."""
        return self.headers.get("authorization")


@dataclasses.dataclass(frozen=True)
class Transition:
    """A job's status change: when (Trio time), to what, and why."""

    time: float
    status: str
    reason: str
    retries: int = 0


# -- faults -----------------------------------------------------------------------------------


class Fault:
    """One injected fault rule; returned by ``FakeQueue.fail()`` and friends.

    A rule matches a request to its ``endpoint`` while the virtual time is in
    ``[start, stop)``, ``when(request)`` holds and fewer than ``times`` requests were hit; then
    it fires with ``probability`` (drawn from the queue's seeded RNG). ``hits`` counts firings.
    """

    def __init__(
        self,
        queue: FakeQueue,
        kind: FaultKind,
        endpoint: str,
        *,
        status: int = 503,
        json_body: Any = None,
        seconds: float = 0.0,
        after_apply: bool = False,
        bytes_per_second: float | None = None,
        times: int | None = None,
        start: float | None = None,
        duration: float | None = None,
        probability: float = 1.0,
        when: Callable[[RecordedRequest], bool] | None = None,
    ) -> None:
        if endpoint != "*" and endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        if times is not None and times < 0:
            raise ValueError("times must be >= 0")
        self.kind: FaultKind = kind
        self.endpoint = endpoint
        self.status = status
        self.json_body = json_body
        self.seconds = seconds
        self.after_apply = after_apply
        self.bytes_per_second = bytes_per_second
        self.times = times
        self.start = trio.current_time() if start is None else start
        self.stop = math.inf if duration is None else self.start + duration
        self.probability = probability
        self.when = when
        self.hits = 0
        self.removed = False
        self._queue = queue
        self._released = trio.Event()

    def __repr__(self) -> str:
        return f"<Fault {self.kind} on {self.endpoint} hits={self.hits}>"

    @property
    def label(self) -> str:
        detail = f" {self.status}" if self.kind == "error" else ""
        return f"{self.kind}{detail}"

    def remove(self) -> None:
        """Stop injecting this fault; a request hanging on it is released."""
        self.removed = True
        self._released.set()

    def release(self) -> None:
        """For a hang: let the hanging requests (and any later ones) through."""
        self.remove()

    async def wait_hit(self, count: int = 1) -> None:
        """Wait until the fault fired ``count`` times in all."""
        await self._queue.wait_until(lambda: self.hits >= count)

    def _matches(self, request: RecordedRequest, now: float) -> bool:
        if self.removed:
            return False
        if self.endpoint != "*" and self.endpoint != request.endpoint:
            return False
        if not self.start <= now < self.stop:
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        if self.when is not None and not self.when(request):
            return False
        # Drawn last, and only for a request that could be hit: the sequence of draws then
        # depends only on the sequence of eligible requests, which keeps a seeded run exact.
        return self.probability >= 1.0 or self._queue._rng.random() < self.probability


# -- the transport ----------------------------------------------------------------------------


class _Transport(httpx.AsyncBaseTransport):
    """Routes every request of the worker's clients into the fake queue (no sockets)."""

    def __init__(self, queue: FakeQueue) -> None:
        self._queue = queue

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._queue._handle(request)

    async def aclose(self) -> None:
        # The worker's clients close their transport on exit; the queue outlives them.
        return None


class _Stream(httpx.AsyncByteStream):
    """A body produced in pieces, each one preceded by a virtual-time pause."""

    def __init__(
        self, pieces: Iterable[bytes], pause: Callable[[int], float], read_timeout: float | None
    ) -> None:
        self._pieces = pieces
        self._pause = pause
        self._read_timeout = read_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self._pieces:
            delay = self._pause(len(piece))
            if self._read_timeout is not None and delay > self._read_timeout:
                # A piece slower than the client's read timeout: it gives up, as over TCP.
                await trio.sleep(self._read_timeout)
                raise httpx.ReadTimeout("read timed out (fake queue, slow body)")
            if delay > 0:
                await trio.sleep(delay)
            yield piece


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


@dataclasses.dataclass
class _File:
    data: bytes
    status: int
    headers: dict[str, str]
    bytes_per_second: float | None
    declare_length: bool


def _normal(url: str) -> str:
    # As a client will send it: httpx resolves dot segments ("/a/../b" is "/b").
    return str(httpx.URL(url))


def _origin(url: str | httpx.URL) -> str:
    parsed = httpx.URL(str(url))
    default = {"http": 80, "https": 443}.get(parsed.scheme)
    port = "" if parsed.port in (None, default) else f":{parsed.port}"
    return f"{parsed.scheme}://{parsed.host}{port}"


class FakeQueue:
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
        # Quart's precise ASGI types are narrower than httpx's generic callable signature.
        self._asgi = httpx.ASGITransport(app=cast(Any, self.app))
        self.transport: httpx.AsyncBaseTransport = _Transport(self)
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self._rng = random.Random(seed)
        self._files: dict[str, _File | str] = {}
        self._redirect_status: dict[str, int] = {}
        self._hosts: dict[str, list[str]] = {}
        self._address_pool = (f"203.0.113.{n}" for n in itertools.count(10))
        for origin in (self.api_base_url, self.upload_base_url):
            self.add_host(httpx.URL(origin).host)
        self._snapshots: dict[str, Job] = {}
        self._histories: dict[str, list[Transition]] = {}
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
            history = self._histories.get(request_id, [])
            last[:] = history[-1:]
            return bool(last) and last[0].status in wanted

        await self.wait_until(reached)
        return last[0]

    # -- queries over the record --------------------------------------------------------------

    def requests_to(
        self,
        endpoint: str,
        *,
        request_id: str | None = None,
        since: float | None = None,
    ) -> list[RecordedRequest]:
        """Recorded requests to ``endpoint`` (``"*"``: all), optionally about one job or after
        a time."""
        return [
            r
            for r in self.requests
            if (endpoint == "*" or r.endpoint == endpoint)
            and (request_id is None or r.request_id == request_id)
            and (since is None or r.time >= since)
        ]

    def updates(
        self, request_id: str | None = None, *, status: str | None = None
    ) -> list[RecordedRequest]:
        """Status updates sent, optionally of one job and one ``status``."""
        return [
            r
            for r in self.requests_to("update", request_id=request_id)
            if status is None or r.update_status == status
        ]

    def terminal_reports(self, request_id: str | None = None) -> list[RecordedRequest]:
        """``done``/``failed`` updates the server accepted (at most one per job, or a bug)."""
        return [
            r
            for r in self.requests_to("update", request_id=request_id)
            if r.update_status in ("done", "failed") and r.applied
        ]

    def claims(self, *, since: float | None = None) -> list[RecordedRequest]:
        """Claim requests sent (at or after ``since``)."""
        return self.requests_to("claim", since=since)

    def renewals(self, request_id: str) -> list[float]:
        """Times at which the job's lease was granted or renewed: the claim, then every update
        the server accepted."""
        times = [r.applied_at for r in self.requests if r.claimed and r.request_id == request_id]
        times += [r.applied_at for r in self.updates(request_id) if r.applied]
        return sorted(t for t in times if t is not None)

    def max_renewal_gap(self, request_id: str, *, until: float | None = None) -> float:
        """The longest stretch without a lease renewal while the worker held the job.

        Measured from the claim to the last accepted update (or to ``until`` if given, e.g.
        now for a job still running). Compare it with the claim timeout.
        """
        times = self.renewals(request_id)
        if until is not None:
            times.append(until)
        if len(times) < 2:
            return 0.0
        return max(b - a for a, b in itertools.pairwise(times))

    # -- external files and DNS ---------------------------------------------------------------

    def add_host(self, host: str, *addresses: str) -> None:
        """Make ``host`` resolve (for the worker's address check) to ``addresses``.

        Without addresses it gets a fresh public test address (203.0.113.x). Map a host to
        ``169.254.169.254`` to test that the worker refuses link-local targets.
        """
        self._hosts[host.lower()] = list(addresses) or [next(self._address_pool)]

    async def resolve(self, host: str, port: int) -> list[str]:
        """The worker's resolver: the fake DNS of the hosts this queue knows."""
        await trio.lowlevel.checkpoint()
        try:
            return list(self._hosts[host.lower().rstrip(".")])
        except KeyError:
            raise OSError(
                f"fake DNS: unknown host {host!r} (serve a file on it or queue.add_host() it)"
            ) from None

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
        self._register(url)
        self._files[_normal(url)] = _File(
            data, status, dict(headers or {}), bytes_per_second, declare_length
        )
        return url

    def redirect(self, url: str, location: str, *, status: int = 302) -> str:
        """Answer ``url`` with a redirect to ``location``; returns ``url``."""
        self._register(url)
        self._files[_normal(url)] = location
        self._redirect_status[_normal(url)] = status
        return url

    def _register(self, url: str) -> None:
        host = httpx.URL(url).host.lower()
        if host not in self._hosts:
            self.add_host(host)

    def stored_file(self, url_or_name: str) -> bytes:
        """The bytes of an uploaded output, by its output URL or storage name."""
        name = url_or_name.rsplit("/", 1)[-1]
        return self.storage.path_for(name).read_bytes()

    # -- fault injection ----------------------------------------------------------------------

    def _add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def fail(
        self,
        endpoint: Endpoint,
        status: int = 503,
        *,
        json: Any = None,
        times: int | None = None,
        start: float | None = None,
        duration: float | None = None,
        probability: float = 1.0,
        when: Callable[[RecordedRequest], bool] | None = None,
    ) -> Fault:
        """Answer matching requests with ``status`` (body ``json`` or a JSON error) without
        passing them to the server.

        Window: ``times`` (first N matching requests), ``start`` (absolute Trio time, default
        now) and ``duration`` (seconds from ``start``), ``probability`` (seeded), ``when``.
        """
        return self._add(
            Fault(
                self,
                "error",
                endpoint,
                status=status,
                json_body=json,
                times=times,
                start=start,
                duration=duration,
                probability=probability,
                when=when,
            )
        )

    def delay(
        self,
        endpoint: Endpoint,
        seconds: float,
        *,
        after_apply: bool = False,
        times: int | None = None,
        start: float | None = None,
        duration: float | None = None,
        probability: float = 1.0,
        when: Callable[[RecordedRequest], bool] | None = None,
    ) -> Fault:
        """Add ``seconds`` of latency before the server sees the request (or, with
        ``after_apply``, after it applied the request and before the answer arrives)."""
        return self._add(
            Fault(
                self,
                "delay",
                endpoint,
                seconds=seconds,
                after_apply=after_apply,
                times=times,
                start=start,
                duration=duration,
                probability=probability,
                when=when,
            )
        )

    def hang(
        self,
        endpoint: Endpoint,
        *,
        after_apply: bool = False,
        times: int | None = None,
        start: float | None = None,
        duration: float | None = None,
        probability: float = 1.0,
        when: Callable[[RecordedRequest], bool] | None = None,
    ) -> Fault:
        """Hold matching requests until ``fault.release()`` (or the client's own timeout,
        which then sees ``httpx.ReadTimeout``). With ``after_apply`` the server applies the
        request first and only the answer hangs."""
        return self._add(
            Fault(
                self,
                "hang",
                endpoint,
                after_apply=after_apply,
                times=times,
                start=start,
                duration=duration,
                probability=probability,
                when=when,
            )
        )

    def drop_response(
        self,
        endpoint: Endpoint,
        *,
        times: int | None = None,
        start: float | None = None,
        duration: float | None = None,
        probability: float = 1.0,
        when: Callable[[RecordedRequest], bool] | None = None,
    ) -> Fault:
        """Let the server apply the request, then drop the connection: the client gets
        ``httpx.ReadError`` although the change was made."""
        return self._add(
            Fault(
                self,
                "drop",
                endpoint,
                times=times,
                start=start,
                duration=duration,
                probability=probability,
                when=when,
            )
        )

    def disconnect(
        self,
        endpoint: Endpoint,
        *,
        times: int | None = None,
        start: float | None = None,
        duration: float | None = None,
        probability: float = 1.0,
        when: Callable[[RecordedRequest], bool] | None = None,
    ) -> Fault:
        """Refuse the connection: the client gets ``httpx.ConnectError``; nothing is applied."""
        return self._add(
            Fault(
                self,
                "disconnect",
                endpoint,
                times=times,
                start=start,
                duration=duration,
                probability=probability,
                when=when,
            )
        )

    def throttle(
        self,
        endpoint: Endpoint,
        bytes_per_second: float,
        *,
        times: int | None = None,
        start: float | None = None,
        duration: float | None = None,
        probability: float = 1.0,
        when: Callable[[RecordedRequest], bool] | None = None,
    ) -> Fault:
        """Move bodies at ``bytes_per_second`` of virtual time: the request body of an upload,
        the response body otherwise (a slow download, or a claim answer that trickles in after
        its headers arrived)."""
        if bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")
        return self._add(
            Fault(
                self,
                "throttle",
                endpoint,
                bytes_per_second=bytes_per_second,
                times=times,
                start=start,
                duration=duration,
                probability=probability,
                when=when,
            )
        )

    def clear_faults(self) -> None:
        """Remove every fault (hanging requests are released)."""
        for fault in self.faults:
            fault.remove()
        self.faults.clear()

    # -- request handling ---------------------------------------------------------------------

    def _endpoint(self, request: httpx.Request) -> str:
        if self._served(request) is not None:
            return "file"  # a file or redirect the test published, even on the API host
        origin = _origin(request.url)
        path = request.url.path
        if origin in (self.api_base_url, self.upload_base_url):
            route = _ROUTES.get((request.method, path))
            if route is not None:
                return route
            if request.method == "PUT" and path.startswith(_UPLOAD_PREFIX):
                return "upload"
            if request.method == "GET" and path.startswith(_STORAGE_PREFIX):
                return "storage"
            return "other"
        return "file"

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        endpoint = self._endpoint(request)
        record = RecordedRequest(
            time=trio.current_time(),
            method=request.method,
            url=str(request.url),
            endpoint=endpoint,
            headers={k.lower(): v for k, v in request.headers.items()},
            query=dict(parse_qsl(request.url.query.decode(), keep_blank_values=True)),
        )
        streaming_upload = endpoint == "upload"
        if not streaming_upload:
            body = await request.aread()
            record.body_bytes = len(body)
            if body and len(body) <= _MAX_RECORDED_BODY:
                try:
                    record.json = json.loads(body)
                except ValueError:
                    record.json = None
        self.requests.append(record)
        now = trio.current_time()
        # Latency, hangs and throttling stack; of the rules that decide the outcome (error,
        # disconnect, drop) only the first matching one fires, so ``times`` counts stay exact.
        fired: list[Fault] = []
        decided = False
        for fault in self.faults:
            outcome = fault.kind in _OUTCOME_KINDS
            if outcome and decided:
                continue
            if fault._matches(record, now):
                fired.append(fault)
                decided = decided or outcome
        for fault in fired:
            fault.hits += 1
            record.faults.append(fault.label)
        self._notify()
        timeouts = request.extensions.get("timeout", {})
        read_timeout = timeouts.get("read")
        write_timeout = timeouts.get("write")
        try:
            # httpx enforces its timeouts in the network layer, which an in-process transport
            # replaces; honour the read timeout here so a hung request fails as it would.
            with trio.fail_after(math.inf if read_timeout is None else read_timeout) as scope:
                response = await self._exchange(request, record, fired, scope, write_timeout)
        except trio.TooSlowError:
            record.error = "timeout"
            raise httpx.ReadTimeout("read timed out (fake queue)", request=request) from None
        except BaseException as exc:
            record.error = record.error or _describe_failure(exc)
            raise
        finally:
            record.finished_at = trio.current_time()
            self._observe()
            self._notify()
        return response

    async def _exchange(
        self,
        request: httpx.Request,
        record: RecordedRequest,
        fired: list[Fault],
        scope: trio.CancelScope,
        write_timeout: float | None,
    ) -> httpx.Response:
        before = [f for f in fired if not f.after_apply]
        after = [f for f in fired if f.after_apply]
        throttle = next((f for f in fired if f.kind == "throttle"), None)
        for fault in before:
            if fault.kind == "disconnect":
                record.error = "disconnected"
                raise httpx.ConnectError("connection refused (injected)", request=request)
            if fault.kind == "delay":
                await trio.sleep(fault.seconds)
            elif fault.kind == "hang":
                await fault._released.wait()
        error = next((f for f in fired if f.kind == "error"), None)
        if error is not None:
            body = error.json_body
            if body is None:
                body = {
                    "error": {
                        "message": f"injected fault: HTTP {error.status}",
                        "type": "injected_fault",
                        "code": error.status,
                    }
                }
            record.status, record.response_json = error.status, body
            record.applied_at = trio.current_time()
            return httpx.Response(error.status, json=body, request=request)

        if record.endpoint == "upload":
            request = self._counted_upload(request, record, throttle, scope, write_timeout)
        if record.endpoint == "file":
            response = self._file_response(request, throttle)
        else:
            response = await self._asgi.handle_async_request(request)
            await response.aread()
        record.status = response.status_code
        record.applied_at = trio.current_time()
        json_answer = "json" in response.headers.get("content-type", "")
        if record.endpoint != "file" and json_answer and response.content:
            try:
                record.response_json = response.json()
            except ValueError:
                record.response_json = None
        if (
            throttle is not None
            and throttle.bytes_per_second
            and record.endpoint not in ("upload", "file")
        ):
            # The answer trickles in: the client has its headers but not yet its body.
            rate = throttle.bytes_per_second
            read_timeout = request.extensions.get("timeout", {}).get("read")
            response = httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_Stream(
                    _pieces(response.content, _piece_size(rate)),
                    lambda n: n / rate,
                    read_timeout,
                ),
                request=request,
            )
        for fault in after:
            if fault.kind == "delay":
                await trio.sleep(fault.seconds)
            elif fault.kind == "hang":
                await fault._released.wait()
        if any(f.kind == "drop" for f in fired):
            record.error = "dropped"
            raise httpx.ReadError(
                "connection dropped after the request (injected)", request=request
            )
        return response

    def _counted_upload(
        self,
        request: httpx.Request,
        record: RecordedRequest,
        throttle: Fault | None,
        scope: trio.CancelScope,
        write_timeout: float | None,
    ) -> httpx.Request:
        source = request.stream
        rate = throttle.bytes_per_second if throttle is not None else None

        async def body() -> AsyncIterator[bytes]:
            assert isinstance(source, httpx.AsyncByteStream)
            async for chunk in source:
                for piece in _pieces(chunk, _piece_size(rate)) if rate else [chunk]:
                    if rate:
                        pause = len(piece) / rate
                        if write_timeout is not None and pause > write_timeout:
                            await trio.sleep(write_timeout)
                            record.error = "timeout"
                            raise httpx.WriteTimeout("write timed out (fake queue)")
                        # Sending the body is not waiting for the answer: the read timeout
                        # starts over once the body is sent, so push it back by the pause.
                        scope.deadline += pause
                        await trio.sleep(pause)
                    record.body_bytes += len(piece)
                    yield piece

        return httpx.Request(
            request.method,
            request.url,
            headers=request.headers,
            stream=_AsyncIter(body()),
            extensions=request.extensions,
        )

    def _file_key(self, request: httpx.Request) -> str:
        full = str(request.url)
        return full if full in self._files else str(request.url.copy_with(query=None))

    def _served(self, request: httpx.Request) -> _File | str | None:
        return self._files.get(self._file_key(request))

    def _file_response(self, request: httpx.Request, throttle: Fault | None) -> httpx.Response:
        served = self._served(request)
        if served is None:
            if request.url.host.lower() not in self._hosts:
                raise httpx.ConnectError(
                    f"fake queue: no such host {request.url.host}", request=request
                )
            return httpx.Response(404, json={"error": "no such file"}, request=request)
        if isinstance(served, str):
            status = self._redirect_status.get(self._file_key(request), 302)
            return httpx.Response(status, headers={"location": served}, request=request)
        rate = throttle.bytes_per_second if throttle is not None else served.bytes_per_second
        read_timeout = request.extensions.get("timeout", {}).get("read")
        headers = dict(served.headers)
        if served.declare_length:
            headers["content-length"] = str(len(served.data))
        if request.method == "HEAD":
            return httpx.Response(served.status, headers=headers, request=request)
        pieces = _pieces(served.data, _piece_size(rate) if rate else _THROTTLE_PIECE)
        stream = _Stream(pieces, (lambda n: n / rate) if rate else (lambda n: 0.0), read_timeout)
        return httpx.Response(served.status, headers=headers, stream=stream, request=request)

    # -- job histories ------------------------------------------------------------------------

    def _observe(self) -> None:
        """Fold the store's current state into each job's history."""
        if self._closed:
            return
        now = trio.current_time()
        for job in self.store.all_jobs():
            prev = self._snapshots.get(job.request_id)
            history = self._histories.setdefault(job.request_id, [])
            self._snapshots[job.request_id] = job
            if prev is None:
                history.append(Transition(job.created_at, "pending", "submitted"))
                if job.status != "pending":
                    self._append_current(history, job, now)
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
                    self._append_current(history, job, now)
                continue
            reclaimed = job.status == "running" and job.claim_id != prev.claim_id
            if job.status != prev.status or reclaimed:
                self._append_current(history, job, now)

    @staticmethod
    def _append_current(history: list[Transition], job: Job, now: float) -> None:
        if job.status == "running":
            at, reason = (job.claimed_at if job.claimed_at is not None else now), "claimed"
        elif job.status in _TERMINAL:
            at = job.done_at if job.done_at is not None else now
            reason = "canceled" if job.status == "canceled" else "reported"
        else:
            at, reason = now, "requeued"
        history.append(Transition(at, job.status, reason, job.retries))


def _describe_failure(exc: BaseException) -> str:
    # The app runs in quart-trio's nursery, so the client's cancellation may come out wrapped
    # in an exception group.
    if isinstance(exc, BaseExceptionGroup):
        cancelled, _ = exc.split(trio.Cancelled)
        if cancelled is not None:
            return "cancelled"
    if isinstance(exc, trio.Cancelled):
        return "cancelled"
    return type(exc).__name__


class _AsyncIter(httpx.AsyncByteStream):
    def __init__(self, iterator: AsyncIterator[bytes]) -> None:
        self._iterator = iterator

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._iterator:
            yield chunk
