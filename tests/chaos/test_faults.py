"""Faults under load on a live application (the `guarded_app` fixture): replicas killed, health
checks failing, deadlines passing, clients leaving. Every request must be accounted for."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import ray
from ray import serve

from serve.tools.loadtest import Arrival, LoadTest, RequestMix, Scenario
from tests.conftest import APP_NAME, GUARDED_APP

BODY = {"prompt": "a red circle", "width": 64, "height": 64, "prior_steps": 3, "steps": 6}
TIMEOUT_S = 30.0  # the guarded app's admission.request_timeout_s


def replica_actors(deployment: str) -> list[str]:
    """Names of the deployment's live replica actors (in Ray's "serve" namespace)."""
    prefix = f"SERVE_REPLICA::{GUARDED_APP}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    return sorted(name for name in names if name.startswith(prefix))


def running(deployment: str) -> int:
    status = serve.status().applications[GUARDED_APP].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)  # polling interval


def scenario(url: str, key: str, rate: float, duration_s: float) -> Scenario:
    return Scenario(
        target=url, mix=[RequestMix(body=BODY, headers={"Authorization": f"Bearer {key}"})],
        arrival=Arrival(process="constant", rates=[rate]), duration_s=duration_s, timeout_s=TIMEOUT_S + 20,
        scrape_metrics=False,
    )


@pytest.mark.parametrize("deployment", ["Denoiser", "MovqDecoder"])
def test_killing_a_replica_under_load_loses_no_request(guarded_app, deployment):
    url, keys = guarded_app
    # Well within capacity, so that any error is the fault's, not admission control's.
    load = LoadTest(scenario(url, keys["load"], rate=1.5, duration_s=10.0), progress=False)
    killed_at: list[float] = []

    async def main():
        task = asyncio.create_task(load.run())
        # Fault injection mid-load: once some requests went through, and while one is in
        # flight (it may be on the replica killed), kill a replica.
        while sum(r.outcome == "success" for r in load.records) < 2 or load._inflight == 0:
            assert not task.done()
            await asyncio.sleep(0.05)  # polling interval
        actor = replica_actors(deployment)[0]
        ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)
        killed_at.append(time.monotonic())
        return await task

    result = asyncio.run(main())
    step = result.steps[0]
    explicit = {kind: n for kind, n in step.failed.items() if kind.startswith("http_5")}
    print(f"\n{deployment} killed: sent {step.sent}, succeeded {step.succeeded}, failed {step.failed}, lost {step.lost}")
    assert step.lost == 0 and step.succeeded >= step.sent // 2
    assert step.succeeded + sum(explicit.values()) == step.sent, step.failed  # nothing but explicit errors
    assert set(explicit) <= {"http_503", "http_504"}
    assert max(r.latency_s for r in result.records) <= TIMEOUT_S + 5
    wait_until(lambda: running(deployment) == 2 and len(replica_actors(deployment)) == 2, 60, f"{deployment} to recover")
    print(f"{deployment} recovered {time.monotonic() - killed_at[0]:.1f} s after the kill; "
          f"{retried(load)} request(s) retried after the replica died under them")
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/text2img", json=BODY, headers={"Authorization": f"Bearer {keys['normal']}"}).status_code == 200


def retried(load: LoadTest) -> int:
    """Requests of this load test that the ingress re-issued after a replica died (from its logs)."""
    import glob
    import os

    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve", "*.log")
    ids = {record.id for record in load.records}
    lines = [line for path in glob.glob(logs) for line in open(path, errors="replace") if "died" in line and "retrying" in line]
    return sum(any(request_id in line for line in lines) for request_id in ids)


def test_a_replica_failing_its_health_check_is_replaced(guarded_app):
    [before] = replica_actors("TextEncoder")
    handle = serve.get_deployment_handle("TextEncoder", app_name=GUARDED_APP)
    handle.inject_fault.remote("health").result(timeout_s=30)
    wait_until(lambda: replica_actors("TextEncoder") not in ([], [before]) and running("TextEncoder") == 1,
               60, "a new TextEncoder replica")
    url, keys = guarded_app
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/text2img", json=BODY, headers={"Authorization": f"Bearer {keys['normal']}"}).status_code == 200


# Deadlines and disconnects run on the shared app, whose Denoiser has one replica: the
# executed-steps counter of a request lives in the replica that ran it.
FULL = 2 * 150  # image-steps of the long requests below


def _denoiser():
    return serve.get_deployment_handle("Denoiser", app_name=APP_NAME)


def _executed(request_id: str) -> int:
    """Image-steps the denoiser ran for the request (kept for recently finished requests too)."""
    found = _denoiser().request_steps.remote(request_id).result(timeout_s=30)
    return 0 if found is None else found["done"]


def test_a_request_past_its_deadline_gets_504_and_stops_within_a_step(served_app):
    url, _ = served_app
    body = {**BODY, "width": 256, "height": 256, "steps": 150, "num_images": 2}  # seconds of work, even alone
    headers = {"X-Request-ID": f"deadline-{time.time_ns()}", "X-Request-Timeout": "0.8"}
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/text2img", json=body, headers=headers, timeout=30)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "timeout" and time.monotonic() - started < 5
    at_response = _executed(headers["X-Request-ID"])
    # The loop is stepping other work or idle; this request's count must not move on.
    wait_until(lambda: _denoiser().loop_stats.remote().result(timeout_s=30)["active"] == 0, 30, "the denoiser to drain")
    later = _executed(headers["X-Request-ID"])
    print(f"\ndeadline: {at_response} image-steps when the 504 was sent, {later} after; {FULL} needed to finish")
    assert later - at_response <= 2  # one step boundary, for each of the request's 2 images
    assert later < FULL


def test_a_client_that_leaves_stops_its_work_within_a_step(served_app):
    url, _ = served_app
    body = {**BODY, "width": 256, "height": 256, "steps": 150, "num_images": 2}
    request_id = f"leaver-{time.time_ns()}"
    headers = {"X-Request-ID": request_id}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/text2img", json=body, headers=headers, timeout=httpx.Timeout(0.8))
    left_at = _executed(request_id)
    wait_until(lambda: _denoiser().loop_stats.remote().result(timeout_s=30)["active"] == 0, 30, "the denoiser to drain")
    later = _executed(request_id)
    print(f"\ndisconnect: {left_at} image-steps when the client left, {later} after; {FULL} needed to finish")
    assert later - left_at <= 2 and later < FULL
