"""The classes users subclass or return: the SDK's public surface."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import httpx

__all__ = ["AsyncSprocket", "FileOutput", "InputOutputProcessor", "Sprocket"]


class FileOutput(pathlib.PosixPath):
    """A local file that the runtime uploads after ``predict()``.

    Return it anywhere in the outputs dict; the runtime streams it to storage and replaces it with
    the file's URL in the job's result.
    """


class InputOutputProcessor:
    """Hooks around a job: how input files are written, and a last look at the outputs.

    Subclass it and set ``processor = MyProcessor`` on the sprocket class.
    """

    def process_input_file(self, resp: httpx.Response, dst: Path) -> None:
        """Write the downloaded input ``resp`` to ``dst``.

        Runs in a worker thread. The body is already on local disk, so reading it with
        ``resp.iter_bytes()`` is cheap; ``resp.content`` loads it whole into memory. The default
        copies the body to ``dst`` in chunks.
        """
        with dst.open("wb") as f:
            for chunk in resp.iter_bytes():
                f.write(chunk)

    async def finalize(
        self, request_id: str, inputs: dict[str, Any], outputs: dict[str, Any]
    ) -> dict[str, Any]:
        """Post-process ``outputs`` after ``predict()`` and before ``FileOutput`` uploads.

        An asyncio-free coroutine run on the worker's Trio loop; keep it short or offload heavy
        work. The default returns ``outputs`` unchanged.
        """
        return outputs


class Sprocket:
    """Base class of a synchronous worker.

    ``setup()``, ``predict()`` and ``shutdown()`` run in a worker thread, never on the event
    loop, so ``/health`` keeps answering during a long CPU-bound predict. Jobs run one at a time.
    """

    processor: ClassVar[type[InputOutputProcessor]] = InputOutputProcessor
    warmup_inputs: ClassVar[list[dict[str, Any]]] = []

    def setup(self) -> None:
        """Load models and resources; called once before the worker turns healthy."""

    def predict(self, args: dict[str, Any]) -> dict[str, Any] | None:
        """Process one job and return its outputs."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict(args)")

    def shutdown(self) -> None:
        """Release resources; called exactly once after the last job's result was reported."""


class AsyncSprocket:
    """Base class of a worker whose methods are asyncio coroutines.

    The coroutines run on one dedicated asyncio event loop in its own thread, alive for the whole
    process, so asyncio engines (vLLM and the like) keep their loop between jobs. Cancelling a job
    (timeout, lost claim) cancels the asyncio task running ``predict()``.
    """

    processor: ClassVar[type[InputOutputProcessor]] = InputOutputProcessor
    warmup_inputs: ClassVar[list[dict[str, Any]]] = []

    async def setup(self) -> None:
        """Load models and resources; awaited once before the worker turns healthy."""

    async def predict(self, args: dict[str, Any]) -> dict[str, Any] | None:
        """Process one job and return its outputs."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict(args)")

    async def shutdown(self) -> None:
        """Release resources; awaited exactly once after the last job's result was reported."""


def is_default_process_input_file(processor: InputOutputProcessor) -> bool:
    """Whether ``processor`` keeps the default file writer (so downloads can skip a copy)."""
    method = type(processor).process_input_file
    return method is InputOutputProcessor.process_input_file


def describe_payload(payload: Mapping[str, Any]) -> str:
    """A log-safe summary of a payload: its keys, never its values."""
    return "keys=" + ",".join(sorted(str(k) for k in payload)[:20])
