"""A worker that reads a large input and writes a large output in chunks (constant memory)."""

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import sprocket


class Io(sprocket.Sprocket):
    def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        digest = hashlib.sha256()
        with open(args["input_file"], "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        out = Path(tempfile.mkdtemp()) / "out.bin"
        block = b"\xab" * (1 << 20)
        with out.open("wb") as f:
            for _ in range(int(args["out_mib"])):
                f.write(block)
        return {"input_sha256": digest.hexdigest(), "file": sprocket.FileOutput(out)}


if __name__ == "__main__":
    sprocket.run(Io(), "bench-io")
