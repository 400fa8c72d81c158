"""A worker that exercises every feature; the demo and the end-to-end tests drive it.

``predict`` accepts any mix of:
  text        str  -> output ``text`` upper-cased
  sleep       seconds of ``time.sleep``
  spin        seconds of a CPU-bound pure-Python loop
  progress    N    -> ``emit_info({"progress": i/N})`` N times, spread over the sleep/spin
  file_bytes  N    -> a file of N bytes, returned as ``{"file": FileOutput(...)}``
  input_file  a local path (an https URL before download) -> ``input_size``, ``input_sha256``
  fail        str  -> raise ``RuntimeError`` with it
  crash       true -> ``os._exit(3)``

Environment: ``KITCHEN_SINK_SETUP_SECONDS`` (setup sleep), ``KITCHEN_SINK_SHUTDOWN_MARKER``
(a file that ``shutdown()`` appends a line to).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import sprocket


class KitchenSink(sprocket.Sprocket):
    warmup_inputs = [{"text": "warmup"}]

    def setup(self) -> None:
        time.sleep(float(os.environ.get("KITCHEN_SINK_SETUP_SECONDS", "0")))
        self.out_dir = Path(tempfile.mkdtemp(prefix="kitchen-sink-"))

    def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        if "text" in args:
            outputs["text"] = str(args["text"]).upper()
        if args.get("crash"):
            os._exit(3)
        steps = int(args.get("progress", 0))
        sleep_s = float(args.get("sleep", 0))
        spin_s = float(args.get("spin", 0))
        slices = max(steps, 1)
        for i in range(1, slices + 1):
            if sleep_s:
                time.sleep(sleep_s / slices)
            if spin_s:
                _spin(spin_s / slices)
            if steps:
                sprocket.emit_info({"progress": i / steps})
        if "input_file" in args:
            data = Path(args["input_file"]).read_bytes()
            outputs["input_size"] = len(data)
            outputs["input_sha256"] = hashlib.sha256(data).hexdigest()
        if "file_bytes" in args:
            outputs["file"] = self._write_file(int(args["file_bytes"]))
        if "fail" in args:
            raise RuntimeError(str(args["fail"]))
        return outputs

    def _write_file(self, size: int) -> sprocket.FileOutput:
        path = self.out_dir / f"output-{time.monotonic_ns()}.bin"
        chunk = bytes(range(256)) * 4096
        with path.open("wb") as f:
            left = size
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        return sprocket.FileOutput(path)

    def shutdown(self) -> None:
        marker = os.environ.get("KITCHEN_SINK_SHUTDOWN_MARKER")
        if marker:
            with open(marker, "a") as f:
                f.write(f"shutdown {os.getpid()}\n")


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1


if __name__ == "__main__":
    sprocket.run(KitchenSink(), "kitchen-sink")
