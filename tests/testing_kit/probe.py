"""A sprocket for the kit's tests: each payload key asks for one behaviour, in virtual time."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import trio

import sprocket
from sprocket import testing


class SlowFinalize(sprocket.InputOutputProcessor):
    """``finalize`` takes ``finalize_sleep`` seconds of (virtual) time on the Trio loop."""

    async def finalize(
        self, request_id: str, inputs: dict[str, Any], outputs: dict[str, Any]
    ) -> dict[str, Any]:
        await trio.sleep(float(inputs.get("finalize_sleep", 0)))
        return outputs


class Probe(sprocket.Sprocket):
    """Payload keys: ``sleep`` (virtual seconds), ``gate`` (name of a ``Gate`` to wait on),
    ``progress`` (N emit_info calls), ``file_bytes`` (a FileOutput), ``fail`` (raise),
    ``finalize_sleep``; any value that was an input URL comes back as its local path."""

    processor = SlowFinalize

    def __init__(self, shutdown_seconds: float = 0.0) -> None:
        self.predicted: list[dict[str, Any]] = []
        self.finished: list[dict[str, Any]] = []
        self.shutdowns = 0
        self.shutdown_seconds = shutdown_seconds
        self.gates: dict[str, testing.Gate] = {}
        self.out_dir = Path(tempfile.mkdtemp(prefix="probe-"))

    def gate(self, name: str) -> testing.Gate:
        return self.gates.setdefault(name, testing.Gate())

    def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        self.predicted.append(dict(args))
        if "gate" in args:
            testing.wait(self.gates[args["gate"]])
        steps = int(args.get("progress", 0))
        seconds = float(args.get("sleep", 0))
        for i in range(max(steps, 1)):
            testing.sleep(seconds / max(steps, 1))
            if steps:
                sprocket.emit_info({"progress": (i + 1) / steps})
        if "fail" in args:
            raise RuntimeError(str(args["fail"]))
        outputs: dict[str, Any] = {"ok": True}
        if "x" in args:
            outputs["x"] = args["x"]
        for key, value in args.items():
            if key.startswith("in_"):
                path = Path(value)
                outputs[key] = {"path": str(path), "bytes": len(path.read_bytes())}
        if "file_bytes" in args:
            path = self.out_dir / "out.bin"
            path.write_bytes(b"\x07" * int(args["file_bytes"]))
            outputs["file"] = sprocket.FileOutput(path)
        self.finished.append(dict(args))
        return outputs

    def shutdown(self) -> None:
        self.shutdowns += 1
        testing.sleep(self.shutdown_seconds)
