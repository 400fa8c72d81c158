"""A rank without torch, for the rank-loop tests (the test plays the supervising parent).

``PLAIN_ASYNC=1`` serves an ``AsyncSprocket``; ``PLAIN_FAIL_SETUP=1`` makes ``setup()`` raise.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import sprocket
from sprocket._rank import run_rank


def _outputs(args: dict[str, Any]) -> dict[str, Any] | None:
    if args.get("emit"):
        sprocket.emit_info({"step": 1})
        sprocket.emit_info({"step": 2, "rank": os.environ["RANK"]})
    if args.get("raise"):
        raise KeyError("no such key")
    if args.get("file"):
        return {"nested": [{"f": sprocket.FileOutput("out.txt")}]}
    if args.get("not_json"):
        return {"value": object()}
    if args.get("none"):
        return None
    return {"echo": args}


class Plain(sprocket.Sprocket):
    def setup(self) -> None:
        if os.environ.get("PLAIN_FAIL_SETUP"):
            raise ValueError("setup went wrong")

    def predict(self, args: dict[str, Any]) -> dict[str, Any] | None:
        time.sleep(float(args.get("sleep", 0)))
        return _outputs(args)

    def shutdown(self) -> None:
        print("plain shutdown ran", flush=True)


class AsyncPlain(sprocket.AsyncSprocket):
    async def predict(self, args: dict[str, Any]) -> dict[str, Any] | None:
        await asyncio.sleep(float(args.get("sleep", 0)))
        return _outputs(args)

    async def shutdown(self) -> None:
        print("async plain shutdown ran", flush=True)


if __name__ == "__main__":
    run_rank(AsyncPlain() if os.environ.get("PLAIN_ASYNC") else Plain())
