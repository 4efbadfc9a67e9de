"""Over real HTTP through Ray Serve's proxy."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

REQUEST = {"prompt": "a green triangle", "width": 128, "height": 64, "prior_steps": 3, "steps": 5}


@pytest.fixture(scope="module")
def client(served_app):
    url, _ = served_app
    with httpx.Client(base_url=url, timeout=120.0) as client:
        yield client


def _pixels(b64: str, fmt: str = "PNG") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)), formats=[fmt]).convert("RGB"))


def test_generate_decode_and_reproduce_from_the_returned_seed(client):
    first = client.post("/v1/text2img", json={**REQUEST, "num_images": 2})
    assert first.status_code == 200, first.text
    body = first.json()
    assert len(body["images"]) == 2 and len(body["seeds"]) == 2
    images = [_pixels(image) for image in body["images"]]
    assert images[0].shape == (64, 128, 3)
    assert not np.array_equal(images[0], images[1])
    again = client.post("/v1/text2img", json={**REQUEST, "seed": body["seeds"][1]}).json()
    assert again["seeds"] == [body["seeds"][1]]
    assert np.abs(_pixels(again["images"][0]).astype(int) - images[1].astype(int)).max() <= 1
    assert set(body["timings"]) == {"text_encoder", "prior", "denoiser", "movq"}


@pytest.mark.parametrize("fmt,pil_format,media_type", [("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp")])
def test_output_formats(client, fmt, pil_format, media_type):
    body = client.post("/v1/text2img", json={**REQUEST, "seed": 1, "output_format": fmt}).json()
    assert body["media_type"] == media_type
    assert _pixels(body["images"][0], pil_format).shape == (64, 128, 3)


def test_request_id_round_trip(client):
    response = client.post("/v1/text2img", json={**REQUEST, "seed": 2}, headers={"X-Request-ID": "e2e-42"})
    assert response.headers["x-request-id"] == "e2e-42" and response.json()["request_id"] == "e2e-42"


@pytest.mark.parametrize(
    "patch,field",
    [({"prompt": ""}, "prompt"), ({"width": 100}, "width"), ({"steps": 0}, "steps"), ({"steps": 1000}, "steps"),
     ({"num_images": 9}, "num_images"), ({"seed": "abc"}, "seed"), ({"colour": "red"}, "colour")],
)
def test_bad_input_is_422_naming_the_field(client, patch, field):
    response = client.post("/v1/text2img", json={**REQUEST, **patch})
    assert response.status_code == 422
    assert field in response.json()["error"]["message"]


def test_health_readiness_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["stages"] == {name: "ready" for name in ("TextEncoder", "Prior", "Denoiser", "MovqDecoder")}
    assert client.get("/docs").status_code == 200
    assert "/v1/text2img" in client.get("/openapi.json").json()["paths"]


def test_client_disconnect_stops_the_denoising_loop(served_app):
    import time

    from ray import serve

    url, _ = served_app
    denoiser = serve.get_deployment_handle("Denoiser", app_name="kandinsky")
    before = denoiser.loop_stats.remote().result(timeout_s=30)
    body = {**REQUEST, "width": 256, "height": 256, "steps": 150, "seed": 5}  # several seconds of work
    with pytest.raises(httpx.TimeoutException):
        # The client gives up long before 150 steps are done.
        httpx.post(f"{url}/v1/text2img", json=body, timeout=httpx.Timeout(1.5))
    deadline = time.monotonic() + 60
    while True:
        stats = denoiser.loop_stats.remote().result(timeout_s=30)
        if stats["active"] == 0 and stats["waiting"] == 0 and stats["steps"] > before["steps"]:
            break
        assert time.monotonic() < deadline, f"the loop kept running: {stats}"
        time.sleep(0.05)  # polling interval
    assert stats["steps"] - before["steps"] < 150, "the abandoned request ran to completion"
