"""Every documented numeric range works at both ends, on every API family (native, jobs,
OpenAI, A1111): the bounds are read from the OpenAPI schema the service publishes."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deployments.registry import MODES
from serve.http.app import create_app
from serve.http.schemas import request_models
from serve.settings import ApiLimits
from tests.jobfakes import FakeJobBackend
from tests.unit.test_api import FakeBackend
from tests.unit.test_api_modes import encode
from tests.unit.test_jobs_api import make_client

PICTURE = encode(Image.new("RGB", (64, 64), (200, 30, 30)))
BASE = {
    "text2img": {"prompt": "a red circle", "width": 64, "height": 64},
    "img2img": {"prompt": "a red circle", "image": PICTURE},
    "inpaint": {"prompt": "a red circle", "image": PICTURE, "mask": PICTURE},
    "mix": {"items": [{"text": "a red circle"}, {"image": PICTURE}], "weights": [0.5, 0.5], "width": 64, "height": 64},
    "variations": {"image": PICTURE, "prior_steps": 10},
    "controlnet": {"prompt": "a red circle", "hint": PICTURE},
}


def numeric_bounds(schema: dict) -> list[tuple[str, str, float]]:
    """(field, "minimum"/"maximum"/"exclusiveMinimum", value) for every numeric property."""
    found = []
    for name, prop in schema["properties"].items():
        for variant in prop.get("anyOf", [prop]):
            if variant.get("type") in ("integer", "number"):
                for key in ("minimum", "maximum", "exclusiveMinimum"):
                    if key in variant:
                        found.append((name, key, variant[key]))
    return found


APP = create_app(ApiLimits(), FakeBackend())
# The models' own JSON schema: the OpenAPI document renders integers as floats (seed's 2**63 - 1 inexact).
MODELS = request_models(ApiLimits())
CASES = [(mode, *bound) for mode in MODES for bound in numeric_bounds(MODELS[mode].model_json_schema())]


def at_bound(mode: str, field: str, value: float) -> dict:
    body = {**BASE[mode], field: value}
    if field == "strength" or (mode == "variations" and field == "prior_steps"):
        # strength x steps must leave one denoising step: at strength's low end, use the most steps.
        body["steps"] = body.get("steps", 150) if field != "steps" else value
        body["prior_steps"] = 100 if field != "prior_steps" else value
    if (mode == "variations" and field == "prior_steps" and value < 10) or (
            mode in ("img2img", "controlnet") and field == "steps" and value < 10):
        body["strength"] = 1.0
    return body


@pytest.mark.parametrize("mode, field, key, value", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_native_and_job_routes_take_each_bound_and_refuse_just_past_it(jobs, mode, field, key, value):
    client = TestClient(APP)
    step = 1 if isinstance(value, int) and field not in ("strength", "guidance_scale", "prior_guidance_scale", "mask_blur") else 0.5
    if field in ("width", "height"):
        step = 64
    if key == "exclusiveMinimum":  # the bound itself is refused; just inside it works
        refused = client.post(f"/v1/{mode}", json=at_bound(mode, field, value))
        assert refused.status_code == 422 and field in refused.json()["error"]["message"]
        assert client.post(f"/v1/{mode}", json=at_bound(mode, field, value + 0.01)).status_code == 200
        return
    inside = at_bound(mode, field, value)
    response = client.post(f"/v1/{mode}", json=inside)
    assert response.status_code == 200, response.text
    past = value - step if key == "minimum" else value + step
    refused = client.post(f"/v1/{mode}", json=at_bound(mode, field, past))
    assert refused.status_code == 422 and field in refused.json()["error"]["message"], refused.text
    submitted = jobs.post("/v1/jobs", json={"mode": mode, "params": inside})
    assert submitted.status_code == 202, submitted.text
    assert jobs.post("/v1/jobs", json={"mode": mode, "params": at_bound(mode, field, past)}).status_code == 422


@pytest.fixture(scope="module")
def jobs():
    # Many jobs from one client in a row: caps high enough that none is refused for load.
    client, _ = make_client(FakeJobBackend(step_s=0.0), max_active_jobs_per_client=1000, max_active_jobs=1000,
                            max_stored_jobs=10_000, max_stored_jobs_per_client=10_000)
    with client:
        yield client


LIMITS = ApiLimits()


@pytest.mark.parametrize("body", [
    {"n": 1, "size": "64x64"}, {"n": LIMITS.max_num_images, "size": "64x64"},
    {"size": f"{LIMITS.max_side}x{LIMITS.max_side}"}, {"size": "64x64", "steps": 1}, {"size": "64x64", "steps": LIMITS.max_steps},
    {"size": "64x64", "guidance_scale": 0.0}, {"size": "64x64", "guidance_scale": LIMITS.max_guidance_scale},
    {"size": "64x64", "prior_steps": 2}, {"size": "64x64", "seed": 0}, {"size": "64x64", "seed": 2**63 - 1},
])
def test_openai_route_takes_each_bound(jobs, body):
    response = jobs.post("/v1/images/generations", json={"prompt": "a red circle", "response_format": "b64_json", **body})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("body", [
    {"batch_size": 1}, {"batch_size": LIMITS.max_num_images}, {"steps": 1}, {"steps": LIMITS.max_steps},
    {"cfg_scale": 0}, {"cfg_scale": LIMITS.max_guidance_scale}, {"width": 64, "height": 64},
    {"width": LIMITS.max_side, "height": LIMITS.max_side}, {"seed": 0}, {"seed": -1}, {"prior_steps": 2},
])
def test_a1111_txt2img_takes_each_bound(jobs, body):
    response = jobs.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "width": 64, "height": 64, **body})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("body", [
    {"denoising_strength": 1.0}, {"denoising_strength": 0.01, "steps": 100},
    {"mask": PICTURE, "mask_blur": 0}, {"mask": PICTURE, "mask_blur": 64},
    {"mask": PICTURE, "inpainting_mask_invert": 1}, {"mask": PICTURE, "inpainting_mask_invert": False},
])
def test_a1111_img2img_takes_each_bound(jobs, body):
    response = jobs.post("/sdapi/v1/img2img", json={"prompt": "a red circle", "init_images": [PICTURE], **body})
    assert response.status_code == 200, response.text
