"""Jobs, their events and cancellation, and the OpenAI / A1111 APIs, over HTTP through Ray Serve's proxy."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from ray import serve

from tests.conftest import APP_NAME

SMALL = {"prompt": "a green triangle", "width": 64, "height": 64, "prior_steps": 3, "steps": 5}
LONG = {"prompt": "a slow square", "width": 256, "height": 256, "prior_steps": 3, "steps": 150, "seed": 9}  # seconds of work


@pytest.fixture(scope="module")
def client(served_app):
    url, _ = served_app
    with httpx.Client(base_url=url, timeout=120.0) as client:
        yield client


@pytest.fixture(scope="module")
def denoiser(served_app):
    return serve.get_deployment_handle("Denoiser", app_name=APP_NAME)


def poll(fetch, condition, what, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if condition(value):
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last: {value}"
        time.sleep(0.02)  # polling interval


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data), formats=["PNG"]).convert("RGB")).astype(int)


def sse_events(response: httpx.Response) -> list[dict]:
    events, current = [], {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if current:
                events.append({"id": int(current["id"]), "event": current["event"], "data": json.loads(current["data"])})
            current = {}
            continue
        name, _, value = line.partition(": ")
        current[name] = value
    return events


def test_job_events_are_ordered_progress_moves_forward_and_the_end_matches_get(client):
    # About two seconds of denoising: polls every 0.2 s see it step by step.
    body = {"mode": "text2img", "params": {**SMALL, "width": 128, "height": 128, "steps": 60, "seed": 3},
            "preview_every": 10}
    # Warm the ingress's handles first: on a cold replica the first progress poll can
    # take longer than a whole small job.
    assert client.post("/v1/jobs", json={"mode": "text2img", "params": {**SMALL, "seed": 1}}).status_code == 202
    submitted = client.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    with client.stream("GET", job["urls"]["events"]) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    states = [e["data"]["state"] for e in events if e["event"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    progress = [e["data"]["progress"] for e in events if e["event"] != "preview"]
    assert progress == sorted(progress) and progress[-1] == 1.0
    denoise_steps = {e["data"]["step"] for e in events if e["event"] == "progress" and e["data"]["stage"] == "denoise"}
    assert len(denoise_steps - {0, 60}) >= 2, f"no per-step progress: {denoise_steps}"
    final = client.get(job["urls"]["self"]).json()
    assert events[-1]["data"] == final
    image = client.get(final["images"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert pixels(image.content).shape == (128, 128, 3)
    previews = [e["data"] for e in events if e["event"] == "preview"]
    print(f"\nevents: {len(events)}, denoise steps seen: {sorted(denoise_steps)}, previews: {len(previews)}")
    # The store keeps only the latest preview's image: a stream that reads an earlier preview
    # event after a later one exists gets it without its image.
    assert previews and previews[-1]["image"] is not None
    for preview in (p for p in previews if p["image"] is not None):
        shown = Image.open(io.BytesIO(base64.b64decode(preview["image"])), formats=["JPEG"])
        assert max(shown.size) <= 128


def test_cancelling_a_running_job_stops_its_denoising_within_one_step(client, denoiser):
    def steps_for(job_id):
        return denoiser.request_steps.remote(job_id).result(timeout_s=30)

    job = client.post("/v1/jobs", json={"mode": "text2img", "params": LONG}).json()
    poll(lambda: steps_for(job["id"]), lambda s: s is not None and s["done"] >= 3, "the job to be denoising")
    before_delete = steps_for(job["id"])["done"]
    started = time.monotonic()
    response = client.delete(job["urls"]["cancel"])
    answered_s = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"
    at_answer = steps_for(job["id"])["done"]
    stopped = poll(lambda: steps_for(job["id"]), lambda s: s["left"], "the request to leave the loop")
    left_s = time.monotonic() - started
    poll(lambda: denoiser.loop_stats.remote().result(timeout_s=30), lambda s: s["active"] == 0 and s["waiting"] == 0,
         "the loop to be idle")
    # The counter of steps executed for the job stops: at most the step in flight when
    # the cancel was answered completes.
    assert stopped["done"] - at_answer <= 1, (before_delete, at_answer, stopped)
    assert stopped["done"] < stopped["total"] == 150
    print(f"\ncancel: steps before DELETE {before_delete}, at its answer {at_answer}, final {stopped['done']}; "
          f"DELETE answered in {answered_s:.3f} s, request left the loop {left_s:.3f} s after DELETE")
    assert client.get(job["urls"]["self"]).json()["state"] == "cancelled"
    again = client.delete(job["urls"]["cancel"])
    assert again.status_code == 409 and again.json()["error"]["type"] == "job_finished"
    assert client.delete("/v1/jobs/no-such-job").status_code == 404
    assert client.get("/v1/jobs/no-such-job").status_code == 404
    # The slot is reused: the next job runs to the end.
    follow = client.post("/v1/jobs", json={"mode": "text2img", "params": {**SMALL, "seed": 1}}).json()
    final = poll(lambda: client.get(follow["urls"]["self"]).json(), lambda v: v["state"] not in ("queued", "running"),
                 "the next job")
    assert final["state"] == "succeeded"
    assert steps_for(follow["id"]) == {"done": 5, "total": 5, "left": True}


def test_a_client_that_disconnects_from_a1111_cancels_its_generation(served_app, denoiser):
    url, _ = served_app
    before = denoiser.loop_stats.remote().result(timeout_s=30)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/sdapi/v1/txt2img", json={**LONG, "seed": 12}, timeout=httpx.Timeout(1.5))
    stats = poll(lambda: denoiser.loop_stats.remote().result(timeout_s=30),
                 lambda s: s["active"] == 0 and s["waiting"] == 0 and s["steps"] > before["steps"], "the loop to stop")
    assert stats["steps"] - before["steps"] < 150, "the abandoned request ran to completion"


def test_openai_client_and_a1111_payloads_draw_the_native_images(served_app, client):
    from openai import OpenAI

    url, _ = served_app
    native = client.post("/v1/text2img", json={**SMALL, "seed": 42, "num_images": 2}).json()
    expected = [pixels(base64.b64decode(image)) for image in native["images"]]
    openai = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120.0)
    extra = {"seed": 42, "steps": SMALL["steps"], "prior_steps": SMALL["prior_steps"]}
    inline = openai.images.generate(prompt=SMALL["prompt"], n=2, size="64x64", response_format="b64_json", extra_body=extra)
    linked = openai.images.generate(prompt=SMALL["prompt"], n=2, size="64x64", response_format="url", extra_body=extra)
    a1111 = client.post("/sdapi/v1/txt2img", json={
        "prompt": SMALL["prompt"], "steps": SMALL["steps"], "prior_steps": SMALL["prior_steps"], "cfg_scale": 4.0,
        "width": 64, "height": 64, "seed": 42, "batch_size": 1, "n_iter": 2, "sampler_name": "DDPM", "restore_faces": False,
    })
    assert a1111.status_code == 200, a1111.text
    assert json.loads(a1111.json()["info"])["unsupported_fields"] == ["restore_faces"]
    drawn = {
        "openai b64_json": [pixels(base64.b64decode(d.b64_json)) for d in inline.data],
        "openai url": [pixels(client.get(d.url).content) for d in linked.data],  # relative to the service
        "a1111": [pixels(base64.b64decode(image)) for image in a1111.json()["images"]],
    }
    for source, images in drawn.items():
        assert len(images) == 2, source
        for ours, theirs in zip(images, expected):
            assert np.abs(ours - theirs).max() <= 1, source


def test_a1111_img2img_draws_the_native_image(client):
    from tests.reference import solid_image

    buffer = io.BytesIO()
    Image.fromarray(solid_image(64, 64, 1)).save(buffer, format="PNG")
    picture = base64.b64encode(buffer.getvalue()).decode()
    common = {"prompt": "a cat", "steps": 6, "prior_steps": 2, "seed": 7}
    native = client.post("/v1/img2img", json={**common, "image": picture, "strength": 0.5})
    a1111 = client.post("/sdapi/v1/img2img", json={**common, "init_images": [f"data:image/png;base64,{picture}"],
                                                   "denoising_strength": 0.5})
    assert native.status_code == 200 and a1111.status_code == 200, (native.text, a1111.text)
    ours, theirs = (pixels(base64.b64decode(r.json()["images"][0])) for r in (a1111, native))
    assert np.abs(ours - theirs).max() <= 1


def test_cli_generate_writes_the_native_image_with_a_progress_bar(served_app, client, tmp_path, capsys):
    from serve.cli import main

    url, _ = served_app
    out = tmp_path / "out.png"
    code = main(["generate", SMALL["prompt"], "-o", str(out), "--url", url, "--width", "64", "--height", "64",
                 "--steps", str(SMALL["steps"]), "--prior-steps", str(SMALL["prior_steps"]), "--seed", "42", "--progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "100.0% succeeded" in captured.err and f"{out}  (seed 42)" in captured.out
    native = client.post("/v1/text2img", json={**SMALL, "seed": 42}).json()
    assert np.abs(pixels(out.read_bytes()) - pixels(base64.b64decode(native["images"][0]))).max() <= 1


def test_a_sweep_job_gives_the_cells_and_grid_of_the_synchronous_sweep(client):
    body = {"base": {"prompt": "a blue square", "width": 64, "height": 64, "prior_steps": 2, "steps": 2, "seed": 4},
            "axes": [{"field": "guidance_scale", "values": [1.0, 6.0]}]}
    submitted = client.post("/v1/jobs", json={"mode": "sweep", "params": body})
    assert submitted.status_code == 202, submitted.text
    done = poll(lambda: client.get(submitted.json()["urls"]["self"]).json(),
                lambda view: view["state"] in ("succeeded", "failed", "cancelled"), "the sweep job")
    assert done["state"] == "succeeded", done["error"]
    alone = client.post("/v1/sweep", json=body).json()
    for cell, expected in zip(done["sweep"]["cells"], alone["cells"], strict=True):
        assert (cell["values"], cell["seeds"]) == (expected["values"], expected["seeds"])
        (image,) = cell["images"]
        difference = pixels(client.get(image["url"]).content) - pixels(base64.b64decode(expected["images"][0]))
        assert np.abs(difference).max() <= 1, "same seeds, same images (up to batch-size rounding)"
    grid = pixels(client.get(done["sweep"]["grid"]["url"]).content)
    assert grid.shape == (alone["grid_height"], alone["grid_width"], 3)


def _ingress_replicas() -> set[str]:
    """Names of the Ingress replica actors ("SERVE_REPLICA::<app>#Ingress#<id>")."""
    import ray

    return {
        actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve" and f"{APP_NAME}#Ingress#" in actor["name"]
    }


def test_job_state_survives_killing_the_ingress_replica(client):
    import ray

    job = client.post("/v1/jobs", json={"mode": "text2img", "params": {**SMALL, "seed": 21}}).json()
    done = poll(lambda: client.get(job["urls"]["self"]).json(), lambda v: v["state"] == "succeeded", "the job")
    image = client.get(done["images"][0]["url"]).content
    (replica,) = _ingress_replicas()
    started = time.monotonic()
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)

    def after_restart():
        try:
            response = client.get(job["urls"]["self"], timeout=5.0)
        except httpx.HTTPError as error:
            return repr(error)
        return response.json() if response.status_code == 200 else response.status_code

    replaced = poll(_ingress_replicas, lambda names: names and replica not in names, "Serve to start a new replica", 180.0)
    again = poll(after_restart, lambda v: isinstance(v, dict), "the new replica to answer", 180.0)
    print(f"\ningress replica {replica} killed; replaced by {sorted(replaced)}; job answered again after "
          f"{time.monotonic() - started:.1f} s")
    assert again == done
    assert client.get(done["images"][0]["url"]).content == image
    assert client.delete(job["urls"]["cancel"]).status_code == 409
    poll(lambda: client.get("/readyz").status_code, lambda status: status == 200, "the service to be ready", 120.0)
