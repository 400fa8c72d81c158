"""The "external" side of ``FakeQueue``: https files and redirects a test publishes on any
host, and the fake DNS that resolves the hosts the queue knows."""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

import httpx
import trio

from ._transport import paced_stream, timeout_of

if TYPE_CHECKING:
    from ._faults import Fault

__all__ = ["FakeFiles", "ServedFile"]


@dataclasses.dataclass
class ServedFile:
    data: bytes
    status: int
    headers: dict[str, str]
    bytes_per_second: float | None
    declare_length: bool


def _normal(url: str) -> str:
    # As a client will send it: httpx resolves dot segments ("/a/../b" is "/b").
    return str(httpx.URL(url))


class FakeFiles:
    """Published files and redirects by URL, and the fake DNS of every host involved."""

    def __init__(self) -> None:
        self._files: dict[str, ServedFile | str] = {}
        self._redirect_status: dict[str, int] = {}
        self._hosts: dict[str, list[str]] = {}
        self._address_pool = (f"203.0.113.{n}" for n in itertools.count(10))

    # -- DNS ----------------------------------------------------------------------------------

    def add_host(self, host: str, addresses: tuple[str, ...] = ()) -> None:
        """Resolve ``host`` to ``addresses``, or to a fresh public test address."""
        self._hosts[host.lower()] = list(addresses) or [next(self._address_pool)]

    async def resolve(self, host: str) -> list[str]:
        await trio.lowlevel.checkpoint()
        try:
            return list(self._hosts[host.lower().rstrip(".")])
        except KeyError:
            raise OSError(
                f"fake DNS: unknown host {host!r} (serve a file on it or queue.add_host() it)"
            ) from None

    # -- publishing ---------------------------------------------------------------------------

    def serve(self, url: str, file: ServedFile) -> None:
        self._register(url)
        self._files[_normal(url)] = file

    def redirect(self, url: str, location: str, status: int) -> None:
        self._register(url)
        self._files[_normal(url)] = location
        self._redirect_status[_normal(url)] = status

    def _register(self, url: str) -> None:
        host = httpx.URL(url).host.lower()
        if host not in self._hosts:
            self.add_host(host)

    # -- answering ----------------------------------------------------------------------------

    def _key(self, request: httpx.Request) -> str:
        full = str(request.url)
        return full if full in self._files else str(request.url.copy_with(query=None))

    def served(self, request: httpx.Request) -> ServedFile | str | None:
        """What was published at the request's URL (with or without its query), if anything."""
        return self._files.get(self._key(request))

    def response(self, request: httpx.Request, throttle: Fault | None) -> httpx.Response:
        """The answer to a request for a file: the file (at the throttle's rate, if one fired,
        else at its own), a redirect, a 404 on a known host, or a refused connection."""
        served = self.served(request)
        if served is None:
            if request.url.host.lower() not in self._hosts:
                raise httpx.ConnectError(
                    f"fake queue: no such host {request.url.host}", request=request
                )
            return httpx.Response(404, json={"error": "no such file"}, request=request)
        if isinstance(served, str):
            status = self._redirect_status.get(self._key(request), 302)
            return httpx.Response(status, headers={"location": served}, request=request)
        rate = throttle.bytes_per_second if throttle is not None else served.bytes_per_second
        headers = dict(served.headers)
        if served.declare_length:
            headers["content-length"] = str(len(served.data))
        if request.method == "HEAD":
            return httpx.Response(served.status, headers=headers, request=request)
        stream = paced_stream(served.data, rate, timeout_of(request, "read"))
        return httpx.Response(served.status, headers=headers, stream=stream, request=request)
