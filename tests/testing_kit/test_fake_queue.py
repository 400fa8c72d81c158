"""The fake queue itself: faults inject, records record, virtual time stays exact."""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from sprocket.testing import FakeQueue

MODEL = "sprocket-test"


async def _status(client: httpx.AsyncClient, rid: str) -> httpx.Response:
    return await client.get("/v1/queue/status", params={"request_id": rid, "model": MODEL})


async def test_records_every_request_with_virtual_time(
    fake_queue: FakeQueue, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake_queue.client() as client:
        await trio.sleep(7)
        r = await client.post("/v1/queue/submit", json={"model": MODEL, "payload": {"a": 1}})
        assert r.status_code == 200
        rid = r.json()["requestId"]
        await trio.sleep(3)
        assert (await _status(client, rid)).json()["status"] == "pending"
    submit, status = fake_queue.requests
    assert (submit.method, submit.path, submit.endpoint) == ("POST", "/v1/queue/submit", "submit")
    assert submit.json == {"model": MODEL, "payload": {"a": 1}}
    assert submit.status == 200 and submit.time == 7.0 and submit.delivered
    assert submit.response_json["requestId"] == rid
    assert status.endpoint == "job_status" and status.time == 10.0
    assert status.request_id == rid and status.query["model"] == MODEL
    assert status.authorization == f"Bearer {fake_queue.api_key}"


async def test_error_n_times_then_through(fake_queue: FakeQueue) -> None:
    rid = await fake_queue.submit({})
    fault = fake_queue.fail("job_status", 503, times=2)
    async with fake_queue.client() as client:
        codes = [(await _status(client, rid)).status_code for _ in range(4)]
    assert codes == [503, 503, 200, 200]
    assert fault.hits == 2
    assert [r.faults for r in fake_queue.requests] == [["error 503"], ["error 503"], [], []]


async def test_error_for_a_span_of_virtual_time(
    fake_queue: FakeQueue, autojump_clock: trio.testing.MockClock
) -> None:
    rid = await fake_queue.submit({})
    fake_queue.fail("job_status", 500, start=10, duration=20)
    seen: dict[float, int] = {}
    async with fake_queue.client() as client:
        for t in (0, 9.9, 10, 29.9, 30, 40):
            await trio.sleep_until(t)
            seen[t] = (await _status(client, rid)).status_code
    assert seen == {0: 200, 9.9: 200, 10: 500, 29.9: 500, 30: 200, 40: 200}


async def test_probability_is_seeded_and_roughly_right(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outcomes = []
    for _ in range(2):
        async with FakeQueue(seed=42) as queue:
            rid = await queue.submit({})
            queue.fail("job_status", 503, probability=0.3)
            async with queue.client() as client:
                outcomes.append([(await _status(client, rid)).status_code for _ in range(400)])
    assert outcomes[0] == outcomes[1]
    assert 80 <= outcomes[0].count(503) <= 160


async def test_when_selects_requests(fake_queue: FakeQueue) -> None:
    rid = await fake_queue.submit({})
    other = await fake_queue.submit({})
    fake_queue.fail("job_status", 404, when=lambda r: r.request_id == rid)
    async with fake_queue.client() as client:
        assert (await _status(client, rid)).status_code == 404
        assert (await _status(client, other)).status_code == 200


async def test_latency_takes_exact_virtual_time(
    fake_queue: FakeQueue, autojump_clock: trio.testing.MockClock
) -> None:
    rid = await fake_queue.submit({})
    fake_queue.delay("job_status", 12.5, times=1)
    async with fake_queue.client(timeout=60) as client:
        start = trio.current_time()
        assert (await _status(client, rid)).status_code == 200
        assert trio.current_time() - start == 12.5
        start = trio.current_time()
        await _status(client, rid)
        assert trio.current_time() == start


async def test_hang_until_released(
    fake_queue: FakeQueue, autojump_clock: trio.testing.MockClock
) -> None:
    rid = await fake_queue.submit({})
    hang = fake_queue.hang("job_status")
    codes: list[int] = []
    async with fake_queue.client(timeout=None) as client, trio.open_nursery() as nursery:

        async def ask() -> None:
            codes.append((await _status(client, rid)).status_code)

        nursery.start_soon(ask)
        await trio.sleep(3600)
        assert codes == [] and fake_queue.requests[0].status is None
        hang.release()
    assert codes == [200]
    assert fake_queue.requests[0].finished_at == 3600


async def test_hang_meets_the_clients_read_timeout(
    fake_queue: FakeQueue, autojump_clock: trio.testing.MockClock
) -> None:
    rid = await fake_queue.submit({})
    fake_queue.hang("job_status")
    async with fake_queue.client(timeout=httpx.Timeout(5.0, read=7.0)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await _status(client, rid)
    assert trio.current_time() == 7.0
    assert fake_queue.requests[0].error == "timeout"


async def test_dropped_response_after_the_change_was_applied(fake_queue: FakeQueue) -> None:
    fake_queue.drop_response("submit", times=1)
    async with fake_queue.client() as client:
        with pytest.raises(httpx.ReadError):
            await client.post("/v1/queue/submit", json={"model": MODEL, "payload": {}})
    (record,) = fake_queue.requests
    assert record.applied and not record.delivered and record.error == "dropped"
    assert len(fake_queue.jobs()) == 1  # the server did store the job


async def test_disconnect_applies_nothing(fake_queue: FakeQueue) -> None:
    fake_queue.disconnect("submit")
    async with fake_queue.client() as client:
        with pytest.raises(httpx.ConnectError):
            await client.post("/v1/queue/submit", json={"model": MODEL, "payload": {}})
    assert fake_queue.jobs() == []
    assert fake_queue.requests[0].error == "disconnected"


async def test_slow_upload_and_stored_bytes(
    fake_queue: FakeQueue, autojump_clock: trio.testing.MockClock
) -> None:
    fake_queue.throttle("upload", bytes_per_second=1000)
    data = bytes(range(256)) * 40  # 10,240 bytes: 10.24 s at 1,000 B/s
    async with fake_queue.client() as client:
        r = await client.post("/v1/storage/upload-request", json={"filename": "rid-out.bin"})
        url = r.json()["upload_url"]["url"]
        assert url.startswith(fake_queue.upload_base_url + "/")
        async with httpx.AsyncClient(transport=fake_queue.transport) as plain:
            start = trio.current_time()
            put = await plain.put(url, content=data)
            assert put.status_code == 200
            assert trio.current_time() - start == pytest.approx(10.24)
    assert fake_queue.stored_file("https://api.test/v1/storage/rid-out.bin") == data
    upload = fake_queue.requests_to("upload")[0]
    assert upload.body_bytes == len(data) and upload.authorization is None


async def test_external_files_redirects_and_dns(
    fake_queue: FakeQueue, autojump_clock: trio.testing.MockClock
) -> None:
    fake_queue.serve_file("https://files.test/a.bin", b"abc")
    fake_queue.redirect("https://short.test/x", "https://files.test/a.bin", status=301)
    fake_queue.serve_file("https://slow.test/b", b"x" * 2000, bytes_per_second=100)
    async with httpx.AsyncClient(transport=fake_queue.transport) as client:
        assert (await client.get("https://files.test/a.bin")).content == b"abc"
        hop = await client.get("https://short.test/x")
        assert hop.status_code == 301 and hop.headers["location"] == "https://files.test/a.bin"
        assert (await client.get("https://files.test/missing")).status_code == 404
        with pytest.raises(httpx.ConnectError):
            await client.get("https://nowhere.test/")
        start = trio.current_time()
        assert len((await client.get("https://slow.test/b")).content) == 2000
        assert trio.current_time() - start == pytest.approx(20)
    assert (await fake_queue.resolve("files.test", 443))[0].startswith("203.0.113.")
    fake_queue.add_host("rebind.test", "169.254.169.254")
    assert await fake_queue.resolve("rebind.test", 443) == ["169.254.169.254"]
    with pytest.raises(OSError, match="unknown host"):
        await fake_queue.resolve("nowhere.test", 443)


async def test_history_has_exact_expiry_times(
    fake_queue: FakeQueue, autojump_clock: trio.testing.MockClock
) -> None:
    rid = await fake_queue.submit({"n": 1})
    async with fake_queue.client() as client:
        await trio.sleep(5)
        r = await client.get(
            "/internal/v1/queue/retrieve",
            params={"model": MODEL, "timeout": "0s", "claim_timeout": "10"},
        )
        claim = r.json()["data"]
        assert fake_queue.requests[-1].claimed
        await trio.sleep(30)  # no heartbeat: the lease lapses at t=15
        r = await client.get(
            "/internal/v1/queue/retrieve", params={"model": MODEL, "timeout": "0s"}
        )
        second = r.json()["data"]
        assert second["retries"] == 1
        await client.post(
            "/internal/v1/videos/status",
            json={
                "model": MODEL,
                "request_id": rid,
                "status": "done",
                "payload": {"ok": 1},
                "claim_id": second["claim_id"],
            },
        )
        late = await client.post(
            "/internal/v1/videos/status",
            json={
                "model": MODEL,
                "request_id": rid,
                "status": "done",
                "payload": {},
                "claim_id": claim["claim_id"],
            },
        )
        assert late.status_code == 409
    history = fake_queue.history(rid)
    assert [(t.time, t.status, t.reason) for t in history] == [
        (0.0, "pending", "submitted"),
        (5.0, "running", "claimed"),
        (15.0, "pending", "lease expired"),
        (35.0, "running", "claimed"),
        (35.0, "done", "reported"),
    ]
    assert len(fake_queue.terminal_reports(rid)) == 1
    assert (await fake_queue.status(rid))["outputs"] == {"ok": 1}


async def test_wait_status_and_cancel(
    fake_queue: FakeQueue, autojump_clock: trio.testing.MockClock
) -> None:
    rid = await fake_queue.submit({})
    async with trio.open_nursery() as nursery:

        async def cancel_later() -> None:
            await trio.sleep(4)
            assert await fake_queue.cancel(rid) == "canceled"

        nursery.start_soon(cancel_later)
        transition = await fake_queue.wait_status(rid, "canceled")
    assert transition.time == 4.0
    with pytest.raises(KeyError):
        await fake_queue.status("no-such-job")


def test_unknown_endpoint_is_refused() -> None:
    async def main() -> None:
        queue = FakeQueue()
        with pytest.raises(ValueError, match="unknown endpoint"):
            queue.fail("retrieve", 503)  # type: ignore[arg-type]
        queue.close()

    trio.run(main)


async def test_uploaded_file_downloads_from_the_api_base_with_credentials(
    fake_queue: FakeQueue, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake_queue.client() as client:
        r = await client.post("/v1/storage/upload-request", json={"filename": "rid-a.txt"})
        async with httpx.AsyncClient(transport=fake_queue.transport) as plain:
            assert (await plain.put(r.json()["upload_url"]["url"], content=b"hello")).is_success
            assert (
                await plain.get(f"{fake_queue.api_base_url}/v1/storage/rid-a.txt")
            ).status_code == 401
        got = await client.get("/v1/storage/rid-a.txt")
    assert got.status_code == 200 and got.content == b"hello"
    assert fake_queue.requests[-1].endpoint == "storage"
