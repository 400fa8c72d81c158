"""A small synchronous client for the queue's client endpoints, used by the CLI."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, Final, TextIO

import httpx

__all__ = [
    "DEFAULT_BASE_URL",
    "TERMINAL",
    "ProgressPrinter",
    "QueueApiError",
    "QueueClient",
    "wait_for_job",
]

DEFAULT_BASE_URL: Final = "https://api.together.ai"
TERMINAL: Final = frozenset({"done", "failed", "canceled"})


class QueueApiError(Exception):
    """The queue answered with an error (or could not be reached)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class QueueClient:
    """Client endpoints of the queue protocol (``/v1/queue/...``) over httpx."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> QueueClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise QueueApiError(
                f"cannot reach the queue at {self._http.base_url}: {error}"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_error:
            message = response.reason_phrase
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                message = str(body["error"].get("message", message))
            elif isinstance(body, dict) and "message" in body:
                message = str(body["message"])
            raise QueueApiError(f"HTTP {response.status_code}: {message}", response.status_code)
        if not isinstance(body, dict):
            raise QueueApiError(f"unexpected answer from {path}: not a JSON object")
        return body

    def submit(
        self,
        model: str,
        payload: dict[str, Any],
        *,
        info: dict[str, Any] | None = None,
        priority: int | None = None,
    ) -> str:
        """Submit a job; return its request id."""
        body: dict[str, Any] = {"model": model, "payload": payload}
        if info is not None:
            body["info"] = info
        if priority is not None:
            body["priority"] = priority
        answer = self._call("POST", "/v1/queue/submit", json=body)
        request_id = answer.get("requestId") or answer.get("request_id")
        if not isinstance(request_id, str):
            raise QueueApiError("submit answer carries no requestId")
        return request_id

    def status(self, model: str, request_id: str) -> dict[str, Any]:
        """The job object."""
        params = {"model": model, "request_id": request_id}
        return self._call("GET", "/v1/queue/status", params=params)

    def cancel(self, model: str, request_id: str, *, running: bool = False) -> str:
        """Cancel a job; return its status afterwards."""
        body: dict[str, Any] = {"model": model, "request_id": request_id}
        if running:
            body["running"] = True
        return str(self._call("POST", "/v1/queue/cancel", json=body).get("status"))

    def clear(self, model: str) -> int:
        """Cancel every pending job of a model; return how many."""
        return int(self._call("POST", "/v1/queue/clear", json={"model": model})["canceled_count"])

    def metrics(self, model: str) -> dict[str, Any]:
        """Queue depth of a model."""
        return self._call("GET", "/v1/queue/metrics", params={"model": model})


def _fraction(progress: object) -> float | None:
    """``info.progress`` as a fraction: values up to 1 are fractions, up to 100 percentages."""
    if isinstance(progress, bool) or not isinstance(progress, int | float):
        return None
    value = float(progress)
    if not math.isfinite(value) or value < 0:
        return None
    return min(value if value <= 1.0 else value / 100.0, 1.0)


class ProgressPrinter:
    """Shows a job's progress: a redrawn bar on a terminal, one line per change otherwise."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, width: int = 30) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.width = width
        self._last: tuple[str, float | None, str] | None = None
        self._drawn = 0

    def show(self, job: dict[str, Any]) -> None:
        """Render the job's current state if it changed."""
        info = job.get("info") if isinstance(job.get("info"), dict) else {}
        assert isinstance(info, dict)
        state = str(job.get("status", "?"))
        fraction = _fraction(info.get("progress"))
        text = info.get("status")
        text = "" if text is None else str(text)
        key = (state, None if fraction is None else round(fraction, 3), text)
        if key == self._last:
            return
        self._last = key
        if self.tty:
            filled = 0 if fraction is None else round(fraction * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            pct = "  ?%" if fraction is None else f"{fraction * 100:3.0f}%"
            line = f"[{bar}] {pct} {state:<8} {text}".rstrip()[:200]
            pad = " " * max(0, self._drawn - len(line))
            self.stream.write("\r" + line + pad)
            self._drawn = len(line)
        else:
            parts = [state]
            if fraction is not None:
                parts.append(f"{fraction * 100:.0f}%")
            if text:
                parts.append(text)
            self.stream.write(" ".join(parts) + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the bar's line (terminal mode)."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0


def wait_for_job(
    client: QueueClient,
    model: str,
    request_id: str,
    *,
    interval: float = 0.5,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the job until it reaches a terminal state; return the final job object."""
    while True:
        job = client.status(model, request_id)
        if on_update is not None:
            on_update(job)
        if job.get("status") in TERMINAL:
            return job
        sleep(interval)


def default_stream() -> TextIO:
    """Where progress goes: stderr, so that stdout carries only the JSON result."""
    return sys.stderr
