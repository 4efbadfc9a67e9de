"""``/v1/jobs`` over HTTP with a fake backend and an in-process store. No Ray, no models."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from serve.http.app import create_app
from serve.jobs.store import AsyncJobStore
from serve.jobs.runner import JobRunner
from serve.settings import JobSettings
from serve.settings import ApiLimits
from tests.jobfakes import FakeJobBackend
from tests.unit.test_api import FakeBackend

PARAMS = {"prompt": "a red circle", "width": 64, "height": 64, "seed": 3, "prior_steps": 3, "steps": 6}


def make_client(backend=None, unavailable=None, **settings):
    backend = backend or FakeJobBackend(step_s=0.005)
    job_settings = JobSettings(**{"progress_interval_s": 0.005, **settings})
    store = AsyncJobStore(job_settings)
    runner = JobRunner(store, backend, job_settings)
    app = create_app(ApiLimits(), FakeBackend(), unavailable=unavailable, jobs=runner)
    return TestClient(app), backend


@pytest.fixture
def client():
    client, _ = make_client()
    with client:
        yield client


def wait_for(client, job_id, states, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["state"] in states:
            return view
        assert time.monotonic() < deadline, f"job stayed {view['state']}"
        time.sleep(0.01)  # polling interval


def read_events(client, job_id, headers=None):
    events, current = [], {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers or {}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if not line:
                if current:
                    events.append(current)
                current = {}
                continue
            name, _, value = line.partition(": ")
            current[name] = value
    return [{"id": int(e["id"]), "event": e["event"], "data": json.loads(e["data"])} for e in events]


def test_submit_is_202_with_urls_and_the_job_succeeds(client):
    response = client.post("/v1/jobs", json={"mode": "text2img", "params": {**PARAMS, "num_images": 2}})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] in ("queued", "running") and response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["urls"] == {"self": f"/v1/jobs/{job['id']}", "events": f"/v1/jobs/{job['id']}/events",
                           "cancel": f"/v1/jobs/{job['id']}"}
    final = wait_for(client, job["id"], {"succeeded"})
    assert final["progress"] == 1.0 and final["seeds"] == [3, 4] and final["step"] == final["steps"] == 6
    assert final["timings"]["run_s"] >= 0 and final["timings"]["stages"]["denoiser"]["compute_ms"] == 2.0
    image = client.get(final["images"][1]["url"])
    assert image.status_code == 200 and image.content == b"img1" and image.headers["content-type"] == "image/png"
    assert client.get(f"/v1/jobs/{job['id']}/images/2").status_code == 404


def test_events_arrive_in_order_progress_never_decreases_and_the_last_matches_get(client):
    job = client.post("/v1/jobs", json={"mode": "text2img", "params": {**PARAMS, "steps": 30}}).json()
    events = read_events(client, job["id"])
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    progress = [e["data"]["progress"] for e in events]
    assert progress == sorted(progress)
    assert len({e["data"]["step"] for e in events if e["data"]["stage"] == "denoise"}) > 3  # per-step, not per-stage
    assert events[-1]["event"] == "state" and events[-1]["data"]["state"] == "succeeded"
    assert events[-1]["data"] == client.get(f"/v1/jobs/{job['id']}").json()
    # Resuming after an event id replays only what came after it.
    tail = read_events(client, job["id"], headers={"Last-Event-ID": str(events[-3]["id"])})
    assert [e["id"] for e in tail] == [events[-2]["id"], events[-1]["id"]]


def test_validation_errors_are_422_at_once_naming_the_params_field(client):
    bad = client.post("/v1/jobs", json={"mode": "text2img", "params": {**PARAMS, "steps": 0}})
    assert bad.status_code == 422 and "params.steps" in bad.json()["error"]["message"]
    assert client.post("/v1/jobs", json={"mode": "paint", "params": PARAMS}).status_code == 422
    missing = client.post("/v1/jobs", json={"mode": "img2img", "params": PARAMS})
    assert missing.status_code == 422 and "params.image" in missing.json()["error"]["message"]


def test_unconfigured_mode_is_404():
    client, _ = make_client(unavailable={"inpaint": "inpaint is not configured"})
    with client:
        response = client.post("/v1/jobs", json={"mode": "inpaint", "params": PARAMS})
    assert response.status_code == 404 and response.json()["error"]["type"] == "mode_not_configured"


def test_cancel_running_queued_finished_and_unknown():
    client, backend = make_client(FakeJobBackend(step_s=0.01), max_running_jobs=1)
    with client:
        running = client.post("/v1/jobs", json={"mode": "text2img", "params": {**PARAMS, "steps": 150}}).json()
        queued = client.post("/v1/jobs", json={"mode": "text2img", "params": PARAMS}).json()
        wait_for(client, running["id"], {"running"})
        cancelled_queued = client.delete(f"/v1/jobs/{queued['id']}")
        assert cancelled_queued.status_code == 200 and cancelled_queued.json()["state"] == "cancelled"
        response = client.delete(f"/v1/jobs/{running['id']}")
        assert response.status_code == 200 and response.json()["state"] == "cancelled"
        steps_at_cancel = backend.steps_run[running["id"]]
        again = client.delete(f"/v1/jobs/{running['id']}")
        assert again.status_code == 409 and again.json()["error"]["type"] == "job_finished"
        assert client.delete("/v1/jobs/nope").status_code == 404
        assert client.get("/v1/jobs/nope").status_code == 404
        # The slot is free: a new job runs to the end.
        follow = client.post("/v1/jobs", json={"mode": "text2img", "params": PARAMS}).json()
        assert wait_for(client, follow["id"], {"succeeded"})["state"] == "succeeded"
    assert queued["id"] not in backend.started
    assert backend.steps_run[running["id"]] == steps_at_cancel < 153


def test_caps_give_429_with_retry_after():
    client, backend = make_client(FakeJobBackend(step_s=0.01), max_active_jobs_per_client=1)
    with client:
        first = client.post("/v1/jobs", json={"mode": "text2img", "params": {**PARAMS, "steps": 150}})
        assert first.status_code == 202
        second = client.post("/v1/jobs", json={"mode": "text2img", "params": PARAMS})
        assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
        assert "max_active_jobs_per_client=1" in second.json()["error"]["message"]
        # Without keys a client is its address: a made-up bearer token is no new allowance.
        posing = client.post("/v1/jobs", json={"mode": "text2img", "params": PARAMS}, headers={"Authorization": "Bearer k2"})
        assert posing.status_code == 429
        with TestClient(client.app, client=("10.0.0.2", 50000)) as elsewhere:
            other = elsewhere.post("/v1/jobs", json={"mode": "text2img", "params": PARAMS})
        assert other.status_code == 202  # another client has its own allowance
        client.delete(f"/v1/jobs/{first.json()['id']}")


def test_previews_are_events_when_asked():
    client, _ = make_client(FakeJobBackend(step_s=0.01))
    with client:
        job = client.post("/v1/jobs", json={"mode": "text2img", "params": {**PARAMS, "steps": 30}, "preview_every": 5}).json()
        events = read_events(client, job["id"])
    previews = [e["data"] for e in events if e["event"] == "preview"]
    assert previews and all(p["media_type"] == "image/jpeg" and p["image"] for p in previews)


@pytest.mark.parametrize("header", ["²".encode(), "9" * 5000, "-1", "abc"])
def test_a_bad_last_event_id_is_422_naming_the_header(client, header):
    job = client.post("/v1/jobs", json={"mode": "text2img", "params": {"prompt": "a", "width": 64, "height": 64, "steps": 2}}).json()
    response = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": header})
    assert response.status_code == 422 and response.json()["error"]["details"][0]["field"] == "Last-Event-ID"


def test_a_job_is_its_submitters_alone():
    """Without keys a client is its address: another address finds nothing under the same id."""
    client, _ = make_client(FakeJobBackend(step_s=0.001))
    with client, TestClient(client.app, client=("10.0.0.2", 50000)) as stranger:
        job = client.post("/v1/jobs", json={"mode": "text2img", "params": PARAMS}).json()
        assert wait_for(client, job["id"], {"succeeded"})["state"] == "succeeded"
        for method, path in (("get", f"/v1/jobs/{job['id']}"), ("get", f"/v1/jobs/{job['id']}/images/0"),
                             ("get", f"/v1/jobs/{job['id']}/events"), ("delete", f"/v1/jobs/{job['id']}")):
            refused = getattr(stranger, method)(path)
            assert refused.status_code == 404 and refused.json()["error"]["type"] == "job_not_found", (method, path)
            mine = getattr(client, method)(path)
            assert mine.status_code == (409 if method == "delete" else 200), (method, path, mine.text)
        running = client.post("/v1/jobs", json={"mode": "text2img", "params": {**PARAMS, "steps": 150}}).json()
        assert stranger.delete(f"/v1/jobs/{running['id']}").status_code == 404
        assert client.get(f"/v1/jobs/{running['id']}").json()["cancel_requested"] is False, "a stranger cannot cancel it"
        client.delete(f"/v1/jobs/{running['id']}")


def test_event_streams_are_capped_per_client_and_given_back_when_they_end():
    client, _ = make_client(FakeJobBackend(step_s=0.01), max_streams_per_client=1, max_streams=2)
    with client, TestClient(client.app, client=("10.0.0.2", 50000)) as other, \
            TestClient(client.app, client=("10.0.0.3", 50000)) as third:
        long = client.post("/v1/jobs", json={"mode": "text2img", "params": {**PARAMS, "steps": 150}}).json()
        events = f"/v1/jobs/{long['id']}/events"
        with client.stream("GET", events) as held:
            assert held.status_code == 200
            second = client.get(events)
            assert second.status_code == 429 and second.json()["error"]["type"] == "too_many_streams"
            assert int(second.headers["Retry-After"]) >= 1
            mine = other.post("/v1/jobs", json={"mode": "text2img", "params": {**PARAMS, "steps": 150}}).json()
            with other.stream("GET", f"/v1/jobs/{mine['id']}/events") as also_held:
                assert also_held.status_code == 200, "another client has its own share"
                late = third.post("/v1/jobs", json={"mode": "text2img", "params": PARAMS}).json()
                full = third.get(f"/v1/jobs/{late['id']}/events")
                assert full.status_code == 503 and full.json()["error"]["type"] == "too_many_streams"
                assert client.get(f"/v1/jobs/{long['id']}").status_code == 200, "reads still answer"
            other.delete(f"/v1/jobs/{mine['id']}")
        client.delete(f"/v1/jobs/{long['id']}")
        deadline = time.monotonic() + 10
        while (again := client.get(events)).status_code != 200:  # the closed stream's place comes back
            assert again.status_code == 429 and time.monotonic() < deadline, again.text
            time.sleep(0.01)  # polling interval


def test_the_job_list_is_the_callers_own_newest_first_in_pages_and_filtered_by_state():
    client, backend = make_client(FakeJobBackend(step_s=0.001))
    with client, TestClient(client.app, client=("10.0.0.2", 50000)) as other:
        mine = [client.post("/v1/jobs", json={"mode": "text2img", "params": {**PARAMS, "seed": i}}).json()["id"]
                for i in range(5)]
        theirs = other.post("/v1/jobs", json={"mode": "text2img", "params": PARAMS}).json()["id"]
        for job in mine:
            wait_for(client, job, {"succeeded"})
        first = client.get("/v1/jobs", params={"limit": 2}).json()
        assert [job["id"] for job in first["jobs"]] == mine[::-1][:2] and first["next"] == mine[3]
        rest = client.get("/v1/jobs", params={"limit": 10, "before": first["next"]}).json()
        assert [job["id"] for job in rest["jobs"]] == mine[::-1][2:] and rest["next"] is None
        assert [job["id"] for job in other.get("/v1/jobs").json()["jobs"]] == [theirs]
        assert client.get("/v1/jobs", params={"state": "failed"}).json() == {"jobs": [], "next": None}
        assert len(client.get("/v1/jobs", params={"state": "succeeded"}).json()["jobs"]) == 5
        stale = client.get("/v1/jobs", params={"before": theirs})  # not ours: as if it did not exist
        assert stale.status_code == 404 and stale.json()["error"]["type"] == "cursor_not_found"
        assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_a_queued_job_says_how_many_are_ahead_of_it():
    client, _ = make_client(FakeJobBackend(step_s=0.01), max_running_jobs=1)  # a job takes over a second
    with client:
        ids = [client.post("/v1/jobs", json={"mode": "text2img", "params": {**PARAMS, "steps": 150}}).json()["id"]
               for _ in range(3)]
        wait_for(client, ids[0], {"running"})
        positions = [client.get(f"/v1/jobs/{job}").json()["position"] for job in ids]
        listed = {job["id"]: job["position"] for job in client.get("/v1/jobs").json()["jobs"]}
        for job in ids:
            client.delete(f"/v1/jobs/{job}")
        after = client.get(f"/v1/jobs/{ids[2]}").json()
    assert positions == [None, 0, 1] and listed == dict(zip(ids, positions))
    assert after["state"] == "cancelled" and after["position"] is None
