"""HTTP mode end to end: the kitchen sink example as a real process, real signals."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import EXAMPLES, spawn, worker

pytestmark = pytest.mark.e2e

KITCHEN_SINK = EXAMPLES / "kitchen_sink.py"


def _wait_healthy(client: httpx.Client, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the worker never turned healthy")


def test_generate_round_trip_errors_and_recovery(tmp_path: Path) -> None:
    with worker(KITCHEN_SINK, cwd=tmp_path) as (_proc, url), httpx.Client(base_url=url) as client:
        _wait_healthy(client)
        ok = client.post("/generate", json={"text": "hello"})
        assert ok.status_code == 200
        assert ok.json() == {"text": "HELLO"}

        for body, what in [(b"{not json", "valid JSON"), (b"[1, 2]", "JSON object")]:
            bad = client.post("/generate", content=body)
            assert bad.status_code == 400
            assert what in bad.json()["error"]

        failed = client.post("/generate", json={"fail": "boom"})
        assert failed.status_code == 500
        assert failed.json() == {"error": "RuntimeError: boom"}
        assert client.get("/health").status_code == 200
        again = client.post("/generate", json={"text": "again"})
        assert again.json() == {"text": "AGAIN"}

        metrics = client.get("/metrics").text
        assert "requests_inflight 0.0" in metrics
        assert 'sprocket_jobs_total{outcome="failed"} 1.0' in metrics
        assert client.get("/nope").status_code == 404


def test_health_answers_during_cpu_bound_predict_and_busy_gets_503(tmp_path: Path) -> None:
    with worker(KITCHEN_SINK, cwd=tmp_path) as (_proc, url), httpx.Client(base_url=url) as client:
        _wait_healthy(client)
        result: dict[str, httpx.Response] = {}
        job = threading.Thread(
            target=lambda: result.setdefault(
                "r", httpx.post(f"{url}/generate", json={"spin": 3, "text": "x"}, timeout=60)
            )
        )
        job.start()
        try:
            seen_busy = False
            deadline = time.monotonic() + 30
            while job.is_alive() and time.monotonic() < deadline:
                assert client.get("/health", timeout=5).status_code == 200
                metrics = client.get("/metrics", timeout=5).text
                if "requests_inflight 1.0" in metrics:
                    seen_busy = True
                    busy = client.post("/generate", json={"text": "second"}, timeout=5)
                    assert busy.status_code == 503
                    assert "already running" in busy.json()["error"]
                time.sleep(0.05)
            assert seen_busy
        finally:
            job.join(60)
        assert result["r"].json() == {"text": "X"}


def test_sigterm_during_predict_delivers_response_then_shutdown(tmp_path: Path) -> None:
    marker = tmp_path / "shutdown.txt"
    env = {"KITCHEN_SINK_SHUTDOWN_MARKER": str(marker)}
    with worker(KITCHEN_SINK, env=env, cwd=tmp_path) as (proc, url):
        with httpx.Client(base_url=url) as client:
            _wait_healthy(client)
            result: dict[str, httpx.Response] = {}
            job = threading.Thread(
                target=lambda: result.setdefault(
                    "r", httpx.post(f"{url}/generate", json={"sleep": 2, "text": "z"}, timeout=60)
                )
            )
            job.start()
            proc.wait_for(r"predict_started request_id=(?!warmup)")
            proc.signal(signal.SIGTERM)
            proc.signal(signal.SIGTERM)
            proc.wait_for(r"signal signal=SIGTERM")
            assert client.get("/health").status_code == 503
            refused = client.post("/generate", json={"text": "late"})
            assert refused.status_code == 503
            job.join(60)
        assert proc.wait() == 0
        assert result["r"].status_code == 200
        assert result["r"].json() == {"text": "Z"}
        assert marker.read_text().count("shutdown") == 1
        log = proc.output()
        assert log.index("job_finished") < log.index("shutdown_started") < log.index("exited")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_idle_signal_exits_zero(tmp_path: Path, signum: int) -> None:
    with worker(KITCHEN_SINK, cwd=tmp_path) as (proc, url), httpx.Client(base_url=url) as client:
        _wait_healthy(client)
        proc.signal(signum)
        assert proc.wait() == 0
        assert "exited status=0" in proc.output()


def test_missing_deployment_name_exits_2(tmp_path: Path) -> None:
    script = tmp_path / "noname.py"
    script.write_text(
        "import sprocket\n"
        "class M(sprocket.Sprocket):\n"
        "    def predict(self, args): return {}\n"
        "sprocket.run(M())\n"
    )
    with spawn(script, env={"TOGETHER_DEPLOYMENT_NAME": ""}, cwd=tmp_path) as proc:
        assert proc.wait() == 2
        assert "TOGETHER_DEPLOYMENT_NAME" in proc.output()


def test_deployment_name_from_environment(tmp_path: Path) -> None:
    script = tmp_path / "envname.py"
    script.write_text(
        "import sprocket\n"
        "class M(sprocket.Sprocket):\n"
        "    warmup_inputs = [{}]\n"
        "    def predict(self, args): return {}\n"
        "sprocket.run(M())\n"
    )
    env = {"TOGETHER_DEPLOYMENT_NAME": "from-env", "RUN_AND_EXIT": "1"}
    with spawn(script, env=env, cwd=tmp_path) as proc:
        assert proc.wait() == 0, proc.output()


def test_run_and_exit_prints_timings(tmp_path: Path) -> None:
    env = {"RUN_AND_EXIT": "3", "KITCHEN_SINK_SHUTDOWN_MARKER": str(tmp_path / "m")}
    with spawn(KITCHEN_SINK, env=env, cwd=tmp_path) as proc:
        assert proc.wait() == 0, proc.output()
        out = proc.stdout_path.read_text()
        assert "cold start:" in out
        assert out.count("predict round") == 3
        assert (tmp_path / "m").read_text().count("shutdown") == 1


def test_setup_failure_exits_nonzero_with_traceback(tmp_path: Path) -> None:
    script = tmp_path / "badsetup.py"
    script.write_text(
        "import sprocket\n"
        "class M(sprocket.Sprocket):\n"
        "    def setup(self): raise ValueError('no weights here')\n"
        "    def predict(self, args): return {}\n"
        "sprocket.run(M(), 'bad-setup')\n"
    )
    with spawn(script, "--port", "0", "--host", "127.0.0.1", cwd=tmp_path) as proc:
        assert proc.wait() == 1
        out = proc.output()
        assert "Traceback" in out and "ValueError: no weights here" in out


def test_prediction_timeout_answers_500_and_exits_nonzero(tmp_path: Path) -> None:
    env = {"TERMINATION_GRACE_PERIOD_SECONDS": "2"}
    with worker(KITCHEN_SINK, env=env, cwd=tmp_path) as (proc, url):
        with httpx.Client(base_url=url, timeout=30) as client:
            _wait_healthy(client)
            answer = client.post("/generate", json={"sleep": 30})
        assert answer.status_code == 500
        assert answer.json()["error"].startswith("PredictionTimeout: predict did not finish")
        assert proc.wait() == 1
        assert "exited status=1" in proc.output()


ASYNC_WORKER = """
import asyncio
import os
import sprocket

class Echo(sprocket.AsyncSprocket):
    warmup_inputs = [{"x": "warm"}]

    async def setup(self):
        self.loop = asyncio.get_running_loop()

    async def predict(self, args):
        assert asyncio.get_running_loop() is self.loop
        sprocket.emit_info({"progress": 1.0})
        await asyncio.sleep(float(args.get("sleep", 0)))
        return {"echo": args.get("x")}

    async def shutdown(self):
        with open(os.environ["MARKER"], "a") as f:
            f.write("shutdown\\n")

sprocket.run(Echo(), "async-echo")
"""


def test_async_sprocket_serves_and_drains(tmp_path: Path) -> None:
    script = tmp_path / "async_echo.py"
    script.write_text(ASYNC_WORKER)
    marker = tmp_path / "marker"
    with worker(script, env={"MARKER": str(marker)}, cwd=tmp_path) as (proc, url):
        with httpx.Client(base_url=url, timeout=30) as client:
            _wait_healthy(client)
            assert client.post("/generate", json={"x": 1}).json() == {"echo": 1}
            result: dict[str, httpx.Response] = {}
            job = threading.Thread(
                target=lambda: result.setdefault(
                    "r", httpx.post(f"{url}/generate", json={"x": 2, "sleep": 1}, timeout=30)
                )
            )
            job.start()
            while "requests_inflight 1.0" not in client.get("/metrics").text:
                time.sleep(0.02)
            proc.signal(signal.SIGTERM)
            job.join(30)
        assert proc.wait() == 0
        assert result["r"].json() == {"echo": 2}
        assert marker.read_text() == "shutdown\n"


def test_json_logs_carry_request_ids_and_no_payload_values(tmp_path: Path) -> None:
    env = {"SPROCKET_LOG_FORMAT": "json", "TOGETHER_API_KEY": "key-that-must-not-leak"}
    args = ("--port", "0", "--host", "127.0.0.1")
    with spawn(KITCHEN_SINK, *args, env=env, cwd=tmp_path) as proc:
        url = proc.wait_for(r'"addresses": "(http://[^"]+)"').group(1)
        with httpx.Client(base_url=url) as client:
            _wait_healthy(client)
            assert client.post("/generate", json={"text": "private words"}).status_code == 200
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
        lines = [json.loads(line) for line in proc.stderr_path.read_text().splitlines()]
    finished = [e for e in lines if e["message"] == "job_finished"]
    assert len(finished) == 1 and finished[0]["outcome"] == "done"
    assert len(finished[0]["request_id"]) == 32
    assert all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    text = proc.output()
    assert "private words" not in text and "key-that-must-not-leak" not in text
