"""The worker's HTTP app: ``/health``, ``/metrics`` and ``/generate``.

The three hot routes are answered by a lean ASGI layer in front of the quart-trio app, which
keeps the framework's request machinery off the paths the platform polls and the latency-bound
``/generate``; every other request (404s, 405s, anything a user mounts) goes to quart-trio.
"""

from __future__ import annotations

import json
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, request
from quart_trio import QuartTrio

from ._http_jobs import Busy, HttpJobs
from ._lifecycle import Lifecycle
from ._metrics import Metrics

__all__ = ["create_app", "serve_http"]

MAX_BODY_BYTES = 64 * 1024 * 1024

_JSON = b"application/json"
_HEALTHY = (200, _JSON, b'{"status": "healthy"}')
_UNHEALTHY = (503, _JSON, b'{"status": "unhealthy"}')


def _error(status: int, message: str) -> tuple[int, bytes, bytes]:
    return status, _JSON, json.dumps({"error": message}).encode()


class WorkerApp:
    """ASGI app: the hot routes answered directly, the rest delegated to quart-trio."""

    def __init__(self, lifecycle: Lifecycle, metrics: Metrics, jobs: HttpJobs) -> None:
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.jobs = jobs
        self.quart = _fallback_app()

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http":
            route = (scope["method"], scope["path"])
            if route in (("GET", "/health"), ("HEAD", "/health")):
                await _respond(send, *(_HEALTHY if self.lifecycle.healthy else _UNHEALTHY))
                return
            if route == ("GET", "/metrics"):
                body = self.metrics.exposition()
                await _respond(send, 200, CONTENT_TYPE_LATEST.encode(), body)
                return
            if route == ("POST", "/generate"):
                await _respond(send, *await self._generate(receive))
                return
        await self.quart(scope, receive, send)

    async def _generate(self, receive: ASGIReceiveCallable) -> tuple[int, bytes, bytes]:
        raw = await _read_body(receive)
        if raw is None:
            return _error(413, f"the body exceeds {MAX_BODY_BYTES} bytes")
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(400, f"the body is not valid JSON: {exc}")
        if not isinstance(payload, dict):
            return _error(400, f"the body must be a JSON object, not {type(payload).__name__}")
        try:
            ticket = self.jobs.offer(payload)
        except Busy as exc:
            return _error(503, str(exc))
        outcome = await ticket.wait()
        if outcome.error is not None:
            return _error(500, outcome.error)
        return 200, _JSON, json.dumps(outcome.outputs).encode()


async def _read_body(receive: ASGIReceiveCallable) -> bytes | None:
    """The whole request body, or None once it passes ``MAX_BODY_BYTES``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = cast(dict[str, Any], await receive())
        if message["type"] == "http.disconnect":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _respond(send: ASGISendCallable, status: int, content_type: bytes, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _fallback_app() -> QuartTrio:
    """quart-trio for everything that is not a hot route: JSON 404/405 answers."""
    app = QuartTrio("sprocket")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    def as_json(status: int, message: str) -> Response:
        return Response(json.dumps({"error": message}), status=status, mimetype="application/json")

    @app.errorhandler(404)
    async def not_found(_: Exception) -> Response:
        return as_json(404, f"no route {request.method} {request.path}")

    @app.errorhandler(405)
    async def not_allowed(_: Exception) -> Response:
        return as_json(405, f"{request.method} is not allowed on {request.path}")

    for path, methods in (("/health", ["GET"]), ("/metrics", ["GET"]), ("/generate", ["POST"])):

        async def wrong_method() -> Response:
            return as_json(405, f"{request.method} is not allowed on {request.path}")

        # Registered so quart answers other methods on the hot routes with 405, not 404.
        app.add_url_rule(path, f"hot{path}", wrong_method, methods=methods)
    return app


def create_app(lifecycle: Lifecycle, metrics: Metrics, jobs: HttpJobs) -> WorkerApp:
    """The ASGI app serving one worker's state."""
    return WorkerApp(lifecycle, metrics, jobs)


async def serve_http(
    app: WorkerApp,
    host: str,
    port: int,
    stop: trio.Event,
    *,
    graceful_timeout: float = 5.0,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``stop`` is set, then drain connections for ``graceful_timeout``.

    Reports the bound addresses (``http://host:port``) through ``task_status``.
    """
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = 75
    await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
