"""Over real HTTP through Ray Serve's proxy."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.registry import MODES, STAGE_NAMES

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
    assert ready.status_code == 200 and ready.json() == {"ready": True}, ready.text
    status = client.get("/v1/status")
    assert status.status_code == 200 and status.json()["stages"] == {name: "ready" for name in STAGE_NAMES}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {f"/v1/{mode}" for mode in MODES} | {"/v1/embeddings"} <= set(paths)


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


def test_the_ingress_reports_what_it_holds(served_app):
    """What `kandinsky-serve run` polls while it drains (the shared app itself is not drained:
    that is tests/e2e/test_graceful_stop.py, on a service of its own)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    url, ingress = served_app
    idle = ingress.in_flight.remote().result(timeout_s=30)
    assert idle["draining"] is False and idle["requests"] == 0 and idle["replica"]
    body = {**REQUEST, "width": 128, "height": 128, "steps": 100, "seed": 6}  # a few seconds of work
    with ThreadPoolExecutor(1) as pool:
        response = pool.submit(httpx.post, f"{url}/v1/text2img", json=body, timeout=120)
        deadline = time.monotonic() + 60
        while ingress.in_flight.remote().result(timeout_s=30)["requests"] != 1:
            assert not response.done(), "finished before the ingress was seen holding it"
            assert time.monotonic() < deadline, "the ingress never reported the request"
            time.sleep(0.01)  # polling interval
        assert response.result().status_code == 200
    assert ingress.in_flight.remote().result(timeout_s=30)["requests"] == 0


def _b64_png(pixels) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_every_mode_over_http(client):
    from tests.reference import box_mask, solid_image

    picture, small = _b64_png(solid_image(64, 64, 1)), {"prior_steps": 2, "steps": 3, "seed": 5}
    bodies = {
        "img2img": {"image": picture, "prompt": "a cat", "strength": 0.6},
        "inpaint": {"image": picture, "mask": _b64_png(box_mask(64, 64)), "prompt": "a cat", "mask_blur": 2.0},
        "mix": {"items": [{"text": "a cat"}, {"image": picture}], "weights": [0.3, 0.7]},
        "variations": {"image": picture, "strength": 0.6},
        "controlnet": {"hint": _b64_png(solid_image(64, 64, 2)), "prompt": "a cat", "image": picture, "strength": 0.7},
    }
    for mode, body in bodies.items():
        response = client.post(f"/v1/{mode}", json={**body, **small})
        assert response.status_code == 200, (mode, response.text)
        data = response.json()
        # Image modes default to the input image's size; mixing to 512 x 512 like text-to-image.
        assert (data["width"], data["height"]) == ((512, 512) if mode == "mix" else (64, 64))
        image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
        assert image.size == (data["width"], data["height"])


def test_embeddings_rank_the_image_and_its_text(client):
    from tests.reference import solid_image

    response = client.post("/v1/embeddings", json={"texts": ["a cat", "a dog"], "images": [_b64_png(solid_image(64, 64, 1))]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["text_embeddings"]) == 2 and len(body["image_embeddings"]) == 1
    a, b = np.array(body["text_embeddings"]), np.array(body["image_embeddings"])
    cosine = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    assert np.allclose(cosine, body["similarity"], atol=1e-5)
    assert client.post("/v1/embeddings", json={"texts": [], "images": []}).status_code == 422


def test_a_prompt_past_the_encoders_window_is_cut_and_the_response_says_so(client):
    long_prompt = " ".join(["a red circle on a blue square"] * 20)  # well past 77 tokens
    body = client.post("/v1/text2img", json={**REQUEST, "prompt": long_prompt, "seed": 3}).json()
    assert any("reads only the first 77" in warning for warning in body["warnings"]), body.get("warnings")
    short = client.post("/v1/text2img", json={**REQUEST, "seed": 3}).json()
    assert short["warnings"] == []


def test_a_sweep_equals_its_cells_sent_alone_and_draws_their_grid(client):
    """Cells batched together give the images their requests give alone (results never depend
    on the batch), and a grid sized by its axes."""
    from serve.http.grid import GridAxis, grid_layout

    base = {"prompt": "a blue square", "width": 64, "height": 64, "prior_steps": 2, "steps": 2}
    axes = [{"field": "seed", "values": [5, 6]}, {"field": "guidance_scale", "values": [1.0, 6.0]}]
    response = client.post("/v1/sweep", json={"base": base, "axes": axes})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [cell["values"] for cell in body["cells"]] == [
        {"seed": 5, "guidance_scale": 1.0}, {"seed": 6, "guidance_scale": 1.0},
        {"seed": 5, "guidance_scale": 6.0}, {"seed": 6, "guidance_scale": 6.0}]
    for cell in body["cells"]:
        alone = client.post("/v1/text2img", json={**base, **cell["values"]}).json()
        assert alone["seeds"] == cell["seeds"]
        assert np.abs(_pixels(alone["images"][0]).astype(int) - _pixels(cell["images"][0]).astype(int)).max() <= 1
    layout = grid_layout((64, 64), [GridAxis("seed", ("5", "6")), GridAxis("guidance_scale", ("1.0", "6.0"))])
    assert _pixels(body["grid"]).shape == (layout.size[1], layout.size[0], 3)


def test_hires_over_http_equals_the_graph_in_process(client, tiny_checkpoint):
    from serve.graph.local import LocalCalls
    from serve.http.schemas import request_models
    from serve.settings import ApiLimits

    body = {"prompt": "a blue square", "width": 64, "height": 64, "prior_steps": 2, "steps": 3, "seed": 7,
            "num_images": 2, "hires": {"scale": 2, "strength": 0.7, "steps": 3}}
    response = client.post("/v1/text2img", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["width"], result["height"]) == (128, 128)
    assert {"denoiser", "movq_upscale", "denoiser_hires", "movq"} <= set(result["timings"])
    spec = request_models(ApiLimits())["text2img"].model_validate(body).to_spec()
    expected = LocalCalls(tiny_checkpoint).generate(spec)
    for served, local in zip((_pixels(image) for image in result["images"]), expected, strict=True):
        assert served.shape == (128, 128, 3)
        # The replicas' float rounding (other thread counts, batches) can move a first-pass
        # pixel by 1/255; the second pass re-encodes that image, so a few pixels move by 2.
        difference = np.abs(served.astype(int) - local.astype(int))
        assert difference.max() <= 2 and (difference > 1).mean() < 0.001
