"""Worker and client endpoints through plain httpx, in-process (httpx.ASGITransport)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from sprocket._queue_server import MAX_RETRIES, QueueService, QueueStore, create_app, thread_offload

from .conftest import API_KEY, AUTH, InProc

MODEL = "m"


async def submit(c: httpx.AsyncClient, payload: dict[str, Any] | None = None, **extra: Any) -> str:
    r = await c.post("/v1/queue/submit", json={"model": MODEL, "payload": payload or {}, **extra})
    assert r.status_code == 200, r.text
    return str(r.json()["requestId"])


async def claim(c: httpx.AsyncClient, wait: str = "0s", **params: str) -> dict[str, Any] | None:
    r = await c.get(
        "/internal/v1/queue/retrieve",
        params={"model": MODEL, "timeout": wait, "hostname": "h", **params},
        headers={"x-idle-time": "0.5"},
    )
    assert r.status_code == 200, r.text
    data = r.json().get("data")
    return data  # type: ignore[no-any-return]


async def update(c: httpx.AsyncClient, rid: str, status: str, **body: Any) -> httpx.Response:
    return await c.post(
        "/internal/v1/videos/status",
        json={"model": MODEL, "request_id": rid, "status": status, "payload": {}, **body},
    )


async def job(c: httpx.AsyncClient, rid: str) -> dict[str, Any]:
    r = await c.get("/v1/queue/status", params={"model": MODEL, "request_id": rid})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


# -- long-poll --------------------------------------------------------------------------------


async def test_long_poll_returns_nothing_after_timeout(
    inproc: InProc, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    assert await claim(inproc.client, wait="5s") is None
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_long_poll_wakes_when_a_job_arrives(
    inproc: InProc, autojump_clock: trio.testing.MockClock
) -> None:
    got: list[tuple[float, dict[str, Any] | None]] = []

    async def poller() -> None:
        data = await claim(inproc.client, wait="30s")
        got.append((trio.current_time(), data))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller)
        await trio.sleep(2.0)
        submitted_at = trio.current_time()
        rid = await submit(inproc.client, {"n": 1})
    (woke_at, data) = got[0]
    assert data is not None and data["request_id"] == rid
    # Woken by the submit itself: no virtual time passes between submit and hand-out.
    assert woke_at == submitted_at
    assert set(data) >= {"request_id", "payload", "info", "priority", "retries", "claim_id"}
    assert data["payload"] == {"n": 1} and data["retries"] == 0


async def test_long_poll_is_per_model(
    inproc: InProc, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        results: list[Any] = []

        async def poller() -> None:
            results.append(await claim(inproc.client, wait="3s"))

        nursery.start_soon(poller)
        await trio.sleep(1)
        r = await inproc.client.post("/v1/queue/submit", json={"model": "other", "payload": {}})
        assert r.status_code == 200
    assert results == [None]


async def test_timeout_formats(inproc: InProc, autojump_clock: trio.testing.MockClock) -> None:
    for text, seconds in [("1.5s", 1.5), ("500ms", 0.5), ("2", 2.0)]:
        start = trio.current_time()
        assert await claim(inproc.client, wait=text) is None
        assert trio.current_time() - start == pytest.approx(seconds)
    r = await inproc.client.get(
        "/internal/v1/queue/retrieve", params={"model": MODEL, "timeout": "soon"}
    )
    assert r.status_code == 400


# -- claim atomicity --------------------------------------------------------------------------


async def test_concurrent_claimers_never_share_a_job(tmp_path: Any) -> None:
    # Real threads and a real SQLite file, as the server runs it.
    store = QueueStore(tmp_path / "q.sqlite3")
    service = QueueService(store, offload=thread_offload(trio.CapacityLimiter(8)))
    app = create_app(service, api_key=API_KEY)
    n_jobs, n_workers = 60, 24
    claimed: list[str] = []
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://q", headers=AUTH
    ) as c:
        ids = {await submit(c, {"i": i}) for i in range(n_jobs)}

        async def worker() -> None:
            while True:
                data = await claim(c, wait="0.2s")
                if data is None:
                    return
                claimed.append(data["request_id"])

        async with trio.open_nursery() as nursery:
            for _ in range(n_workers):
                nursery.start_soon(worker)
    store.close()
    assert len(claimed) == n_jobs
    assert set(claimed) == ids


# -- leases, retries and fencing --------------------------------------------------------------


async def test_lease_expiry_requeues_then_fails_after_three_retries(
    inproc: InProc, autojump_clock: trio.testing.MockClock
) -> None:
    c = inproc.client
    rid = await submit(c, {"x": 1}, info={"keep": "me"})
    for attempt in range(MAX_RETRIES + 1):
        data = await claim(c, claim_timeout="10")
        assert data is not None and data["request_id"] == rid
        assert data["retries"] == attempt
        r = await update(
            c, rid, "running", info={f"seen{attempt}": True}, claim_id=data["claim_id"]
        )
        assert r.status_code == 200
        await trio.sleep(10.5)  # no heartbeat: the reaper takes the claim back
        state = await job(c, rid)
        if attempt < MAX_RETRIES:
            assert state["status"] == "pending"
            assert state["retries"] == attempt + 1
            assert state["info"]["keep"] == "me" and state["info"][f"seen{attempt}"] is True
    assert state["status"] == "failed"
    assert state["retries"] == MAX_RETRIES
    assert "claim expired" in state["info"]["error"]
    assert state["info"]["keep"] == "me"
    assert await claim(c) is None


async def test_running_update_renews_the_lease(
    inproc: InProc, autojump_clock: trio.testing.MockClock
) -> None:
    c = inproc.client
    rid = await submit(c)
    data = await claim(c, claim_timeout="10s")
    assert data is not None
    for _ in range(5):
        await trio.sleep(8)
        assert (await update(c, rid, "running", claim_id=data["claim_id"])).status_code == 200
    state = await job(c, rid)
    assert state["status"] == "running" and state["retries"] == 0


async def test_default_claim_timeout_is_300_seconds(
    inproc: InProc, autojump_clock: trio.testing.MockClock
) -> None:
    rid = await submit(inproc.client)
    assert await claim(inproc.client) is not None
    await trio.sleep(299)
    assert (await job(inproc.client, rid))["status"] == "running"
    await trio.sleep(2)
    assert (await job(inproc.client, rid))["status"] == "pending"


async def test_expired_job_wakes_a_waiting_worker(
    inproc: InProc, autojump_clock: trio.testing.MockClock
) -> None:
    c = inproc.client
    rid = await submit(c)
    assert await claim(c, claim_timeout="10") is not None
    start = trio.current_time()
    data = await claim(c, wait="60s")  # woken by the reaper, not by its own timeout
    assert data is not None and data["request_id"] == rid and data["retries"] == 1
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_fencing_by_claim_id(inproc: InProc, autojump_clock: trio.testing.MockClock) -> None:
    c = inproc.client
    rid = await submit(c)
    first = await claim(c, claim_timeout="10")
    assert first is not None
    await trio.sleep(11)
    second = await claim(c, claim_timeout="10")
    assert second is not None and second["claim_id"] != first["claim_id"]
    # The first worker's late heartbeat and result are refused and change nothing.
    r = await update(c, rid, "running", claim_id=first["claim_id"], info={"stale": True})
    assert r.status_code == 409 and r.json()["status"] == "running"
    r = await update(c, rid, "done", payload={"out": "stale"}, claim_id=first["claim_id"])
    assert r.status_code == 409
    state = await job(c, rid)
    assert state["status"] == "running" and "stale" not in state["info"]
    r = await update(c, rid, "done", payload={"out": 1}, claim_id=second["claim_id"])
    assert r.status_code == 200
    state = await job(c, rid)
    assert state["status"] == "done" and state["outputs"] == {"out": 1}
    assert state["done_at"] is not None and state["claimed_at"] is not None


async def test_fencing_without_claim_id_uses_state(
    inproc: InProc, autojump_clock: trio.testing.MockClock
) -> None:
    c = inproc.client
    rid = await submit(c)
    assert await claim(c, claim_timeout="10") is not None
    await trio.sleep(11)  # expired: back to pending
    r = await update(c, rid, "running")
    assert r.status_code == 409 and r.json()["status"] == "pending"
    assert await claim(c) is not None
    assert (await update(c, rid, "failed", info={"error": "boom"})).status_code == 200
    r = await update(c, rid, "done", payload={"late": True})
    assert r.status_code == 409 and r.json()["status"] == "failed"
    state = await job(c, rid)
    assert state["status"] == "failed" and state["info"]["error"] == "boom"
    assert state["outputs"] is None and state["retries"] == 1


async def test_failed_is_not_retried(inproc: InProc) -> None:
    c = inproc.client
    rid = await submit(c)
    assert await claim(c) is not None
    assert (await update(c, rid, "failed", info={"error": "bad input"})).status_code == 200
    assert await claim(c) is None
    assert (await job(c, rid))["status"] == "failed"


# -- cancel, clear, info, priority ------------------------------------------------------------


async def test_cancel_pending_and_running(inproc: InProc) -> None:
    c = inproc.client
    pending = await submit(c)
    r = await c.post("/v1/queue/cancel", json={"model": MODEL, "request_id": pending})
    assert r.json() == {"status": "canceled"}
    running = await submit(c)
    data = await claim(c)
    assert data is not None and data["request_id"] == running
    # As the managed API: a running job is left alone and its status returned.
    r = await c.post("/v1/queue/cancel", json={"model": MODEL, "request_id": running})
    assert r.status_code == 200 and r.json() == {"status": "running"}
    assert (await job(c, running))["status"] == "running"
    # Our opt-in extension cancels it; the worker learns on its next update.
    r = await c.post(
        "/v1/queue/cancel", json={"model": MODEL, "request_id": running, "running": True}
    )
    assert r.json() == {"status": "canceled"}
    r = await update(c, running, "running", claim_id=data["claim_id"])
    assert r.status_code == 409 and r.json()["status"] == "canceled"
    r = await update(c, running, "done", payload={"x": 1})
    assert r.status_code == 409 and r.json()["status"] == "canceled"
    assert (await job(c, running))["outputs"] is None
    # Terminal jobs are not canceled.
    r = await c.post("/v1/queue/cancel", json={"model": MODEL, "request_id": running})
    assert r.json() == {"status": "canceled"}


async def test_cancel_done_job_is_unchanged(inproc: InProc) -> None:
    c = inproc.client
    rid = await submit(c)
    assert await claim(c) is not None
    assert (await update(c, rid, "done", payload={"ok": 1})).status_code == 200
    for running in (False, True):
        r = await c.post(
            "/v1/queue/cancel", json={"model": MODEL, "request_id": rid, "running": running}
        )
        assert r.json() == {"status": "done"}


async def test_clear_cancels_only_pending(inproc: InProc) -> None:
    c = inproc.client
    ids = [await submit(c) for _ in range(4)]
    assert await claim(c) is not None
    r = await c.post("/v1/queue/clear", json={"model": MODEL})
    assert r.json() == {"canceled_count": 3}
    statuses = [(await job(c, rid))["status"] for rid in ids]
    assert statuses == ["running", "canceled", "canceled", "canceled"]
    r = await c.get("/v1/queue/metrics", params={"model": MODEL})
    assert r.json() == {"messages_waiting": 0, "messages_running": 1, "total_jobs": 1}


async def test_info_merges(inproc: InProc) -> None:
    c = inproc.client
    rid = await submit(c, info={"a": 1, "b": 1})
    data = await claim(c)
    assert data is not None and data["info"] == {"a": 1, "b": 1}
    await update(c, rid, "running", info={"b": 2, "progress": 0.5})
    await update(c, rid, "running", info={"progress": 0.9})
    assert (await job(c, rid))["info"] == {"a": 1, "b": 2, "progress": 0.9}
    await update(c, rid, "done", payload={"r": True}, info={"progress": 1.0})
    state = await job(c, rid)
    assert state["info"] == {"a": 1, "b": 2, "progress": 1.0}
    assert state["outputs"] == {"r": True}


async def test_strict_priority_fifo_within_priority(inproc: InProc) -> None:
    c = inproc.client
    order = [0, 5, 0, -1, 5, 10]
    ids = [await submit(c, {"i": i}, priority=p) for i, p in enumerate(order)]
    got = []
    while (data := await claim(c)) is not None:
        got.append(data["request_id"])
    expected = [ids[i] for i in sorted(range(len(order)), key=lambda i: (-order[i], i))]
    assert got == expected


async def test_metrics(inproc: InProc) -> None:
    c = inproc.client
    for _ in range(3):
        await submit(c)
    await claim(c)
    r = await c.get("/v1/queue/metrics", params={"model": MODEL})
    assert r.json() == {"messages_waiting": 2, "messages_running": 1, "total_jobs": 3}
    r = await c.get("/v1/queue/metrics", params={"model": "unknown"})
    assert r.json() == {"messages_waiting": 0, "messages_running": 0, "total_jobs": 0}


# -- bad input and auth -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"payload": {}}',
        b'{"model": "", "payload": {}}',
        b'{"model": "m"}',
        b'{"model": "m", "payload": [1]}',
        b'{"model": "m", "payload": "x"}',
        b'{"model": "m", "payload": {}, "priority": 1.5}',
        b'{"model": "m", "payload": {}, "priority": "1"}',
        b'{"model": "m", "payload": {}, "priority": true}',
        b'{"model": "m", "payload": {}, "priority": 99999999999999999999999}',
        b'{"model": "m", "payload": {}, "info": 3}',
        b'{"model": "m", "payload": {"x": NaN}}',
        b"\xff\xfe",
    ],
)
async def test_bad_submit_is_refused_and_stores_nothing(inproc: InProc, body: bytes) -> None:
    r = await inproc.client.post(
        "/v1/queue/submit", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert "message" in r.json()["error"]
    assert inproc.store.all_jobs() == []


async def test_oversized_body_is_413(inproc: InProc) -> None:
    big = {"model": MODEL, "payload": {"x": "a" * (17 * 1024 * 1024)}}
    r = await inproc.client.post("/v1/queue/submit", json=big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
    assert inproc.store.all_jobs() == []


async def test_unknown_ids_are_404(inproc: InProc) -> None:
    c = inproc.client
    rid = await submit(c)
    missing = "01900000-0000-7000-8000-000000000000"
    r = await c.get("/v1/queue/status", params={"model": MODEL, "request_id": missing})
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = await c.get("/v1/queue/status", params={"model": "other", "request_id": rid})
    assert r.status_code == 404
    r = await c.post("/v1/queue/cancel", json={"model": MODEL, "request_id": missing})
    assert r.status_code == 404
    assert (await update(c, missing, "running")).status_code == 404
    r = await c.get("/v1/queue/status", params={"model": MODEL})
    assert r.status_code == 400


async def test_bad_status_updates(inproc: InProc) -> None:
    c = inproc.client
    rid = await submit(c)
    assert await claim(c) is not None
    for body in (
        {"model": MODEL, "request_id": rid, "status": "canceled"},
        {"model": MODEL, "request_id": rid, "status": "running", "info": [1]},
        {"model": MODEL, "request_id": rid, "status": "done", "payload": "x"},
        {"model": MODEL, "request_id": rid, "status": "running", "claim_id": 7},
        {"request_id": rid, "status": "running"},
    ):
        r = await c.post("/internal/v1/videos/status", json=body)
        assert r.status_code == 400, body
    assert (await job(c, rid))["status"] == "running"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_KEY},
        {"Authorization": "Bearer "},
    ],
)
async def test_wrong_key_is_401_and_changes_nothing(
    inproc: InProc, headers: dict[str, str]
) -> None:
    async with httpx.AsyncClient(
        transport=inproc.client._transport, base_url="http://queue.test", headers=headers
    ) as anon:
        for method, path, kwargs in [
            ("POST", "/v1/queue/submit", {"json": {"model": MODEL, "payload": {}}}),
            ("POST", "/v1/queue/clear", {"json": {"model": MODEL}}),
            ("GET", "/v1/queue/metrics", {"params": {"model": MODEL}}),
            ("GET", "/internal/v1/queue/retrieve", {"params": {"model": MODEL}}),
            ("POST", "/v1/storage/upload-request", {"json": {"filename": "a.txt"}}),
            ("GET", "/v1/storage/a.txt", {}),
            ("GET", "/no/such/path", {}),
        ]:
            r = await anon.request(method, path, **kwargs)
            assert r.status_code == 401, path
            assert r.json()["error"]["type"] == "unauthorized"
            assert API_KEY not in r.text
    assert inproc.store.all_jobs() == []
