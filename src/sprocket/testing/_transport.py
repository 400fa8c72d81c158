"""The in-process ``httpx`` transport of ``FakeQueue``: every request is recorded, the faults
that fire on it are applied, and it is answered by the queue server's app (through
``httpx.ASGITransport``) or by a published file, with no sockets, so the mock clock stays exact.
Throttled bodies move in pieces, each one a virtual-time pause."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, cast

import httpx
import trio

from ._faults import Fault, error_body, fire
from ._records import RecordedRequest, classify, describe_failure, record_request

if TYPE_CHECKING:
    from ._fake_queue import FakeQueue

__all__ = ["QueueTransport", "paced_stream", "timeout_of"]

#: Largest piece of a throttled body: each piece is one virtual-time sleep.
_THROTTLE_PIECE: Final = 64 * 1024


def _piece_size(rate: float) -> int:
    # About one second per piece, like bytes trickling over TCP: a timeout applies per
    # piece, so a slow-but-moving body does not look hung.
    return max(1, min(_THROTTLE_PIECE, int(rate)))


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def timeout_of(request: httpx.Request, kind: str) -> float | None:
    """The client's ``kind`` timeout (``"read"``, ``"write"``) for ``request``, if any."""
    timeout: float | None = request.extensions.get("timeout", {}).get(kind)
    return timeout


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


def paced_stream(data: bytes, rate: float | None, read_timeout: float | None) -> _Stream:
    """A response body of ``data`` at ``rate`` bytes per virtual second (``None``: at once)."""
    if rate:
        return _Stream(_pieces(data, _piece_size(rate)), lambda n: n / rate, read_timeout)
    return _Stream(_pieces(data, _THROTTLE_PIECE), lambda n: 0.0, read_timeout)


class _AsyncIter(httpx.AsyncByteStream):
    def __init__(self, iterator: AsyncIterator[bytes]) -> None:
        self._iterator = iterator

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._iterator:
            yield chunk


class QueueTransport(httpx.AsyncBaseTransport):
    """Routes every request of the worker's clients into the fake queue (no sockets)."""

    def __init__(self, queue: FakeQueue) -> None:
        self._queue = queue
        # Quart's precise ASGI types are narrower than httpx's generic callable signature.
        self._asgi = httpx.ASGITransport(app=cast(Any, queue.app))

    async def aclose(self) -> None:
        # The worker's clients close their transport on exit; the queue outlives them.
        return None

    def _endpoint(self, request: httpx.Request) -> str:
        queue = self._queue
        if queue._files.served(request) is not None:
            return "file"  # a file or redirect the test published, even on the API host
        return classify(request, (queue.api_base_url, queue.upload_base_url))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        queue = self._queue
        record = await record_request(request, self._endpoint(request))
        queue.requests.append(record)
        fired = fire(queue.faults, record, trio.current_time())
        queue._notify()
        read_timeout = timeout_of(request, "read")
        try:
            # httpx enforces its timeouts in the network layer, which an in-process transport
            # replaces; honour the read timeout here so a hung request fails as it would.
            with trio.fail_after(math.inf if read_timeout is None else read_timeout) as scope:
                response = await self._exchange(request, record, fired, scope)
        except trio.TooSlowError:
            record.error = "timeout"
            raise httpx.ReadTimeout("read timed out (fake queue)", request=request) from None
        except BaseException as exc:
            record.error = record.error or describe_failure(exc)
            raise
        finally:
            record.finished_at = trio.current_time()
            queue._observe()
            queue._notify()
        return response

    async def _exchange(
        self,
        request: httpx.Request,
        record: RecordedRequest,
        fired: list[Fault],
        scope: trio.CancelScope,
    ) -> httpx.Response:
        throttle = next((f for f in fired if f.kind == "throttle"), None)
        rate = throttle.bytes_per_second if throttle is not None else None
        for fault in fired:
            if fault.after_apply:
                continue
            if fault.kind == "disconnect":
                record.error = "disconnected"
                raise httpx.ConnectError("connection refused (injected)", request=request)
            await fault._stall()
        error = next((f for f in fired if f.kind == "error"), None)
        if error is not None:
            body = error_body(error)
            record.status, record.response_json = error.status, body
            record.applied_at = trio.current_time()
            return httpx.Response(error.status, json=body, request=request)

        if record.endpoint == "upload":
            request = self._counted_upload(request, record, rate, scope)
        if record.endpoint == "file":
            response = self._queue._files.response(request, throttle)
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
        if rate and record.endpoint not in ("upload", "file"):
            # The answer trickles in: the client has its headers but not yet its body.
            response = httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=paced_stream(response.content, rate, timeout_of(request, "read")),
                request=request,
            )
        for fault in fired:
            if fault.after_apply:
                await fault._stall()
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
        rate: float | None,
        scope: trio.CancelScope,
    ) -> httpx.Request:
        source = request.stream
        write_timeout = timeout_of(request, "write")

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
