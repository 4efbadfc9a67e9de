"""Two model families in one service: requests pick Kandinsky 2.1 or 2.2 by ``model`` over
HTTP, each answered by its own family's deployments, 2.1 at parity with diffusers' 2.1 pipelines."""

from __future__ import annotations

import base64
import io
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import FINE_TUNED_PRIOR
from tests.promtext import total
from tests.reference import MAX_PIXEL_DIFF, box_mask, max_diff, reference_images, reference_images_21, solid_image, spec

PICTURE = solid_image(64, 64, seed=1)
STAGE_LABEL = re.compile(r'stage="\w+"')


@pytest.fixture(scope="module")
def client(served_app):
    url, _ = served_app
    with httpx.Client(base_url=url, timeout=120.0) as client:
        yield client


def _b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)), formats=["PNG"]).convert("RGB"))


def test_the_models_are_listed_and_their_stages_load(client):
    deadline = time.monotonic() + 60
    while True:
        models = {model["id"]: model for model in client.get("/v1/models").json()["data"]}
        if all(model["loaded"] for model in models.values()):
            break
        assert time.monotonic() < deadline, f"not loaded: {models}"
        time.sleep(0.5)  # polling interval: readiness is cached for about a second
    assert set(models) == {"kandinsky-2-2", "kandinsky-2-1", FINE_TUNED_PRIOR}
    assert models[FINE_TUNED_PRIOR]["family"] == "2.2"
    assert models["kandinsky-2-1"]["modes"] == ["text2img", "img2img", "inpaint", "mix"]


@pytest.mark.parametrize("name", ["text2img", "inpaint"])
def test_a_21_request_is_served_at_parity_with_diffusers(client, tiny_checkpoint_21, name):
    extra = {"image": _b64(PICTURE), "mask": _b64(box_mask(64, 64))} if name == "inpaint" else {}
    body = {"prompt": "a red circle", "negative_prompt": "blue", "width": 64, "height": 64, "seed": 7, "num_images": 2,
            "prior_steps": 4, "steps": 5, "scheduler": "ddim", "model": "kandinsky-2-1", **extra}
    response = client.post(f"/v1/{name}", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert "denoiser_21" in result["timings"] or "denoiser_inpaint_21" in result["timings"], result["timings"]
    fields = dict(mode=name, negative_prompt="blue", seeds=(7, 8), steps=5, scheduler="ddim")
    if name == "inpaint":
        fields.update(image=PICTURE, mask=box_mask(64, 64))
    reference = reference_images_21(tiny_checkpoint_21, spec(**fields))
    for mine, theirs in zip([_pixels(image) for image in result["images"]], reference, strict=True):
        assert max_diff(mine, theirs) <= MAX_PIXEL_DIFF


def test_the_two_families_draw_different_images_for_one_request(client):
    body = {"prompt": "a red circle", "width": 64, "height": 64, "seed": 3, "prior_steps": 3, "steps": 3}
    images = [client.post("/v1/text2img", json={**body, "model": model}).json()["images"][0]
              for model in ("kandinsky-2-2", "kandinsky-2-1")]
    assert max_diff(_pixels(images[0]), _pixels(images[1])) > 10


def test_a_mode_2_1_lacks_and_an_unknown_model_are_refused(client):
    response = client.post("/v1/variations", json={"image": _b64(PICTURE), "model": "kandinsky-2-1"})
    assert response.status_code == 422 and response.json()["error"]["type"] == "mode_not_supported"
    response = client.post("/v1/text2img", json={"prompt": "x", "model": "kandinsky-9"})
    assert response.status_code == 404 and "kandinsky-2-1" in response.json()["error"]["message"]


def test_a_21_job_runs_with_progress_and_says_its_model(client):
    params = {"prompt": "a cat", "width": 64, "height": 64, "seed": 1, "prior_steps": 3, "steps": 6,
              "model": "kandinsky-2-1"}
    job = client.post("/v1/jobs", json={"mode": "text2img", "params": params, "preview_every": 2}).json()
    assert job["model"] == "kandinsky-2-1"
    deadline = time.monotonic() + 120
    while (view := client.get(f"/v1/jobs/{job['id']}").json())["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.1)  # polling interval
    assert view["state"] == "succeeded", view
    assert view["model"] == "kandinsky-2-1" and view["progress"] == 1.0


def test_each_familys_stages_have_metrics_of_their_own(client):
    client.post("/v1/text2img", json={"prompt": "a dot", "width": 64, "height": 64, "prior_steps": 2, "steps": 2,
                                      "model": "kandinsky-2-1"})
    deadline = time.monotonic() + 30
    while True:
        text = client.get("/metrics").text
        by_model = total(text, "ray_kandinsky_serve_request_duration_seconds_count", model="kandinsky-2-1")
        if 'stage="denoiser_21"' in text and 'stage="decoder_text_encoder_21"' in text and by_model >= 1:
            break
        labels = sorted(set(re.findall(STAGE_LABEL, text)))
        assert time.monotonic() < deadline, f"no metrics labelled with the 2.1 stages: {labels}"
        time.sleep(0.2)  # polling interval: Ray exports metrics every 500 ms in tests
    assert 'kandinsky_serve_stage_requests_total{' in text and 'stage="denoiser"' in text


def test_the_openai_sdk_and_a1111_clients_pick_the_21_model(served_app, client):
    from openai import OpenAI

    url, _ = served_app
    sdk = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    listed = [model.id for model in sdk.models.list()]
    assert listed == ["kandinsky-2-2", "kandinsky-2-1", FINE_TUNED_PRIOR]
    common = {"prompt": "a red circle", "size": "64x64", "response_format": "b64_json"}
    extra = {"seed": 9, "steps": 3, "prior_steps": 3}
    images = [sdk.images.generate(model=model, **common, extra_body=extra).data[0].b64_json
              for model in ("kandinsky-2-1", "dall-e-3")]
    native = client.post("/v1/text2img", json={"prompt": "a red circle", "width": 64, "height": 64, **extra,
                                               "model": "kandinsky-2-1"}).json()["images"][0]
    assert max_diff(_pixels(images[0]), _pixels(native)) == 0  # the 2.1 model, as natively
    assert max_diff(_pixels(images[1]), _pixels(images[0])) > 10  # OpenAI's own name: the default model
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "width": 64, "height": 64, "seed": 9,
                                                   "steps": 3, "prior_steps": 3, "sampler_name": "DDPM",
                                                   "override_settings": {"sd_model_checkpoint": "kandinsky-2-1"}}).json()
    assert max_diff(_pixels(a1111["images"][0]), _pixels(native)) == 0
    assert "Model: kandinsky-2-1" in a1111["info"]


def test_a_fine_tuned_prior_loads_once_per_replica_and_matches_diffusers(client, tiny_checkpoint, tiny_finetuned_prior):
    body = {"prompt": "a red circle", "width": 64, "height": 64, "seed": 5, "prior_steps": 4, "steps": 4,
            "model": FINE_TUNED_PRIOR}
    first = client.post("/v1/text2img", json=body)
    assert first.status_code == 200, first.text
    reference = reference_images((tiny_finetuned_prior, *tiny_checkpoint[1:]), spec(seeds=(5,), steps=4))
    assert max_diff(_pixels(first.json()["images"][0]), reference[0]) <= MAX_PIXEL_DIFF
    assert client.post("/v1/text2img", json={**body, "seed": 6}).status_code == 200  # hot: no second load
    switches = f'kandinsky_serve_model_switch_seconds_count{{model="{FINE_TUNED_PRIOR}"'
    deadline = time.monotonic() + 30
    while (loads := total(client.get("/metrics").text, "ray_kandinsky_serve_model_switch_seconds_count",
                          model=FINE_TUNED_PRIOR)) < 1:
        assert time.monotonic() < deadline, f"no {switches} in /metrics"
        time.sleep(0.2)  # polling interval: Ray exports metrics every 500 ms in tests
    # Read again for a few export intervals: a second load would show up within them.
    settle = time.monotonic() + 2.0
    while time.monotonic() < settle:
        assert loads == 1, f"{switches}: {loads} loads for two requests on one replica"
        time.sleep(0.2)  # polling interval
        loads = total(client.get("/metrics").text, "ray_kandinsky_serve_model_switch_seconds_count", model=FINE_TUNED_PRIOR)


def test_base_and_fine_tuned_priors_in_flight_together_each_draw_their_own(client):
    from concurrent.futures import ThreadPoolExecutor

    body = {"prompt": "a blue square", "width": 64, "height": 64, "seed": 11, "prior_steps": 25, "steps": 2}
    models = ["kandinsky-2-2", FINE_TUNED_PRIOR] * 3
    alone = {model: client.post("/v1/text2img", json={**body, "model": model}).json()["images"][0]
             for model in set(models)}
    with ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda model: client.post("/v1/text2img", json={**body, "model": model}).json(), models))
    for model, result in zip(models, together):
        assert max_diff(_pixels(result["images"][0]), _pixels(alone[model])) <= MAX_PIXEL_DIFF, model
    assert max_diff(_pixels(alone["kandinsky-2-2"]), _pixels(alone[FINE_TUNED_PRIOR])) > 10
