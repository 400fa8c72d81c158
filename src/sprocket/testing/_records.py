"""What ``FakeQueue`` records of each request (``RecordedRequest``): its endpoint, its body,
what the server answered; and the queries a test asks of that record."""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlsplit

import httpx
import trio

__all__ = [
    "ENDPOINTS",
    "Endpoint",
    "RecordedRequest",
    "RequestQueries",
    "classify",
    "describe_failure",
    "origin",
    "record_request",
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


# -- requests ---------------------------------------------------------------------------------


def origin(url: str | httpx.URL) -> str:
    """``scheme://host[:port]`` of ``url``, without a default port."""
    parsed = httpx.URL(str(url))
    default = {"http": 80, "https": 443}.get(parsed.scheme)
    port = "" if parsed.port in (None, default) else f":{parsed.port}"
    return f"{parsed.scheme}://{parsed.host}{port}"


def classify(request: httpx.Request, queue_origins: tuple[str, ...]) -> str:
    """The endpoint of a request that is not to a published file: an API route, an upload or
    storage download on one of ``queue_origins``, ``"other"`` there, ``"file"`` elsewhere."""
    if origin(request.url) not in queue_origins:
        return "file"
    path = request.url.path
    route = _ROUTES.get((request.method, path))
    if route is not None:
        return route
    if request.method == "PUT" and path.startswith(_UPLOAD_PREFIX):
        return "upload"
    if request.method == "GET" and path.startswith(_STORAGE_PREFIX):
        return "storage"
    return "other"


async def record_request(request: httpx.Request, endpoint: str) -> RecordedRequest:
    """A record of ``request``, now; its body is read (and kept if JSON) unless it is an upload,
    which is counted as it streams."""
    record = RecordedRequest(
        time=trio.current_time(),
        method=request.method,
        url=str(request.url),
        endpoint=endpoint,
        headers={k.lower(): v for k, v in request.headers.items()},
        query=dict(parse_qsl(request.url.query.decode(), keep_blank_values=True)),
    )
    if endpoint != "upload":
        body = await request.aread()
        record.body_bytes = len(body)
        if body and len(body) <= _MAX_RECORDED_BODY:
            try:
                record.json = json.loads(body)
            except ValueError:
                record.json = None
    return record


def describe_failure(exc: BaseException) -> str:
    """The ``RecordedRequest.error`` for a request that ended with ``exc``."""
    # The app runs in quart-trio's nursery, so the client's cancellation may come out wrapped
    # in an exception group.
    if isinstance(exc, BaseExceptionGroup):
        cancelled, _ = exc.split(trio.Cancelled)
        if cancelled is not None:
            return "cancelled"
    if isinstance(exc, trio.Cancelled):
        return "cancelled"
    return type(exc).__name__


# -- queries over the record -----------------------------------------------------------------


class RequestQueries:
    """``FakeQueue``'s queries over its record of requests (``requests``)."""

    requests: list[RecordedRequest]

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
