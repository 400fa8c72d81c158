"""The worker's HTTP app: ``/health``, ``/metrics`` and ``/generate`` on quart-trio."""

from __future__ import annotations

import json
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, request
from quart_trio import QuartTrio

from ._http_jobs import Busy, HttpJobs
from ._lifecycle import Lifecycle
from ._metrics import Metrics

__all__ = ["create_app", "serve_http"]

MAX_BODY_BYTES = 64 * 1024 * 1024
_HEALTHY = json.dumps({"status": "healthy"})
_UNHEALTHY = json.dumps({"status": "unhealthy"})


def _json(body: Any, status: int) -> Response:
    text = body if isinstance(body, str) else json.dumps(body)
    return Response(text, status=status, mimetype="application/json")


def create_app(lifecycle: Lifecycle, metrics: Metrics, jobs: HttpJobs) -> QuartTrio:
    """The quart-trio app serving one worker's state."""
    app = QuartTrio("sprocket")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.get("/health")
    async def health() -> Response:
        if lifecycle.healthy:
            return _json(_HEALTHY, 200)
        return _json(_UNHEALTHY, 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), status=200, content_type=CONTENT_TYPE_LATEST)

    @app.post("/generate")
    async def generate() -> Response:
        raw = await request.get_data()
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _json({"error": f"the body is not valid JSON: {exc}"}, 400)
        if not isinstance(payload, dict):
            return _json(
                {"error": f"the body must be a JSON object, not {type(payload).__name__}"}, 400
            )
        try:
            ticket = jobs.offer(payload)
        except Busy as exc:
            return _json({"error": str(exc)}, 503)
        outcome = await ticket.wait()
        if outcome.error is not None:
            return _json({"error": outcome.error}, 500)
        return _json(outcome.outputs, 200)

    @app.errorhandler(404)
    async def not_found(_: Exception) -> Response:
        return _json({"error": f"no route {request.method} {request.path}"}, 404)

    @app.errorhandler(405)
    async def not_allowed(_: Exception) -> Response:
        return _json({"error": f"{request.method} is not allowed on {request.path}"}, 405)

    @app.errorhandler(413)
    async def too_large(_: Exception) -> Response:
        return _json({"error": f"the body exceeds {MAX_BODY_BYTES} bytes"}, 413)

    return app


async def serve_http(
    app: QuartTrio,
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
