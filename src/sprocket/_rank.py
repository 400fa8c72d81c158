"""The rank side of ``use_torchrun=True``: the process torchrun starts once per GPU.

Each rank connects to the supervising worker process over the Unix socket named in
``SPROCKET_TORCHRUN_SOCKET``, runs the user's ``setup()``, reports ready, then runs ``predict()``
for every job the parent broadcasts, until the parent says stop; then it runs ``shutdown()`` and
exits 0.

The user's code runs on the main thread (CUDA and ``torch.distributed`` like it there). A reader
thread owns the socket's receiving side, so a parent that disappears (EOF without a ``stop``) is
noticed even while ``predict()`` is busy: the rank then exits at once with ``EXIT_PARENT_GONE``,
because its results have nowhere to go and nothing else would stop it. That is what keeps ranks
from outliving a worker killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import os
import queue
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, Final, NoReturn

from ._api import AsyncSprocket, Sprocket
from ._info import info_sink
from ._ipc import FrameDecoder, FrameError, decode_message, encode_frame, error_payload

__all__ = ["ENV_SOCKET", "ENV_TOKEN", "EXIT_PARENT_GONE", "EXIT_USAGE", "run_rank"]

ENV_SOCKET: Final = "SPROCKET_TORCHRUN_SOCKET"
ENV_TOKEN: Final = "SPROCKET_TORCHRUN_TOKEN"
#: Exit status of a rank whose parent vanished (connection lost without ``stop``).
EXIT_PARENT_GONE: Final = 70
#: Exit status of a rank started without a supervising sprocket worker.
EXIT_USAGE: Final = 2
#: Exit status of a rank whose ``setup()`` raised.
EXIT_SETUP_FAILED: Final = 1

_STOP: Final = object()


def _say(rank: int, text: str) -> None:
    print(f"sprocket rank {rank}: {text}", file=sys.stderr, flush=True)


class _Channel:
    """The rank's end of the socket: sends from any thread, receives on the reader thread."""

    def __init__(self, sock: socket.socket, rank: int) -> None:
        self._sock = sock
        self._rank = rank
        self._send_lock = threading.Lock()
        self.stop_received = False

    def send(self, message: dict[str, Any]) -> None:
        self.send_raw(encode_frame(message))

    def send_raw(self, frame: bytes) -> None:
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError:
            self.parent_gone()

    def parent_gone(self) -> NoReturn:
        _say(self._rank, "the sprocket worker process is gone; exiting")
        os._exit(EXIT_PARENT_GONE)

    def read_forever(self, inbox: queue.SimpleQueue[Any], on_cancel: Callable[[int], None]) -> None:
        """Reader thread: queue jobs for the main thread; exit the process if the parent dies."""
        decoder = FrameDecoder()
        try:
            while True:
                payload = decoder.next_payload()
                if payload is None:
                    data = self._sock.recv(max(decoder.missing, 65536))
                    if not data:
                        break
                    decoder.feed(data)
                    continue
                message = decode_message(payload)
                if message["t"] == "stop":
                    self.stop_received = True
                    inbox.put(_STOP)
                elif message["t"] == "cancel":
                    on_cancel(int(message["id"]))
                else:
                    inbox.put(message)
        except (OSError, FrameError):
            pass
        if not self.stop_received:
            self.parent_gone()


class _Runner:
    """Calls the user's methods on the main thread, sync or on one asyncio loop."""

    def __init__(self, user: Sprocket | AsyncSprocket) -> None:
        self._user = user
        self._loop = asyncio.new_event_loop() if isinstance(user, AsyncSprocket) else None
        self._task: asyncio.Task[Any] | None = None
        self._task_job: int | None = None

    def call(self, name: str, *args: Any, job: int | None = None) -> Any:
        method = getattr(self._user, name)
        if self._loop is None:
            return method(*args)
        # The task copies the current context, so emit_info inside it sees the job's sink.
        task = self._loop.create_task(method(*args), context=contextvars.copy_context())
        self._task, self._task_job = task, job
        try:
            return self._loop.run_until_complete(task)
        finally:
            self._task = self._task_job = None

    def cancel(self, job: int) -> None:
        """From the reader thread: cancel an asyncio predict (a sync one cannot be stopped)."""
        loop, task = self._loop, self._task
        if loop is not None and task is not None and self._task_job == job:
            loop.call_soon_threadsafe(task.cancel)


class _RankSink:
    """``emit_info`` target in a rank: rank 0 forwards to the parent, other ranks drop."""

    def __init__(self, channel: _Channel, rank: int, job: int) -> None:
        self._channel, self._rank, self._job = channel, rank, job

    def update(self, info: dict[str, Any]) -> None:
        if self._rank == 0:
            self._channel.send({"t": "info", "id": self._job, "info": info})


def _connect(rank: int) -> socket.socket:
    path = os.environ.get(ENV_SOCKET)
    hint = (
        "do not start sprocket ranks with torchrun yourself: run the script with python and "
        "sprocket.run(..., use_torchrun=True) starts torchrun and supervises the ranks"
    )
    if not path:
        _say(rank, f"{ENV_SOCKET} is not set; {hint}")
        sys.exit(EXIT_USAGE)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        _say(rank, f"cannot reach the sprocket worker at {path} ({exc}); {hint}")
        sys.exit(EXIT_USAGE)
    return sock


def run_rank(user: Sprocket | AsyncSprocket) -> NoReturn:
    """Serve one torchrun rank for the supervising worker until it says stop, then exit 0.

    Called by ``sprocket.run(..., use_torchrun=True)`` when ``LOCAL_RANK`` is set. Never returns:
    exits 0 after ``shutdown()``, 1 when ``setup()`` raised (after reporting the error),
    ``EXIT_USAGE`` without a supervising worker, ``EXIT_PARENT_GONE`` when the worker vanished.
    Cancellation: a job the parent cancels is cancelled in an ``AsyncSprocket`` (its asyncio
    task); a synchronous ``predict()`` cannot be interrupted and its late result is discarded.
    """
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    channel = _Channel(_connect(rank), rank)
    channel.send(
        {
            "t": "hello",
            "token": os.environ.get(ENV_TOKEN, ""),
            "rank": rank,
            "local_rank": int(os.environ.get("LOCAL_RANK", rank)),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "pid": os.getpid(),
        }
    )
    runner = _Runner(user)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    reader = threading.Thread(
        target=channel.read_forever,
        args=(inbox, runner.cancel),
        name="sprocket-rank-reader",
        daemon=True,
    )
    reader.start()

    try:
        runner.call("setup")
    except Exception as exc:
        traceback.print_exc()
        channel.send({"t": "setup_failed", "error": error_payload(exc)})
        sys.stderr.flush()
        os._exit(EXIT_SETUP_FAILED)
    channel.send({"t": "ready"})

    while (message := inbox.get()) is not _STOP:
        if message["t"] != "job":
            continue
        job = int(message["id"])
        try:
            with info_sink(_RankSink(channel, rank, job)):
                value = runner.call("predict", message["args"], job=job)
            # Encoded here so that outputs that are not JSON fail this job, not the rank.
            frame = encode_frame({"t": "result", "id": job, "value": value})
        except (Exception, asyncio.CancelledError) as exc:
            traceback.print_exc()  # the rank's own traceback, in full, in the container log
            frame = encode_frame({"t": "error", "id": job, "error": error_payload(exc)})
        channel.send_raw(frame)

    shutdown_error: dict[str, str] | None = None
    try:
        runner.call("shutdown")
    except Exception as exc:
        traceback.print_exc()
        shutdown_error = error_payload(exc)
    channel.send({"t": "stopped", "error": shutdown_error})
    _exit_quickly(0)


def _exit_quickly(code: int) -> NoReturn:
    """Exit after the atexit callbacks, skipping the interpreter's teardown.

    Tearing down an interpreter that imported torch takes about half a second, and the worker's
    shutdown waits for every rank to exit. atexit callbacks (logging, user clean-up) still run.
    """
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is not None:
        run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
