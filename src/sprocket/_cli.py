"""The ``sprocket`` console script.

``sprocket queue serve`` runs the local queue server; ``sprocket queue submit/status/cancel/
clear/metrics`` talk to any queue that speaks the protocol (the local one or Together's), using
``TOGETHER_API_BASE_URL`` and ``TOGETHER_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1  # the job failed or was canceled, or the queue refused the request
EXIT_USAGE = 2  # bad command line (argparse uses 2 as well)


class UsageError(Exception):
    """Bad input on the command line; reported without a traceback."""


def _json_object(text: str, what: str) -> dict[str, Any]:
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as error:
            raise UsageError(f"{what}: cannot read {text[1:]!r}: {error.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise UsageError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sprocket", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    queue = commands.add_parser("queue", help="run or use a job queue")
    queue_cmds = queue.add_subparsers(dest="queue_command", required=True, metavar="SUBCOMMAND")

    serve = queue_cmds.add_parser("serve", help="run the local queue server")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8900, help="port, 0 for any free one")
    serve.add_argument("--data-dir", default=".sprocket", help="database, files and key")
    serve.add_argument(
        "--api-key",
        default=None,
        help="bearer key clients must send (default: $SPROCKET_QUEUE_API_KEY, else the key "
        "stored in the data dir, else a new one that is stored there and printed)",
    )
    serve.add_argument("--certfile", default=None, help="TLS certificate (PEM), with --keyfile")
    serve.add_argument("--keyfile", default=None, help="TLS private key (PEM), with --certfile")
    serve.add_argument(
        "--max-upload-bytes", type=int, default=None, help="size limit of one stored file"
    )
    serve.add_argument(
        "--claim-timeout",
        type=float,
        default=None,
        help="lease length in seconds when a worker asks for none (default 300)",
    )
    serve.add_argument(
        "--public-url", default=None, help="base URL written into pre-signed upload URLs"
    )

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = queue_cmds.add_parser(name, help=help_text)
        sub.add_argument("--model", required=True, help="deployment (model) name")
        sub.add_argument("--base-url", default=None, help="default: $TOGETHER_API_BASE_URL")
        sub.add_argument("--api-key", default=None, help="default: $TOGETHER_API_KEY")
        return sub

    submit = client_command("submit", "submit a job")
    submit.add_argument("--payload", required=True, help="JSON object (or @file)")
    submit.add_argument("--info", default=None, help="JSON object (or @file)")
    submit.add_argument("--priority", type=int, default=None, help="higher runs first")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end")
    submit.add_argument("--interval", type=float, default=0.5, help="poll interval for --wait")
    status = client_command("status", "show a job")
    status.add_argument("request_id", metavar="ID")
    cancel = client_command("cancel", "cancel a pending job")
    cancel.add_argument("request_id", metavar="ID")
    cancel.add_argument(
        "--running", action="store_true", help="also cancel a running job (local server only)"
    )
    client_command("clear", "cancel all pending jobs of a model")
    client_command("metrics", "show queue depth")
    return parser


# -- serve ------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import trio

    from ._queue_server._serve import load_or_create_api_key, serve_queue
    from ._queue_server._service import DEFAULT_CLAIM_TIMEOUT
    from ._queue_server._storage import DEFAULT_MAX_UPLOAD_BYTES

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    if (args.certfile is None) != (args.keyfile is None):
        raise UsageError("--certfile and --keyfile must be given together")
    for option in ("certfile", "keyfile"):
        value = getattr(args, option)
        if value is not None and not Path(value).is_file():
            raise UsageError(f"--{option}: no such file: {value}")
    max_upload = (
        DEFAULT_MAX_UPLOAD_BYTES if args.max_upload_bytes is None else args.max_upload_bytes
    )
    if max_upload <= 0:
        raise UsageError("--max-upload-bytes must be positive")
    claim_timeout = DEFAULT_CLAIM_TIMEOUT if args.claim_timeout is None else args.claim_timeout
    if not claim_timeout > 0:
        raise UsageError("--claim-timeout must be positive")
    data_dir = Path(args.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UsageError(f"--data-dir: {data_dir} is not a directory")

    api_key = args.api_key or os.environ.get("SPROCKET_QUEUE_API_KEY") or None
    if api_key is None:
        api_key, created = load_or_create_api_key(data_dir)
        where = data_dir / "api_key"
        note = "generated, saved to" if created else "read from"
        print(f"sprocket queue API key: {api_key} ({note} {where})", flush=True)

    async def run() -> None:
        stop = trio.Event()

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    print(f"received {signal.Signals(signum).name}, shutting down", flush=True)
                    stop.set()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            url = await nursery.start(
                partial(
                    serve_queue,
                    data_dir,
                    api_key=api_key,
                    host=args.host,
                    port=args.port,
                    certfile=args.certfile,
                    keyfile=args.keyfile,
                    max_upload_bytes=max_upload,
                    default_claim_timeout=claim_timeout,
                    public_url=args.public_url,
                    shutdown_trigger=stop.wait,
                )
            )
            print(f"sprocket queue server listening on {url}", flush=True)
            print(f"  export TOGETHER_API_BASE_URL={url}", flush=True)
            await stop.wait()
            # serve_queue returns after its graceful shutdown; then stop the signal watcher.
        print("sprocket queue server stopped", flush=True)

    try:
        trio.run(run)
    except BaseException as error:
        # Trio's nurseries wrap errors in groups; a failure to bind (port in use, bad address,
        # unreadable certificate) is still a plain message, not a traceback.
        os_errors = _only_os_errors(error)
        if os_errors is None:
            raise
        address = f"{args.host}:{args.port}"
        for os_error in os_errors:
            print(f"sprocket queue serve: cannot serve on {address}: {os_error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _only_os_errors(error: BaseException) -> list[OSError] | None:
    """The OSErrors ``error`` consists of, or ``None`` if it holds anything else."""
    if isinstance(error, OSError):
        return [error]
    if isinstance(error, BaseExceptionGroup):
        found: list[OSError] = []
        for inner in error.exceptions:
            sub = _only_os_errors(inner)
            if sub is None:
                return None
            found.extend(sub)
        return found
    return None


# -- client commands --------------------------------------------------------------------------


def _client_command(args: argparse.Namespace) -> int:
    from ._queue_server._client import (
        DEFAULT_BASE_URL,
        ProgressPrinter,
        QueueClient,
        wait_for_job,
    )

    base_url = args.base_url or os.environ.get("TOGETHER_API_BASE_URL") or DEFAULT_BASE_URL
    api_key = args.api_key or os.environ.get("TOGETHER_API_KEY")
    if not api_key:
        raise UsageError("no API key: set TOGETHER_API_KEY or pass --api-key")
    command = args.queue_command
    with QueueClient(base_url, api_key) as client:
        if command == "submit":
            payload = _json_object(args.payload, "--payload")
            info = None if args.info is None else _json_object(args.info, "--info")
            request_id = client.submit(args.model, payload, info=info, priority=args.priority)
            if not args.wait:
                print(request_id)
                return EXIT_OK
            print(f"submitted {request_id}", file=sys.stderr, flush=True)
            printer = ProgressPrinter(sys.stderr)
            try:
                job = wait_for_job(
                    client, args.model, request_id, interval=args.interval, on_update=printer.show
                )
            finally:
                printer.finish()
            return _report_final(job)
        if command == "status":
            print(json.dumps(client.status(args.model, args.request_id), indent=2))
        elif command == "cancel":
            status = client.cancel(args.model, args.request_id, running=args.running)
            print(json.dumps({"status": status}))
        elif command == "clear":
            print(json.dumps({"canceled_count": client.clear(args.model)}))
        elif command == "metrics":
            print(json.dumps(client.metrics(args.model), indent=2))
    return EXIT_OK


def _report_final(job: dict[str, Any]) -> int:
    status = job.get("status")
    if status == "done":
        print(json.dumps(job.get("outputs") or {}, indent=2))
        return EXIT_OK
    info = job.get("info") if isinstance(job.get("info"), dict) else {}
    error = info.get("error") if isinstance(info, dict) else None
    reason = f": {error}" if error else ""
    print(f"job {job.get('request_id')} {status}{reason}", file=sys.stderr)
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sprocket`` console script; returns the exit status."""
    from ._queue_server._client import QueueApiError

    args = _build_parser().parse_args(argv)
    try:
        if args.command == "queue" and args.queue_command == "serve":
            return _serve(args)
        return _client_command(args)
    except UsageError as error:
        print(f"sprocket: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except QueueApiError as error:
        print(f"sprocket: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("sprocket: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
