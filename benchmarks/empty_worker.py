"""A worker whose predict does nothing (or spins), for measuring the runtime's own overhead."""

import time
from typing import Any

import sprocket


class Empty(sprocket.Sprocket):
    def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        spin = float(args.get("spin", 0))
        end = time.perf_counter() + spin
        while time.perf_counter() < end:
            pass
        return {}


if __name__ == "__main__":
    sprocket.run(Empty(), "bench-empty")
