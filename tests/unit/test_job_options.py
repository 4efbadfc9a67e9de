"""``POST /v1/jobs`` options over HTTP: priority (bounded, capped per key), ``webhook_url``
(SSRF-guarded, signed, called when the job ends) and ``Idempotency-Key``. No Ray, no models,
no network (the webhook receiver is an httpx mock, names resolve through a fake)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from serve.http.app import create_app
from serve.http.auth import add_key
from serve.jobs.runner import JobRunner
from serve.jobs.store import AsyncJobStore
from serve.jobs.webhooks import WebhookSender
from serve.settings import ApiLimits, AuthSettings, JobSettings, WebhookSettings
from tests.jobfakes import FakeJobBackend
from tests.unit.test_api import FakeBackend
from tests.unit.test_jobs_api import PARAMS, wait_for

SECRET = b"test-secret"
ADDRESSES = {"hooks.example.com": ["93.184.216.34"], "internal.example.com": ["10.0.0.7"]}


async def fake_resolve(host: str, port: int) -> list[str]:
    if host not in ADDRESSES:
        raise OSError(f"no such host {host}")
    return ADDRESSES[host]


class Receiver:
    """The webhook's receiving end: records each call; answers from ``statuses`` in turn."""

    def __init__(self, statuses=(200,)) -> None:
        self.calls: list[httpx.Request] = []
        self.statuses = list(statuses)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        return httpx.Response(self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0])


def make_client(tmp_path: Path | None = None, receiver: Receiver | None = None, step_s: float = 0.005,
                keys: dict | None = None, **settings):
    job_settings = JobSettings(**{"progress_interval_s": 0.005, **settings})

    async def no_wait(_: float) -> None:
        return None

    sender = WebhookSender(WebhookSettings(), SECRET, transport=httpx.MockTransport(receiver or Receiver()),
                           sleep=no_wait, resolve=fake_resolve)
    runner = JobRunner(AsyncJobStore(job_settings), FakeJobBackend(step_s=step_s), job_settings, webhooks=sender)
    auth, issued = AuthSettings(), {}
    if keys is not None:
        path = tmp_path / "keys.yaml"
        issued = {name: add_key(path, name, requests_per_s=1000, images_per_min=1e6, **extra)
                  for name, extra in keys.items()}
        auth = AuthSettings(api_keys_file=path)
    app = create_app(ApiLimits(), FakeBackend(), jobs=runner, auth=auth)
    return TestClient(app), runner, issued


def submit(client, headers=None, **fields):
    return client.post("/v1/jobs", json={"mode": "text2img", "params": PARAMS, **fields}, headers=headers or {})


def field_error(response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["details"][0]["field"], error["details"][0]["message"]


# -- priority -----------------------------------------------------------------------------


def test_priority_is_bounded_and_above_the_default_ceiling_needs_a_key_allowed_it(tmp_path):
    client, _, keys = make_client(tmp_path, keys={"plain": {}, "vip": {"max_priority": 5}, "ops": {"admin": True}})
    bearer = {name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()}
    with client:
        status, field, message = field_error(submit(client, bearer["plain"], priority=1))
        assert (status, field) == (422, "priority") and "at most 0" in message
        assert submit(client, bearer["plain"], priority=-3).status_code == 202, "lower is always allowed"
        assert submit(client, bearer["vip"], priority=5).json()["priority"] == 5
        status, field, message = field_error(submit(client, bearer["vip"], priority=6))
        assert (status, field) == (422, "priority") and "at most 5" in message
        assert submit(client, bearer["ops"], priority=10).status_code == 202
        status, field, _ = field_error(submit(client, bearer["ops"], priority=11))
        assert (status, field) == (422, "priority"), "the hard bound holds for every key"


def test_queued_jobs_start_highest_priority_first():
    client, runner, _ = make_client(step_s=0.02, max_running_jobs=1, max_priority=5)
    with client:
        first = submit(client).json()  # takes the one slot
        low = submit(client, priority=-1).json()
        normal = submit(client).json()
        high = submit(client, priority=5).json()
        positions = {job["id"]: job["position"] for job in client.get("/v1/jobs?state=queued").json()["jobs"]}
        assert positions == {high["id"]: 0, normal["id"]: 1, low["id"]: 2}
        finals = [wait_for(client, job["id"], {"succeeded"}) for job in (first, low, normal, high)]
    started = {view["id"]: view["started_at"] for view in finals}
    assert started[first["id"]] < started[high["id"]] < started[normal["id"]] < started[low["id"]]


# -- webhooks -----------------------------------------------------------------------------


@pytest.mark.parametrize("url, says", [
    ("http://127.0.0.1:8000/hook", "loopback"),
    ("http://10.1.2.3/hook", "private"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://internal.example.com/hook", "private"),
    ("http://nowhere.example.com/hook", "resolve"),
    ("file:///etc/passwd", "http"),
])
def test_a_webhook_to_a_private_or_unusable_address_is_refused_with_a_422_naming_the_field(url, says):
    client, runner, _ = make_client()
    with client:
        response = submit(client, webhook_url=url)
        status, field, message = field_error(response)
        assert (status, field) == (422, "webhook_url") and says in message, message
        assert client.get("/v1/jobs").json()["jobs"] == [], "nothing was created"


def verify(request: httpx.Request) -> dict:
    timestamp = request.headers["x-kandinsky-timestamp"]
    expected = hmac.new(SECRET, f"{timestamp}.".encode() + request.content, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers["x-kandinsky-signature"], f"sha256={expected}")
    return json.loads(request.content)


def test_a_finished_job_calls_its_webhook_signed_with_its_final_view_after_retries():
    receiver = Receiver(statuses=(503, 200))
    client, runner, _ = make_client(receiver=receiver)
    with client:
        job = submit(client, webhook_url="https://hooks.example.com/done?token=t").json()
        final = wait_for(client, job["id"], {"succeeded"})
        deadline = time.monotonic() + 10
        while len(receiver.calls) < 2:
            assert time.monotonic() < deadline, f"{len(receiver.calls)} webhook call(s)"
            time.sleep(0.01)  # polling interval
    payload = verify(receiver.calls[-1])
    assert payload == {"event": "job.succeeded", "job": final}
    assert receiver.calls[-1].headers["x-kandinsky-event"] == "job.succeeded"
    assert receiver.calls[0].headers["x-kandinsky-delivery"] == receiver.calls[1].headers["x-kandinsky-delivery"]
    assert receiver.calls[-1].url.host == "93.184.216.34", "sent to the address the guard vetted"


def test_a_cancelled_job_calls_its_webhook_too():
    receiver = Receiver()
    client, _, _ = make_client(receiver=receiver, step_s=0.05)
    with client:
        job = submit(client, webhook_url="https://hooks.example.com/done").json()
        client.delete(f"/v1/jobs/{job['id']}")
        wait_for(client, job["id"], {"cancelled"})
        deadline = time.monotonic() + 10
        while not receiver.calls:
            assert time.monotonic() < deadline, "the webhook was never called"
            time.sleep(0.01)  # polling interval
    assert verify(receiver.calls[0])["event"] == "job.cancelled"


# -- Idempotency-Key ------------------------------------------------------------------------


def test_a_retried_post_with_the_same_idempotency_key_returns_the_same_job():
    client, _, _ = make_client()
    with client:
        first = submit(client, {"Idempotency-Key": "order-1"})
        again = submit(client, {"Idempotency-Key": "order-1"})
        other = submit(client, {"Idempotency-Key": "order-2"})
        plain = submit(client)
        listed = client.get("/v1/jobs").json()["jobs"]
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert len({first.json()["id"], other.json()["id"], plain.json()["id"]}) == 3 and len(listed) == 3


def test_an_idempotency_key_reused_for_a_different_request_is_a_409():
    client, _, _ = make_client()
    with client:
        assert submit(client, {"Idempotency-Key": "k"}).status_code == 202
        response = client.post("/v1/jobs", json={"mode": "text2img", "params": {**PARAMS, "seed": 4}},
                               headers={"Idempotency-Key": "k"})
    assert response.status_code == 409 and response.json()["error"]["type"] == "idempotency_key_reused"
    assert response.json()["error"]["details"][0]["field"] == "Idempotency-Key"


@pytest.mark.parametrize("key", ["", "x" * 256, "a\x7fb"])
def test_a_malformed_idempotency_key_is_a_422_naming_the_header(key):
    client, _, _ = make_client()
    with client:
        status, field, message = field_error(submit(client, {"Idempotency-Key": key}))
    assert (status, field) == (422, "Idempotency-Key") and "255" in message
