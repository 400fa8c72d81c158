"""The ``sprocket queue`` client commands against a real server, and the progress display."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest

from sprocket._cli import main
from sprocket._queue_server._client import ProgressPrinter
from tests.procs import QueueServer

from .conftest import API_KEY

pytestmark = pytest.mark.e2e

TIMEOUT = 60.0


def run_cli(server: QueueServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TOGETHER_API_BASE_URL=server.url, TOGETHER_API_KEY=API_KEY)
    return subprocess.run(
        [sys.executable, "-m", "sprocket._cli", "queue", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
    )


def fake_worker(server: QueueServer, model: str, final: str, outputs: dict[str, Any]) -> None:
    """Claim one job, report progress twice, then finish it with ``final``."""
    with server.client() as http:
        while True:
            params = {"model": model, "timeout": "5s"}
            data = http.get("/internal/v1/queue/retrieve", params=params).json().get("data")
            if data:
                break
        base = {"model": model, "request_id": data["request_id"], "claim_id": data["claim_id"]}
        for progress, text in ((0.25, "loading"), (0.75, "denoising")):
            info = {"progress": progress, "status": text}
            http.post(
                "/internal/v1/videos/status",
                json={**base, "status": "running", "payload": {}, "info": info},
            )
            # Hold each state until the CLI has seen it, so the output is predictable.
            while True:
                job = http.get(
                    "/v1/queue/status", params={"model": model, "request_id": data["request_id"]}
                ).json()
                if job["info"].get("seen") == text:
                    break
                threading.Event().wait(0.05)
        info = {"error": "out of memory"} if final == "failed" else {"progress": 1.0}
        http.post(
            "/internal/v1/videos/status",
            json={**base, "status": final, "payload": outputs, "info": info},
        )


def test_submit_status_cancel_clear_metrics(server: QueueServer) -> None:
    done = run_cli(server, "submit", "--model", "cli-a", "--payload", '{"x": 1}', "--priority", "2")
    assert done.returncode == 0, done.stderr
    rid = done.stdout.strip()
    status = run_cli(server, "status", "--model", "cli-a", rid)
    assert status.returncode == 0
    job = json.loads(status.stdout)
    assert job["status"] == "pending" and job["inputs"] == {"x": 1} and job["priority"] == 2
    metrics = json.loads(run_cli(server, "metrics", "--model", "cli-a").stdout)
    assert metrics == {"messages_waiting": 1, "messages_running": 0, "total_jobs": 1}
    canceled = run_cli(server, "cancel", "--model", "cli-a", rid)
    assert json.loads(canceled.stdout) == {"status": "canceled"}
    run_cli(server, "submit", "--model", "cli-a", "--payload", "{}")
    cleared = run_cli(server, "clear", "--model", "cli-a")
    assert json.loads(cleared.stdout) == {"canceled_count": 1}


def test_submit_wait_done_prints_outputs(server: QueueServer) -> None:
    # The CLI marks what it has seen through no channel of its own, so a helper thread watches
    # its stderr lines and acknowledges them in the job's info (any key works).
    model = "cli-wait"
    env = dict(os.environ, TOGETHER_API_BASE_URL=server.url, TOGETHER_API_KEY=API_KEY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sprocket._cli", "queue", "submit", "--model", model,
         "--payload", '{"prompt": "a cat"}', "--wait", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        worker = threading.Thread(
            target=fake_worker, args=(server, model, "done", {"video": "v.mp4"})
        )
        worker.start()
        lines = _ack_progress_lines(server, model, proc)
        worker.join(timeout=TIMEOUT)
        out = proc.stdout.read() if proc.stdout else ""
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads(out) == {"video": "v.mp4"}
    assert lines[0].startswith("submitted ")
    assert "running 25% loading" in lines
    assert "running 75% denoising" in lines
    assert lines[-1].startswith("done")


def _ack_progress_lines(server: QueueServer, model: str, proc: subprocess.Popen[str]) -> list[str]:
    lines: list[str] = []
    assert proc.stderr is not None
    rid = ""
    with server.client() as http:
        for raw in proc.stderr:
            line = raw.rstrip("\n")
            lines.append(line)
            if line.startswith("submitted "):
                rid = line.split()[1]
            for text in ("loading", "denoising"):
                if line.endswith(text):
                    # Merge a marker into the job's info via a running update.
                    http.post(
                        "/internal/v1/videos/status",
                        json={"model": model, "request_id": rid, "status": "running",
                              "payload": {}, "info": {"seen": text}},
                    )  # fmt: skip
    return lines


def test_submit_wait_failed_exits_1(server: QueueServer) -> None:
    model = "cli-fail"
    worker = threading.Thread(target=fake_worker, args=(server, model, "failed", {}))
    env = dict(os.environ, TOGETHER_API_BASE_URL=server.url, TOGETHER_API_KEY=API_KEY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sprocket._cli", "queue", "submit", "--model", model,
         "--payload", "{}", "--wait", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        worker.start()
        lines = _ack_progress_lines(server, model, proc)
        worker.join(timeout=TIMEOUT)
        assert proc.wait(timeout=TIMEOUT) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert any("failed: out of memory" in line for line in lines)


def test_submit_wait_canceled_exits_1(
    server: QueueServer, capsys: pytest.CaptureFixture[str]
) -> None:
    model = "cli-cancel"
    result: list[int] = []
    env = {"TOGETHER_API_BASE_URL": server.url, "TOGETHER_API_KEY": API_KEY}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        thread = threading.Thread(
            target=lambda: result.append(
                main(["queue", "submit", "--model", model, "--payload", "{}", "--wait",
                      "--interval", "0.05"])
            )
        )  # fmt: skip
        thread.start()
        with server.client() as http:
            while True:
                metrics = http.get("/v1/queue/metrics", params={"model": model}).json()
                if metrics["messages_waiting"]:
                    break
            assert http.post("/v1/queue/clear", json={"model": model}).json()["canceled_count"] == 1
        thread.join(timeout=TIMEOUT)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert result == [1]
    assert "canceled" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["submit", "--model", "m", "--payload", "[1]"], "must be a JSON object"),
        (["submit", "--model", "m", "--payload", "{bad"], "not valid JSON"),
        (["submit", "--model", "m", "--payload", "{}", "--info", "3"], "--info"),
        (["submit", "--model", "m", "--payload", "@/no/such/file"], "cannot read"),
        (["status", "--model", "m", "no-such-id"], "404"),
    ],
)
def test_bad_input_fails_clearly(server: QueueServer, args: list[str], needle: str) -> None:
    done = run_cli(server, *args)
    assert done.returncode != 0
    assert needle in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_key_and_unreachable_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    assert main(["queue", "metrics", "--model", "m"]) == 2
    assert "TOGETHER_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("TOGETHER_API_KEY", "k")
    monkeypatch.setenv("TOGETHER_API_BASE_URL", "http://127.0.0.1:1")
    assert main(["queue", "metrics", "--model", "m"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_progress_printer_tty_and_plain() -> None:
    jobs = [
        {"status": "pending", "info": {}},
        {"status": "running", "info": {"progress": 0.5, "status": "halfway"}},
        {"status": "running", "info": {"progress": 0.5, "status": "halfway"}},  # no change
        {"status": "running", "info": {"progress": 80}},  # a percentage
        {"status": "done", "info": {"progress": 1.0}},
    ]
    tty = io.StringIO()
    printer = ProgressPrinter(tty, tty=True, width=10)
    for job in jobs:
        printer.show(job)
    printer.finish()
    frames = tty.getvalue().split("\r")
    assert frames[0] == "" and len(frames) == 5
    assert frames[2].startswith("[#####-----]  50% running  halfway")
    assert frames[3].startswith("[########--]  80% running")
    assert frames[4].rstrip().startswith("[##########] 100% done")
    assert tty.getvalue().endswith("\n")

    plain = io.StringIO()
    printer = ProgressPrinter(plain, tty=False)
    for job in jobs:
        printer.show(job)
    printer.finish()
    assert plain.getvalue().splitlines() == [
        "pending",
        "running 50% halfway",
        "running 80%",
        "done 100%",
    ]
