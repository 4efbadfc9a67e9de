"""Metrics, request ids and logs of the deployed graph (shared Ray instance)."""

from __future__ import annotations

import glob
import os
import time

import httpx
import numpy as np
import pytest
import ray
from ray import serve

from deployments.messages import DenoiseParams, ImageEmbeddings
from tests.conftest import APP_NAME
from tests.promtext import total

P = "ray_kandinsky_serve_"
STAGES = ("text_encoder", "prior", "denoiser", "movq")


@pytest.fixture(scope="module")
def client(served_app):
    url, _ = served_app
    with httpx.Client(base_url=url, timeout=120.0) as client:
        yield client


def _poll(client, condition, what, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        text = client.get("/metrics").text
        if condition(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; /metrics had:\n{text[:3000]}")
        time.sleep(0.2)  # polling interval: Ray exports metrics every 500 ms in tests


def _snapshot(text, steps, prior_steps):
    return {
        "http_ok": total(text, P + "http_requests_total", route="/v1/text2img", status="200"),
        "latency_count": total(text, P + "request_duration_seconds_count", mode="text2img", size="64x64"),
        **{f"requests:{s}": total(text, P + "stage_requests_total", stage=s) for s in STAGES},
        **{f"images:{s}": total(text, P + "stage_images_total", stage=s) for s in ("prior", "denoiser", "movq")},
        "text_batch_items": total(text, P + "stage_batch_items_total", stage="text_encoder"),
        "movq_batch_items": total(text, P + "stage_batch_items_total", stage="movq"),
        "denoiser_image_steps": total(text, P + "step_images_total", stage="denoiser"),
        "prior_image_steps": total(text, P + "step_images_total", stage="prior"),
        "latency_bucket_inf": total(text, P + "request_duration_seconds_bucket", mode="text2img", size="64x64", le="+Inf"),
    }


def _settled(client, snapshot, timeout_s=30.0):
    """A snapshot once earlier tests' metrics have all been exported (two reads a full
    export interval apart agree)."""
    deadline = time.monotonic() + timeout_s
    previous = snapshot(client.get("/metrics").text)
    while True:
        time.sleep(1.0)  # two Ray export intervals in tests
        current = snapshot(client.get("/metrics").text)
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current


def test_counters_match_the_requests_served(client):
    requests, images, steps, prior_steps = 3, 2, 4, 3
    body = {"prompt": "a blue star", "width": 64, "height": 64, "num_images": images, "steps": steps, "prior_steps": prior_steps}
    before = _settled(client, lambda text: _snapshot(text, steps, prior_steps))
    for seed in range(requests):
        assert client.post("/v1/text2img", json={**body, "seed": seed}).status_code == 200
    expected = {
        "http_ok": requests,
        "latency_count": requests,
        **{f"requests:{s}": requests for s in STAGES},
        **{f"images:{s}": requests * images for s in ("prior", "denoiser", "movq")},
        "text_batch_items": requests,  # batch sizes sum to the calls made: one per request
        "movq_batch_items": requests,
        "denoiser_image_steps": requests * images * steps,  # every image stepped exactly `steps` times
        "prior_image_steps": requests * images * prior_steps,
        "latency_bucket_inf": requests,  # histogram counts agree with the counters
    }

    def deltas(text):
        now = _snapshot(text, steps, prior_steps)
        return {key: now[key] - before[key] for key in expected}

    try:
        text = _poll(client, lambda t: deltas(t) == expected, "counters to reach the expected deltas", timeout_s=30)
    except AssertionError:
        assert deltas(client.get("/metrics").text) == expected  # shows which counter is off
    assert deltas(text) == expected


def test_model_load_time_is_exported_for_every_stage(client):
    # Gauges are re-set at every health check (10 s) and, with the tests' fast export
    # interval, expire within ~2 s: each stage's value shows up in some scrape.
    seen: set[str] = set()

    def all_seen(text):
        seen.update(s for s in STAGES if total(text, P + "model_load_seconds", stage=s) > 0)
        return seen == set(STAGES)

    _poll(client, all_seen, "every stage's model load time")


def test_rejected_request_counts_a_rejection_and_no_stage_call(client):
    def counts(text):
        return {
            "rejected": total(text, P + "rejected_requests_total", reason="validation"),
            **{stage: total(text, P + "stage_requests_total", stage=stage) for stage in STAGES},
        }

    before = _settled(client, counts)
    assert client.post("/v1/text2img", json={"prompt": "x", "width": 100}).status_code == 422
    expected = {**before, "rejected": before["rejected"] + 1}
    _poll(client, lambda t: counts(t)["rejected"] == expected["rejected"], "the validation rejection to be counted")
    assert _settled(client, counts) == expected  # and no stage saw a call


def test_stage_failure_counts_an_error_of_its_type(client):
    before = client.get("/metrics").text
    denoiser = serve.get_deployment_handle("Denoiser", app_name=APP_NAME)
    wrong_width = ImageEmbeddings(np.zeros((1, 7), "float32"), np.zeros((1, 7), "float32"), [0])  # the U-Net expects 32
    with pytest.raises(Exception, match="RuntimeError|shape"):
        denoiser.generate.remote(wrong_width, DenoiseParams(64, 64, 2, 4.0, "broken")).result(timeout_s=60)
    errors = P + "stage_errors_total"
    _poll(
        client,
        lambda t: total(t, errors, stage="denoiser", error_type="RuntimeError") == total(before, errors, stage="denoiser", error_type="RuntimeError") + 1,
        "the denoiser's RuntimeError to be counted",
    )


def test_request_id_reaches_the_response_and_every_stage_log(client):
    request_id = f"obs-{time.time_ns()}"
    response = client.post("/v1/text2img", json={"prompt": "a dot", "width": 64, "height": 64, "steps": 2, "prior_steps": 2},
                           headers={"X-Request-ID": request_id})
    assert response.status_code == 200
    assert response.json()["request_id"] == request_id and response.headers["x-request-id"] == request_id
    # This test session's own Ray logs (session_latest may be another Ray instance on the machine).
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve", "*.log")
    deadline = time.monotonic() + 30
    while True:
        lines = [line for path in glob.glob(logs) for line in open(path, errors="replace")
                 if request_id in line]
        stages = {stage for stage in STAGES if any(f"stage {stage} done" in line for line in lines)}
        if stages == set(STAGES):
            break
        assert time.monotonic() < deadline, f"request id missing from stage logs: found {stages}"
        time.sleep(0.2)  # polling interval: replica logs are flushed asynchronously
    assert all("batch_size=" in line and "compute_ms=" in line for line in lines if " done:" in line)


def test_every_metric_on_the_dashboard_and_in_the_alerts_is_exported(client):
    from deployments.metrics import GPU_ALLOCATED, GPU_BUDGET, GPU_PEAK, GPU_RESERVED
    from tests.dashboards import family, referenced_metrics
    from tests.promtext import family_names

    gpu_only = {spec.exported_name for spec in (GPU_ALLOCATED, GPU_RESERVED, GPU_PEAK, GPU_BUDGET)}  # CUDA replicas only
    wanted = {family(name) for name in referenced_metrics()} - gpu_only
    # Make every referenced series exist whatever ran before: a success, a rejection, a stage error.
    assert client.post("/v1/text2img", json={"prompt": "a dot", "width": 64, "height": 64, "steps": 2, "prior_steps": 2}).status_code == 200
    assert client.post("/v1/text2img", json={"prompt": "x", "width": 100}).status_code == 422
    denoiser = serve.get_deployment_handle("Denoiser", app_name=APP_NAME)
    with pytest.raises(Exception):
        bad = ImageEmbeddings(np.zeros((1, 7), "float32"), np.zeros((1, 7), "float32"), [0])
        denoiser.generate.remote(bad, DenoiseParams(64, 64, 2, 4.0)).result(timeout_s=60)
    text = _poll(client, lambda t: wanted <= family_names(t), "every referenced metric to be exported")
    assert wanted <= family_names(text)
