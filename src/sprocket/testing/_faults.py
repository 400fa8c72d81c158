"""Fault injection: the ``Fault`` rule, which rules fire on a request, and the ``FakeQueue``
methods that register rules (``fail``, ``delay``, ``hang``, ``drop_response``, ``disconnect``,
``throttle``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import trio

from ._records import ENDPOINTS, Endpoint, RecordedRequest

if TYPE_CHECKING:
    from ._fake_queue import FakeQueue

__all__ = ["Fault", "FaultInjection", "FaultKind", "error_body", "fire"]

FaultKind = Literal["error", "delay", "hang", "drop", "disconnect", "throttle"]
#: Kinds that decide a request's outcome: at most one such rule fires per request.
_OUTCOME_KINDS: Final = frozenset({"error", "disconnect", "drop"})


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

    async def _stall(self) -> None:
        # A delay sleeps, a hang waits for release; other kinds do not hold the request.
        if self.kind == "delay":
            await trio.sleep(self.seconds)
        elif self.kind == "hang":
            await self._released.wait()


def fire(faults: Iterable[Fault], record: RecordedRequest, now: float) -> list[Fault]:
    """The rules that fire on ``record``, in order; their hits and labels are recorded.

    Latency, hangs and throttling stack; of the rules that decide the outcome (error,
    disconnect, drop) only the first matching one fires, so ``times`` counts stay exact.
    """
    fired: list[Fault] = []
    decided = False
    for fault in faults:
        outcome = fault.kind in _OUTCOME_KINDS
        if outcome and decided:
            continue
        if fault._matches(record, now):
            fired.append(fault)
            decided = decided or outcome
    for fault in fired:
        fault.hits += 1
        record.faults.append(fault.label)
    return fired


def error_body(fault: Fault) -> Any:
    """The JSON body an ``error`` fault answers with."""
    if fault.json_body is not None:
        return fault.json_body
    return {
        "error": {
            "message": f"injected fault: HTTP {fault.status}",
            "type": "injected_fault",
            "code": fault.status,
        }
    }


class FaultInjection:
    """``FakeQueue``'s fault-registering methods; each adds one ``Fault`` to ``faults``."""

    faults: list[Fault]

    def _add(
        self,
        kind: FaultKind,
        endpoint: str,
        times: int | None,
        start: float | None,
        duration: float | None,
        probability: float,
        when: Callable[[RecordedRequest], bool] | None,
        **options: Any,
    ) -> Fault:
        # The window (times, start, duration, probability, when) is common to every kind;
        # ``options`` are what the kind itself takes.
        fault = Fault(
            cast("FakeQueue", self),
            kind,
            endpoint,
            times=times,
            start=start,
            duration=duration,
            probability=probability,
            when=when,
            **options,
        )
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
        window = (times, start, duration, probability, when)
        return self._add("error", endpoint, *window, status=status, json_body=json)

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
        window = (times, start, duration, probability, when)
        return self._add("delay", endpoint, *window, seconds=seconds, after_apply=after_apply)

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
        window = (times, start, duration, probability, when)
        return self._add("hang", endpoint, *window, after_apply=after_apply)

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
        window = (times, start, duration, probability, when)
        return self._add("drop", endpoint, *window)

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
        window = (times, start, duration, probability, when)
        return self._add("disconnect", endpoint, *window)

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
        window = (times, start, duration, probability, when)
        return self._add("throttle", endpoint, *window, bytes_per_second=bytes_per_second)

    def clear_faults(self) -> None:
        """Remove every fault (hanging requests are released)."""
        for fault in self.faults:
            fault.remove()
        self.faults.clear()
