"""``quality``: measured presets for the fields a request leaves out, within the configured caps."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serve.http.app import create_app
from serve.http.schemas import QUALITY_PRESETS, SCHEDULER_NAMES, request_models
from serve.settings import ApiLimits
from tests.unit.test_api import FakeBackend
from tests.unit.test_api_modes import GOOD


def text2img(limits: ApiLimits = ApiLimits(), **fields):
    return request_models(limits)["text2img"].model_validate({"prompt": "a red square", **fields}).to_spec()


@pytest.mark.parametrize("name", list(QUALITY_PRESETS))
def test_a_preset_sets_the_fields_left_out(name):
    preset = QUALITY_PRESETS[name]
    plain = text2img()
    spec = text2img(quality=name)
    assert preset.scheduler in SCHEDULER_NAMES
    assert (spec.steps, spec.scheduler, spec.prior_steps) == (preset.steps, preset.scheduler, preset.prior_steps)
    expected_guidance = plain.guidance_scale if preset.guidance_scale is None else preset.guidance_scale
    assert spec.guidance_scale == expected_guidance
    assert spec.prior_guidance_scale == plain.prior_guidance_scale  # the prior keeps its guidance


def test_best_is_the_service_defaults_and_fast_is_cheaper():
    default, best, fast = text2img(), text2img(quality="best"), text2img(quality="fast")
    assert (best.steps, best.scheduler, best.prior_steps) == (default.steps, default.scheduler, default.prior_steps)
    assert fast.steps < default.steps and fast.prior_steps < default.prior_steps


def test_fields_given_win_over_the_preset():
    spec = text2img(quality="fast", steps=9, guidance_scale=3.0, scheduler="ddim")
    preset = QUALITY_PRESETS["fast"]
    assert (spec.steps, spec.guidance_scale, spec.scheduler, spec.prior_steps) == (9, 3.0, "ddim", preset.prior_steps)


def test_a_preset_stays_within_the_configured_caps():
    limits = ApiLimits(max_steps=4, max_prior_steps=3)
    spec = text2img(limits, quality="best")
    assert (spec.steps, spec.prior_steps) == (4, 3)


def test_an_unknown_quality_is_refused_naming_the_field():
    with pytest.raises(ValidationError) as error:
        text2img(quality="ultra")
    assert error.value.errors()[0]["loc"] == ("quality",)


def test_img2img_strength_is_checked_against_the_preset_steps():
    client = TestClient(create_app(ApiLimits(max_body_bytes=1024 * 1024), FakeBackend()))
    steps = QUALITY_PRESETS["fast"].steps
    response = client.post("/v1/img2img", json={**GOOD["img2img"], "quality": "fast", "strength": 0.5 / steps})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "strength"
    assert client.post("/v1/img2img", json={**GOOD["img2img"], "quality": "fast", "strength": 1.0}).status_code == 200


def test_quality_reaches_the_graph_over_http():
    backend = FakeBackend()
    client = TestClient(create_app(ApiLimits(), backend))
    assert client.post("/v1/text2img", json={"prompt": "a cat", "quality": "balanced"}).status_code == 200
    [(spec, _)] = backend.calls
    assert spec.steps == QUALITY_PRESETS["balanced"].steps and spec.scheduler == QUALITY_PRESETS["balanced"].scheduler
