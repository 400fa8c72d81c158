"""End to end against real ``sprocket queue serve`` processes: durability, storage, TLS, signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from sprocket._queue_server import QueueStore
from tests.procs import QueueServer

from .conftest import API_KEY, AUTH

pytestmark = pytest.mark.e2e

GENEROUS = 60.0  # seconds: an outcome must happen within this, however slow the machine


def _poll_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GENEROUS
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- durability --------------------------------------------------------------------------------


def test_kill_9_during_a_submit_burst_loses_no_acknowledged_job(
    make_server: Callable[..., QueueServer],
) -> None:
    server = make_server()
    server.start()
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def submitter(n: int) -> None:
        with server.client() as http:
            i = 0
            while not stop.is_set():
                body = {"model": "burst", "payload": {"n": n, "i": i}, "priority": i % 3}
                try:
                    r = http.post("/v1/queue/submit", json=body)
                except httpx.HTTPError:
                    return  # the server died mid-request: not acknowledged
                assert r.status_code == 200
                with lock:
                    acked.append(r.json()["requestId"])
                i += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(submitter, n) for n in range(4)]
        _poll_until(lambda: len(acked) >= 200, "200 acknowledged submits")
        server.kill(signal.SIGKILL)  # while submits are still in flight
        stop.set()
        for future in futures:
            future.result()
    assert server.proc is not None and server.proc.returncode == -signal.SIGKILL

    with lock:
        acknowledged = list(acked)
    server.start()  # same data dir, new port
    with server.client() as http:
        for rid in acknowledged:
            r = http.get("/v1/queue/status", params={"model": "burst", "request_id": rid})
            assert r.status_code == 200, rid
            assert r.json()["status"] == "pending"
        total = http.get("/v1/queue/metrics", params={"model": "burst"}).json()["total_jobs"]
    assert total >= len(acknowledged)


def test_states_and_leases_survive_kill_9(make_server: Callable[..., QueueServer]) -> None:
    server = make_server()
    server.start()
    with server.client() as http:

        def submit(i: int) -> str:
            r = http.post("/v1/queue/submit", json={"model": "dur", "payload": {"i": i}})
            return str(r.json()["requestId"])

        def claim(lease: str) -> dict[str, object]:
            params = {"model": "dur", "timeout": "1s", "claim_timeout": lease}
            data: dict[str, object] = http.get("/internal/v1/queue/retrieve", params=params).json()[
                "data"
            ]
            return data

        done_id, leased_id, pending_id = submit(0), submit(1), submit(2)
        done_claim = claim("600")
        http.post(
            "/internal/v1/videos/status",
            json={
                "model": "dur",
                "request_id": done_id,
                "status": "done",
                "payload": {"answer": 42},
                "claim_id": done_claim["claim_id"],
            },
        )
        assert claim("3")["request_id"] == leased_id
    server.kill(signal.SIGKILL)

    store = QueueStore(server.data_dir / "queue.sqlite3")
    try:
        jobs = {job.request_id: job for job in store.all_jobs()}
    finally:
        store.close()
    leased = jobs[leased_id]
    assert leased.status == "running" and leased.claimed_at is not None
    assert leased.lease_expires_at == pytest.approx(leased.claimed_at + 3.0)

    server.start()
    with server.client() as http:

        def status(rid: str) -> dict[str, object]:
            r = http.get("/v1/queue/status", params={"model": "dur", "request_id": rid})
            return r.json()  # type: ignore[no-any-return]

        assert status(done_id)["status"] == "done"
        assert status(done_id)["outputs"] == {"answer": 42}
        assert status(pending_id)["status"] == "pending"
        # The lease kept its absolute expiry: the restarted server takes the job back.
        _poll_until(lambda: status(leased_id)["retries"] == 1, "the old lease to expire")
        assert status(leased_id)["status"] == "pending"


# -- storage -----------------------------------------------------------------------------------


def test_storage_round_trip_via_presigned_url(server: QueueServer) -> None:
    blob = os.urandom(3 * 1024 * 1024 + 17)
    with server.client() as http:
        r = http.post("/v1/storage/upload-request", json={"filename": "req1-out put.bin"})
        assert r.status_code == 200
        url = r.json()["upload_url"]["url"]
        assert url.startswith(server.url)

        def chunks() -> object:
            for start in range(0, len(blob), 65536):
                yield blob[start : start + 65536]

        # No credentials on the PUT, as with a third-party host.
        put = httpx.put(url, content=chunks(), timeout=30)  # type: ignore[arg-type]
        assert put.status_code == 200, put.text
        assert put.json()["size"] == len(blob)
        with http.stream("GET", "/v1/storage/req1-out%20put.bin") as got:
            assert got.status_code == 200
            assert int(got.headers["content-length"]) == len(blob)
            assert b"".join(got.iter_bytes()) == blob
        assert httpx.get(f"{server.url}/v1/storage/req1-out%20put.bin").status_code == 401
        bad = httpx.get(
            f"{server.url}/v1/storage/req1-out%20put.bin", headers={"Authorization": "Bearer x"}
        )
        assert bad.status_code == 401 and API_KEY not in bad.text


def test_presigned_url_is_for_one_name_only(server: QueueServer) -> None:
    with server.client() as http:
        url = http.post("/v1/storage/upload-request", json={"filename": "one.txt"}).json()[
            "upload_url"
        ]["url"]
        parsed = httpx.URL(url)
        other = parsed.copy_with(path=parsed.path.replace("one.txt", "two.txt"))
        assert httpx.put(other, content=b"x").status_code == 403
        sig = parsed.params["signature"]
        tampered = parsed.copy_merge_params(
            {"signature": sig[:-1] + ("0" if sig[-1] != "0" else "1")}
        )
        assert httpx.put(tampered, content=b"x").status_code == 403
        later = parsed.copy_merge_params({"expires": str(int(parsed.params["expires"]) + 1)})
        assert httpx.put(later, content=b"x").status_code == 403
        no_token = parsed.copy_with(query=None)
        assert httpx.put(no_token, content=b"x").status_code == 403
        # The bearer key is no substitute for the signature.
        assert httpx.put(no_token, content=b"x", headers=AUTH).status_code == 403
        assert http.get("/v1/storage/two.txt").status_code == 404
        assert http.get("/v1/storage/one.txt").status_code == 404


def test_traversal_is_refused(server: QueueServer) -> None:
    secret = server.data_dir / "api_key_copy"
    secret.write_text("do not serve me")
    with server.client() as http:
        for name in ("../api_key_copy", "..", ".", "a/b", ".hidden", "x\\y", "bad\x01name"):
            r = http.post("/v1/storage/upload-request", json={"filename": name})
            assert r.status_code == 400, name
        for raw in (
            b"/v1/storage/..%2Fapi_key_copy",
            b"/v1/storage/%2e%2e%2fapi_key_copy",
            b"/v1/storage/..%5Capi_key_copy",
            b"/v1/storage/%2Fetc%2Fpasswd",
            b"/v1/storage/.upload-x",
        ):
            url = httpx.URL(server.url).copy_with(raw_path=raw)
            r = http.get(url)
            assert r.status_code in (400, 404), raw
            assert b"do not serve me" not in r.content
        upload_url = http.post("/v1/storage/upload-request", json={"filename": "ok.txt"}).json()[
            "upload_url"
        ]["url"]
        target = httpx.URL(upload_url)
        escaped = target.copy_with(raw_path=b"/v1/storage/_upload/..%2Fok.txt")
        escaped = escaped.copy_with(query=target.query)
        assert httpx.put(escaped, content=b"pwned").status_code in (400, 403)
    assert not (server.data_dir / "ok.txt").exists()
    assert secret.read_text() == "do not serve me"


def test_upload_over_the_limit_is_413_and_leaves_nothing(server: QueueServer) -> None:
    with server.client() as http:
        url = http.post("/v1/storage/upload-request", json={"filename": "big.bin"}).json()[
            "upload_url"
        ]["url"]
        too_big = b"\0" * (8 * 1024 * 1024 + 1)  # the fixture's limit is 8 MiB
        assert httpx.put(url, content=too_big, timeout=30).status_code == 413

        def chunks() -> object:  # no Content-Length: the limit is enforced while streaming
            for _ in range(9):
                yield b"\0" * (1024 * 1024)

        try:
            r = httpx.put(url, content=chunks(), timeout=30)  # type: ignore[arg-type]
            assert r.status_code == 413
        except httpx.HTTPError:
            pass  # the server may close the connection while we are still sending
        assert http.get("/v1/storage/big.bin").status_code == 404
    leftovers = list((server.data_dir / "storage").glob(".upload-*"))
    assert leftovers == []


# -- process behaviour -------------------------------------------------------------------------


def test_sigterm_answers_long_polls_and_exits_cleanly(
    make_server: Callable[..., QueueServer],
) -> None:
    server = make_server()
    server.start()
    result: list[httpx.Response | Exception] = []

    def long_poll() -> None:
        with server.client() as http:
            try:
                params = {"model": "sig", "timeout": "60s"}
                result.append(http.get("/internal/v1/queue/retrieve", params=params))
            except httpx.HTTPError as error:
                result.append(error)

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(0.3)  # let the poll reach the server (the outcome does not depend on it)
    assert server.proc is not None
    server.proc.signal(signal.SIGTERM)
    assert server.proc.wait(timeout=GENEROUS) == 0
    poller.join(timeout=GENEROUS)
    assert "sprocket queue server stopped" in server.read_rest()
    assert isinstance(result[0], httpx.Response) and result[0].status_code == 200
    assert result[0].json().get("data") is None


def test_generated_key_is_stored_and_printed(make_server: Callable[..., QueueServer]) -> None:
    server = make_server()
    server.api_key = ""  # neither --api-key nor the environment: generate one
    env = {k: v for k, v in os.environ.items() if k != "SPROCKET_QUEUE_API_KEY"}
    url = server.start(env=env)
    key = (server.data_dir / "api_key").read_text().strip()
    assert key and any(key in line for line in server.output)
    assert (server.data_dir / "api_key").stat().st_mode & 0o077 == 0
    params, headers = {"model": "k"}, {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{url}/v1/queue/metrics", params=params, headers=headers).status_code == 200
    # A restart reuses the stored key.
    server.kill(signal.SIGTERM)
    url = server.start(env=env)
    assert (server.data_dir / "api_key").read_text().strip() == key
    assert httpx.get(f"{url}/v1/queue/metrics", params=params, headers=headers).status_code == 200


def test_bad_serve_arguments_fail_clearly(tmp_path: Path) -> None:
    for args, needle in [
        (["--port", "70000"], "--port"),
        (["--certfile", str(tmp_path / "nope.pem")], "--keyfile"),
        (["--max-upload-bytes", "0"], "--max-upload-bytes"),
        (["--port", "abc"], "invalid int"),
    ]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sprocket._cli",
                "queue",
                "serve",
                "--data-dir",
                str(tmp_path / "d"),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=GENEROUS,
        )
        assert done.returncode != 0
        assert needle in done.stderr
        assert "Traceback" not in done.stderr


def test_port_in_use_fails_clearly(make_server: Callable[..., QueueServer], tmp_path: Path) -> None:
    server = make_server()
    port = httpx.URL(server.start()).port
    assert port is not None
    done = subprocess.run(
        [sys.executable, "-m", "sprocket._cli", "queue", "serve", "--port", str(port),
         "--data-dir", str(tmp_path / "d"), "--api-key", API_KEY],
        capture_output=True,
        text=True,
        timeout=GENEROUS,
    )  # fmt: skip
    assert done.returncode == 1
    assert "cannot serve on" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(make_server: Callable[..., QueueServer], tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=GENEROUS,
    )
    server = make_server(extra_args=["--certfile", str(cert), "--keyfile", str(key)])
    url = server.start()
    assert url.startswith("https://")
    with httpx.Client(base_url=url, headers=AUTH, verify=False) as http:
        r = http.post("/v1/queue/submit", json={"model": "tls", "payload": {}})
        assert r.status_code == 200
        url2 = http.post("/v1/storage/upload-request", json={"filename": "t.txt"}).json()
        assert url2["upload_url"]["url"].startswith("https://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https://", "http://") + "/v1/queue/metrics?model=tls", timeout=5)
