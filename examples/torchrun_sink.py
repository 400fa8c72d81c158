"""A multi-rank worker on CPU (gloo): the torchrun tests and benchmark drive it.

Run ``WORLD_SIZE=2 python examples/torchrun_sink.py --port 8000`` and POST to ``/generate``.
Every rank all-reduces ``rank + 1``; rank 0 returns ``{"world_size": W, "sum": S}`` and the
other ranks return ``None``. ``predict`` also accepts:
  sleep       seconds every rank sleeps (before the all-reduce)
  progress    N -> rank 0 calls ``emit_info({"progress": i/N})`` N times, spread over the sleep
  crash_rank  that rank calls ``os._exit(3)``
  fail_rank   that rank (or each rank of a list) raises ``RuntimeError``
  file_bytes  N -> rank 0 writes a file of N bytes and returns it as ``{"file": FileOutput}``
  empty       true -> skip the all-reduce; rank 0 returns ``{}`` (the IPC benchmark)
  none        true -> every rank returns ``None`` (an error: no rank returned outputs)

Environment: ``TORCHRUN_SINK_FAIL_SETUP_RANK`` / ``TORCHRUN_SINK_FAIL_SHUTDOWN_RANK`` (that
rank's ``setup()`` / ``shutdown()`` raises), ``TORCHRUN_SINK_MARKER_DIR`` (``shutdown()`` writes
``shutdown-<rank>`` there).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sprocket

if TYPE_CHECKING:
    import torch

# torch is imported in setup(), which runs only in the ranks: the supervising parent process
# never loads it (a faster start and exit, and no chance of it touching the GPUs).


class TorchrunSink(sprocket.Sprocket):
    warmup_inputs = [{"empty": True}]

    def setup(self) -> None:
        rank = int(os.environ["RANK"])
        if os.environ.get("TORCHRUN_SINK_FAIL_SETUP_RANK") == str(rank):
            raise ValueError(f"rank {rank} could not load its weights")
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        dist.init_process_group("gloo")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.out_dir = Path(tempfile.mkdtemp(prefix="torchrun-sink-"))

    def predict(self, args: dict[str, Any]) -> dict[str, Any] | None:
        if args.get("empty"):
            return {} if self.rank == 0 else None
        steps = int(args.get("progress", 0))
        sleep_s = float(args.get("sleep", 0))
        for i in range(1, max(steps, 1) + 1):
            time.sleep(sleep_s / max(steps, 1))
            if steps and self.rank == 0:
                sprocket.emit_info({"progress": i / steps})
        if args.get("crash_rank") == self.rank:
            os._exit(3)
        total: torch.Tensor = self.torch.tensor([self.rank + 1])
        self.dist.all_reduce(total)
        # After the collective: a rank that raised before it would leave the others waiting in
        # all_reduce until the process group's timeout.
        fail = args.get("fail_rank")
        if fail == self.rank or (isinstance(fail, list) and self.rank in fail):
            raise RuntimeError(f"rank {self.rank} was asked to fail")
        if self.rank != 0 or args.get("none"):
            return None
        outputs: dict[str, Any] = {"world_size": self.world_size, "sum": int(total.item())}
        if "file_bytes" in args:
            path = self.out_dir / f"sink-{time.monotonic_ns()}.bin"
            path.write_bytes(os.urandom(int(args["file_bytes"])))
            outputs["file"] = sprocket.FileOutput(path)
        return outputs

    def shutdown(self) -> None:
        marker_dir = os.environ.get("TORCHRUN_SINK_MARKER_DIR")
        if marker_dir:
            Path(marker_dir, f"shutdown-{self.rank}").write_text("ok\n")
        self.dist.destroy_process_group()
        if os.environ.get("TORCHRUN_SINK_FAIL_SHUTDOWN_RANK") == str(self.rank):
            raise RuntimeError(f"rank {self.rank} could not release its resources")


if __name__ == "__main__":
    sprocket.run(TorchrunSink(), "torchrun-sink", use_torchrun=True)
