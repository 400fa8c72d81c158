"""The rank loop, with the test playing the supervising parent (no torch, no torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

import sprocket
from sprocket._ipc import TrioFrameStream, open_unix_listener
from sprocket._rank import ENV_SOCKET, ENV_TOKEN, EXIT_PARENT_GONE, EXIT_USAGE

PLAIN = Path(__file__).with_name("plain_rank.py")
TOKEN = "t0k3n"
GUARD = 30.0  # failure guard only


@dataclass
class FakeParent:
    stream: TrioFrameStream
    proc: trio.Process
    output: Path

    async def receive(self) -> dict[str, Any]:
        with trio.fail_after(GUARD):
            message = await self.stream.receive()
        assert message is not None
        return message

    async def exit_code(self) -> int:
        with trio.fail_after(GUARD):
            return await self.proc.wait()


def rank_env(tmp_path: Path, rank: int = 0, world: int = 1, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_SOCKET, ENV_TOKEN)}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    env.update(extra)
    return env


@asynccontextmanager
async def fake_parent(tmp_path: Path, **env: str) -> AsyncIterator[FakeParent]:
    path = str(tmp_path / "ipc.sock")
    listener = await open_unix_listener(path, 1)
    full_env = rank_env(tmp_path, **env)
    full_env.update({ENV_SOCKET: path, ENV_TOKEN: TOKEN})
    output = tmp_path / "rank.out"
    with output.open("wb") as out:
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(PLAIN)], env=full_env, cwd=tmp_path, stdout=out, stderr=out
        )
    try:
        with trio.fail_after(GUARD):
            stream = TrioFrameStream(await listener.accept())
        await listener.aclose()
        yield FakeParent(stream, proc, output)
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


async def test_conversation_then_stop(tmp_path: Path) -> None:
    async with fake_parent(tmp_path) as parent:
        hello = await parent.receive()
        assert hello == {
            "t": "hello",
            "token": TOKEN,
            "rank": 0,
            "local_rank": 0,
            "world_size": 1,
            "pid": parent.proc.pid,
        }
        assert await parent.receive() == {"t": "ready"}

        await parent.stream.send({"t": "job", "id": 1, "args": {"emit": True, "x": [1, 2]}})
        assert await parent.receive() == {"t": "info", "id": 1, "info": {"step": 1}}
        assert (await parent.receive())["info"] == {"step": 2, "rank": "0"}
        assert await parent.receive() == {
            "t": "result",
            "id": 1,
            "value": {"echo": {"emit": True, "x": [1, 2]}},
        }

        await parent.stream.send({"t": "job", "id": 2, "args": {"raise": True}})
        error = await parent.receive()
        assert error["t"] == "error" and error["id"] == 2
        assert error["error"]["type"] == "KeyError"
        assert error["error"]["message"] == "'no such key'"
        assert "plain_rank.py" in error["error"]["traceback"]

        await parent.stream.send({"t": "job", "id": 3, "args": {"file": True}})
        result = await parent.receive()
        file = result["value"]["nested"][0]["f"]
        assert isinstance(file, sprocket.FileOutput)
        assert file == tmp_path / "out.txt"  # made absolute against the rank's cwd

        await parent.stream.send({"t": "job", "id": 4, "args": {"not_json": True}})
        error = await parent.receive()
        assert error["t"] == "error" and "not JSON-serialisable" in error["error"]["message"]

        await parent.stream.send({"t": "job", "id": 5, "args": {"none": True}})
        assert await parent.receive() == {"t": "result", "id": 5, "value": None}

        await parent.stream.send({"t": "stop"})
        assert await parent.receive() == {"t": "stopped", "error": None}
        assert await parent.exit_code() == 0
    assert "plain shutdown ran" in parent.output.read_text()


async def test_parent_gone_during_predict_exits_at_once(tmp_path: Path) -> None:
    async with fake_parent(tmp_path) as parent:
        await parent.receive()
        await parent.receive()
        await parent.stream.send({"t": "job", "id": 1, "args": {"sleep": 3600}})
        await parent.stream.aclose()  # what the kernel does when the parent is SIGKILLed
        assert await parent.exit_code() == EXIT_PARENT_GONE
    assert "the sprocket worker process is gone" in parent.output.read_text()


async def test_setup_failure_is_reported_then_exit_1(tmp_path: Path) -> None:
    async with fake_parent(tmp_path, PLAIN_FAIL_SETUP="1") as parent:
        await parent.receive()
        failed = await parent.receive()
        assert failed["t"] == "setup_failed"
        assert failed["error"]["type"] == "ValueError"
        assert failed["error"]["message"] == "setup went wrong"
        assert await parent.exit_code() == 1


async def test_only_rank_0_forwards_info(tmp_path: Path) -> None:
    async with fake_parent(tmp_path, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2") as parent:
        assert (await parent.receive())["rank"] == 1
        await parent.receive()
        await parent.stream.send({"t": "job", "id": 7, "args": {"emit": True}})
        assert (await parent.receive())["t"] == "result"  # no info frames before it
        await parent.stream.send({"t": "stop"})
        assert (await parent.receive())["t"] == "stopped"
        assert await parent.exit_code() == 0


async def test_async_sprocket_predict_is_cancelled(tmp_path: Path) -> None:
    async with fake_parent(tmp_path, PLAIN_ASYNC="1") as parent:
        await parent.receive()
        assert await parent.receive() == {"t": "ready"}
        await parent.stream.send({"t": "job", "id": 1, "args": {"sleep": 3600}})
        await trio.sleep(0.2)
        await parent.stream.send({"t": "cancel", "id": 1})
        error = await parent.receive()
        assert error["t"] == "error" and error["error"]["type"] == "CancelledError"
        await parent.stream.send({"t": "job", "id": 2, "args": {"emit": True}})
        assert (await parent.receive())["t"] == "info"
        await parent.receive()
        assert (await parent.receive())["value"] == {"echo": {"emit": True}}
        await parent.stream.send({"t": "stop"})
        assert (await parent.receive())["t"] == "stopped"
        assert await parent.exit_code() == 0
    assert "async plain shutdown ran" in parent.output.read_text()


@pytest.mark.parametrize("socket_env", [None, "/nonexistent/sprocket.sock"])
def test_rank_without_a_parent_explains_itself(tmp_path: Path, socket_env: str | None) -> None:
    env = rank_env(tmp_path)
    if socket_env is not None:
        env[ENV_SOCKET] = socket_env
    done = subprocess.run(
        [sys.executable, str(PLAIN)], env=env, capture_output=True, text=True, timeout=GUARD
    )
    assert done.returncode == EXIT_USAGE
    assert "do not start sprocket ranks with torchrun yourself" in done.stderr
