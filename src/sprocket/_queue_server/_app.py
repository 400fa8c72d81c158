"""The HTTP face of the local queue: a QuartTrio app speaking the managed queue's protocol."""

from __future__ import annotations

import hmac
import json
import logging
import mimetypes
import re
from collections.abc import AsyncIterator
from typing import Any, Final, NoReturn
from urllib.parse import quote

import trio
from quart import Response, request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioBody, TrioRequest
from werkzeug.exceptions import HTTPException

from ._service import QueueService
from ._storage import FileStorage, InvalidName, UploadTooLarge
from ._store import PRIORITY_MAX, PRIORITY_MIN, JobConflict, JobNotFound

__all__ = ["DEFAULT_MAX_JSON_BYTES", "ApiError", "create_app"]

log = logging.getLogger("sprocket.queue_server")

#: Largest JSON request body accepted (bytes); larger gets 413.
DEFAULT_MAX_JSON_BYTES: Final = 16 * 1024 * 1024
#: Longest lease a worker may ask for (seconds).
MAX_CLAIM_TIMEOUT: Final = 7 * 24 * 3600.0
#: Request body bytes buffered ahead of the handler before the connection stops reading.
_BODY_HIGH_WATER: Final = 1024 * 1024
_UPLOAD_PREFIX: Final = "/v1/storage/_upload/"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ApiError(Exception):
    """An error answered as JSON: ``{"error": {"message", "type", "code"}, **extra}``."""

    def __init__(self, code: int, message: str, kind: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.kind = kind
        self.extra = extra

    def response(self) -> tuple[dict[str, Any], int]:
        """The JSON body and status code."""
        body: dict[str, Any] = {"error": {"message": self.message, "type": self.kind}}
        body["error"]["code"] = self.code
        body.update(self.extra)
        return body, self.code


def _bad(message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error")


# -- flow-controlled request bodies -----------------------------------------------------------
# Quart's connection copies every body chunk it receives into the request's buffer without
# waiting for the handler to consume it, so a fast client uploading to a slower disk would pile
# the whole file up in memory. These subclasses make the receiving side wait until the handler
# has drained the buffer below a high-water mark, which pushes back onto hypercorn's bounded
# queue and from there onto the TCP window.


class _FlowBody(TrioBody):
    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        super().__init__(expected_content_length, max_content_length)
        self._drained: trio.Event | None = None

    async def __anext__(self) -> bytes:
        data: bytes = await super().__anext__()
        if self._drained is not None:
            self._drained.set()
            self._drained = None
        return data

    async def wait_drained(self) -> None:
        while (
            len(self._data) > _BODY_HIGH_WATER
            and self._must_raise is None
            and not self._complete.is_set()
        ):
            self._drained = self._drained or trio.Event()
            await self._drained.wait()


class _FlowRequest(TrioRequest):
    body_class = _FlowBody


class _FlowConnection(TrioASGIHTTPConnection):
    # Same (nursery-taking) signature as quart-trio's own override of Quart's method.
    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, req: Any, receive: Any
    ) -> None:
        body: _FlowBody = req.body
        while True:
            message = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body.set_complete()
                else:
                    await body.wait_drained()
            elif message["type"] == "http.disconnect":
                break
        nursery.cancel_scope.cancel()


# -- request parsing --------------------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(max_bytes: int) -> dict[str, Any]:
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise ApiError(413, f"request body larger than {max_bytes} bytes", "payload_too_large")
    buf = bytearray()
    async for chunk in request.body:
        buf += chunk
        if len(buf) > max_bytes:
            raise ApiError(413, f"request body larger than {max_bytes} bytes", "payload_too_large")
    try:
        value = json.loads(bytes(buf), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise _bad("request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise _bad("request body must be a JSON object")
    return value


def _req_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(f"'{key}' is required and must be a non-empty string")
    return value


def _opt_obj(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is not None and not isinstance(value, dict):
        raise _bad(f"'{key}' must be a JSON object")
    return value


def _query(key: str) -> str:
    value = request.args.get(key)
    if not value:
        raise _bad(f"query parameter '{key}' is required")
    return value


def parse_duration(text: str) -> float:
    """Parse ``"5s"``, ``"500ms"``, ``"1m"``, ``"2h"`` or plain seconds into seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


# -- the app ----------------------------------------------------------------------------------


def create_app(
    service: QueueService,
    *,
    api_key: str,
    storage: FileStorage | None = None,
    public_url: str | None = None,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
) -> QuartTrio:
    """Build the queue server's ASGI app (QuartTrio) around ``service``.

    ``api_key`` guards every endpoint except the pre-signed upload. ``storage`` enables the
    ``/v1/storage`` endpoints (404 without it). ``public_url`` is the base written into pre-signed
    URLs; by default the scheme and host the request came in on. The app starts no background
    tasks: run ``service.run_reaper()`` next to it (``serve_queue`` does) so that expired leases
    reach waiting workers without other traffic.
    """
    if not api_key:
        raise ValueError("api_key must not be empty")
    app = QuartTrio("sprocket.queue_server")
    app.request_class = _FlowRequest
    app.asgi_http_class = _FlowConnection
    # Body limits are enforced per endpoint below (JSON vs. uploads), so Quart's global cap
    # (which would also apply to uploads) is off.
    app.config["MAX_CONTENT_LENGTH"] = None
    # A redirect from "//" to "/" would turn a refused storage name into a different request.
    app.url_map.merge_slashes = False
    key_bytes = api_key.encode()

    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> tuple[dict[str, Any], int]:
        return error.response()

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> tuple[dict[str, Any], int]:
        code = error.code or 500
        return ApiError(code, error.name, error.name.lower().replace(" ", "_")).response()

    @app.errorhandler(Exception)
    async def _internal_error(error: Exception) -> tuple[dict[str, Any], int]:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return ApiError(500, "internal server error", "internal_error").response()

    @app.before_request
    async def _authenticate() -> None:
        if request.method == "PUT" and request.path.startswith(_UPLOAD_PREFIX):
            return  # authorized by its signed token instead
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        valid = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("utf-8", "replace"), key_bytes
        )
        if not valid:
            raise ApiError(401, "missing or invalid API key", "unauthorized")

    def base_url() -> str:
        return (public_url or request.host_url).rstrip("/")

    # -- client endpoints ---------------------------------------------------------------------

    @app.post("/v1/queue/submit")
    async def submit() -> dict[str, Any]:
        body = await _read_json(max_json_bytes)
        model = _req_str(body, "model")
        if "payload" not in body or not isinstance(body["payload"], dict):
            raise _bad("'payload' is required and must be a JSON object")
        info = _opt_obj(body, "info")
        priority = body.get("priority", 0)
        if priority is None:
            priority = 0
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise _bad("'priority' must be an integer")
        if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise _bad("'priority' is out of range")
        request_id = await service.submit(model, body["payload"], info=info, priority=priority)
        return {"requestId": request_id, "status": "pending"}

    @app.get("/v1/queue/status")
    async def status() -> dict[str, Any]:
        request_id, model = _query("request_id"), _query("model")
        try:
            job = await service.get(model, request_id)
        except JobNotFound:
            raise ApiError(404, "unknown request_id for this model", "not_found") from None
        return job.public()

    @app.post("/v1/queue/cancel")
    async def cancel() -> dict[str, Any]:
        body = await _read_json(max_json_bytes)
        model, request_id = _req_str(body, "model"), _req_str(body, "request_id")
        running = body.get("running", False)
        if not isinstance(running, bool):
            raise _bad("'running' must be a boolean")
        try:
            job = await service.cancel(model, request_id, running=running)
        except JobNotFound:
            raise ApiError(404, "unknown request_id for this model", "not_found") from None
        return {"status": job.status}

    @app.post("/v1/queue/clear")
    async def clear() -> dict[str, Any]:
        body = await _read_json(max_json_bytes)
        return {"canceled_count": await service.clear(_req_str(body, "model"))}

    @app.get("/v1/queue/metrics")
    async def metrics() -> dict[str, Any]:
        return (await service.metrics(_query("model"))).public()

    # -- worker endpoints ---------------------------------------------------------------------

    @app.get("/internal/v1/queue/retrieve")
    async def retrieve() -> dict[str, Any]:
        model = _query("model")
        try:
            wait = parse_duration(request.args.get("timeout", "0"))
            raw_lease = request.args.get("claim_timeout")
            lease = None if raw_lease is None else parse_duration(raw_lease)
        except ValueError as error:
            raise _bad(str(error)) from None
        if lease is not None and not 0 < lease <= MAX_CLAIM_TIMEOUT:
            raise _bad(f"'claim_timeout' must be in (0, {MAX_CLAIM_TIMEOUT:g}] seconds")
        job = await service.claim(
            model, wait=wait, claim_timeout=lease, hostname=request.args.get("hostname")
        )
        # No job: a body without "data", as the managed queue answers an empty poll.
        return {} if job is None else {"data": job.claim_data()}

    @app.post("/internal/v1/videos/status")
    async def update_status() -> dict[str, Any]:
        body = await _read_json(max_json_bytes)
        model, request_id = _req_str(body, "model"), _req_str(body, "request_id")
        new_status = body.get("status")
        if new_status not in ("running", "done", "failed"):
            raise _bad("'status' must be one of 'running', 'done', 'failed'")
        payload, info = _opt_obj(body, "payload"), _opt_obj(body, "info")
        claim_id = body.get("claim_id")
        if claim_id is not None and not isinstance(claim_id, str):
            raise _bad("'claim_id' must be a string")
        try:
            job = await service.update(
                model, request_id, new_status, payload=payload, info=info, claim_id=claim_id
            )
        except JobNotFound:
            raise ApiError(404, "unknown request_id for this model", "not_found") from None
        except JobConflict as conflict:
            raise ApiError(
                409,
                f"this worker no longer holds the job: {conflict.reason}",
                "conflict",
                status=conflict.status,
            ) from None
        return {"request_id": job.request_id, "status": job.status}

    # -- storage ------------------------------------------------------------------------------

    def need_storage() -> FileStorage:
        if storage is None:
            raise ApiError(404, "storage is not enabled on this server", "not_found")
        return storage

    def checked_name(store: FileStorage, name: str) -> str:
        try:
            store.path_for(name)
        except InvalidName:
            raise _bad("invalid file name") from None
        return name

    @app.post("/v1/storage/upload-request")
    async def upload_request() -> dict[str, Any]:
        store = need_storage()
        body = await _read_json(max_json_bytes)
        name = checked_name(store, _req_str(body, "filename"))
        expires, signature = store.sign_upload(name)
        base, quoted = base_url(), quote(name, safe="")
        return {
            "upload_url": {
                "url": f"{base}{_UPLOAD_PREFIX}{quoted}?expires={expires}&signature={signature}",
                "method": "PUT",
                "expires_at": expires,
            },
            "file_url": f"{base}/v1/storage/{quoted}",
        }

    @app.put(_UPLOAD_PREFIX + "<path:name>")
    async def upload(name: str) -> dict[str, Any]:
        store = need_storage()
        token_ok = store.verify_upload(
            name, request.args.get("expires", ""), request.args.get("signature", "")
        )
        if not token_ok:
            raise ApiError(403, "invalid or expired upload signature", "forbidden")
        checked_name(store, name)
        declared = request.content_length
        too_large = ApiError(
            413, f"file larger than {store.max_upload_bytes} bytes", "payload_too_large"
        )
        if declared is not None and declared > store.max_upload_bytes:
            raise too_large
        try:
            size = await store.write_stream(name, request.body)
        except UploadTooLarge:
            raise too_large from None
        return {"name": name, "size": size}

    @app.get("/v1/storage/<path:name>")
    async def download(name: str) -> Response:
        store = need_storage()
        checked_name(store, name)
        size = store.size_of(name)
        if size is None:
            raise ApiError(404, "no such file", "not_found")
        try:
            chunks: AsyncIterator[bytes] = await store.read_stream(name)
        except FileNotFoundError:
            raise ApiError(404, "no such file", "not_found") from None
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        response = Response(
            chunks, status=200, headers={"Content-Length": str(size)}, content_type=content_type
        )
        response.timeout = None  # a large file may take longer than RESPONSE_TIMEOUT to send
        return response

    return app
