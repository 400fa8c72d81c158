"""The official ``together`` SDK against a real ``sprocket queue serve``: every answer parses."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

together = pytest.importorskip("together")

from together.types.beta.jig.queue_cancel_response import QueueCancelResponse  # noqa: E402
from together.types.beta.jig.queue_clear_response import QueueClearResponse  # noqa: E402
from together.types.beta.jig.queue_metrics_response import QueueMetricsResponse  # noqa: E402
from together.types.beta.jig.queue_retrieve_response import QueueRetrieveResponse  # noqa: E402
from together.types.beta.jig.queue_submit_response import QueueSubmitResponse  # noqa: E402

from tests.procs import QueueServer  # noqa: E402

from .conftest import API_KEY  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture
def sdk(server: QueueServer) -> Iterator[Any]:
    client = together.Together(api_key=API_KEY, base_url=server.url, max_retries=0)
    try:
        yield client
    finally:
        client.close()


def _fields(model: type[Any]) -> set[str]:
    names = set()
    for name, info in model.model_fields.items():
        names.add(info.alias or name)
    return names


def _work(server: QueueServer, model: str, outputs: dict[str, Any]) -> str:
    """Play the worker: claim one job and report it done."""
    with server.client() as http:
        r = http.get("/internal/v1/queue/retrieve", params={"model": model, "timeout": "5s"})
        data = r.json()["data"]
        r = http.post(
            "/internal/v1/videos/status",
            json={
                "model": model,
                "request_id": data["request_id"],
                "status": "done",
                "payload": outputs,
                "info": {"progress": 1.0},
                "claim_id": data["claim_id"],
            },
        )
        assert r.status_code == 200, r.text
        return str(data["request_id"])


def test_submit_and_retrieve_parse(sdk: Any, server: QueueServer) -> None:
    queue = sdk.beta.jig.queue
    submitted = queue.submit(model="sdk-a", payload={"prompt": "hi"}, info={"tag": "x"}, priority=3)
    assert isinstance(submitted, QueueSubmitResponse)
    assert isinstance(submitted.request_id, str) and submitted.request_id

    job = queue.retrieve(model="sdk-a", request_id=submitted.request_id)
    assert isinstance(job, QueueRetrieveResponse)
    assert job.status == "pending" and job.model == "sdk-a"
    assert job.request_id == submitted.request_id
    assert job.inputs == {"prompt": "hi"} and job.info == {"tag": "x"}
    assert job.priority == 3 and job.retries == 0
    assert isinstance(job.created_at, dt.datetime) and job.created_at.tzinfo is not None
    assert job.claimed_at is None and job.done_at is None and job.outputs is None

    assert _work(server, "sdk-a", {"text": "hello"}) == submitted.request_id
    job = queue.retrieve(model="sdk-a", request_id=submitted.request_id)
    assert job.status == "done" and job.outputs == {"text": "hello"}
    assert job.info == {"tag": "x", "progress": 1.0}
    assert isinstance(job.claimed_at, dt.datetime) and isinstance(job.done_at, dt.datetime)
    assert job.created_at <= job.claimed_at <= job.done_at


def test_raw_answers_use_only_sdk_fields(sdk: Any, server: QueueServer) -> None:
    queue = sdk.beta.jig.queue
    rid = queue.submit(model="sdk-raw", payload={}).request_id
    with server.client() as http:
        raw = http.post("/v1/queue/submit", json={"model": "sdk-raw", "payload": {}}).json()
        # The managed API also returns "status" on submit.
        assert set(raw) == {"requestId", "status"}
        QueueSubmitResponse.model_validate(raw)
        raw = http.get("/v1/queue/status", params={"model": "sdk-raw", "request_id": rid}).json()
        assert set(raw) <= _fields(QueueRetrieveResponse)
        QueueRetrieveResponse.model_validate(raw)
        raw = http.get("/v1/queue/metrics", params={"model": "sdk-raw"}).json()
        assert set(raw) == _fields(QueueMetricsResponse)
        QueueMetricsResponse.model_validate(raw)
        raw = http.post("/v1/queue/clear", json={"model": "sdk-raw"}).json()
        assert set(raw) == _fields(QueueClearResponse)
        raw = http.post("/v1/queue/cancel", json={"model": "sdk-raw", "request_id": rid}).json()
        assert set(raw) == _fields(QueueCancelResponse)
        QueueCancelResponse.model_validate(raw)


def test_cancel_clear_metrics(sdk: Any, server: QueueServer) -> None:
    queue = sdk.beta.jig.queue
    ids = [queue.submit(model="sdk-b", payload={"i": i}).request_id for i in range(3)]
    metrics = queue.metrics(model="sdk-b")
    assert isinstance(metrics, QueueMetricsResponse)
    assert (metrics.messages_waiting, metrics.messages_running, metrics.total_jobs) == (3, 0, 3)

    canceled = queue.cancel(model="sdk-b", request_id=ids[0])
    assert isinstance(canceled, QueueCancelResponse) and canceled.status == "canceled"
    assert queue.retrieve(model="sdk-b", request_id=ids[0]).status == "canceled"

    _work(server, "sdk-b", {"ok": True})  # takes ids[1]
    metrics = queue.metrics(model="sdk-b")
    assert (metrics.messages_waiting, metrics.messages_running, metrics.total_jobs) == (1, 0, 1)
    # A job that is not pending is left alone; its status comes back unchanged.
    assert queue.cancel(model="sdk-b", request_id=ids[1]).status == "done"

    cleared = queue.clear(model="sdk-b")
    assert isinstance(cleared, QueueClearResponse) and cleared.canceled_count == 1
    assert queue.retrieve(model="sdk-b", request_id=ids[2]).status == "canceled"
    assert queue.metrics(model="sdk-b").total_jobs == 0


def test_errors_map_to_sdk_exceptions(server: QueueServer) -> None:
    bad = together.Together(api_key="not-the-key", base_url=server.url, max_retries=0)
    good = together.Together(api_key=API_KEY, base_url=server.url, max_retries=0)
    try:
        with pytest.raises(together.AuthenticationError) as auth_error:
            bad.beta.jig.queue.submit(model="sdk-c", payload={})
        assert auth_error.value.status_code == 401
        assert good.beta.jig.queue.metrics(model="sdk-c").total_jobs == 0
        with pytest.raises(together.NotFoundError):
            good.beta.jig.queue.retrieve(model="sdk-c", request_id="no-such-id")
        with pytest.raises(together.BadRequestError):
            good.beta.jig.queue.submit(model="sdk-c", payload="nope")  # type: ignore[arg-type]
    finally:
        bad.close()
        good.close()


def test_base_url_is_the_server_root(server: QueueServer) -> None:
    # The SDK appends /v1/queue/...; nothing is served under a doubled /v1.
    with server.client() as http:
        r = http.post("/v1/v1/queue/submit", json={"model": "x", "payload": {}})
        assert r.status_code == 404
    assert httpx.URL(server.url).path in ("", "/")
