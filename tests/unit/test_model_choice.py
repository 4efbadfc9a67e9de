"""Per-request model choice over HTTP with a fake backend: which model (and family) reaches the
graph, the 4xx for a model or mode that cannot be had, and ``GET /v1/models``. No Ray, no models."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from deployments.registry import FAMILIES, STAGES
from serve.http.app import create_app
from serve.http.catalog import ModelCatalog
from serve.jobs.runner import JobRunner
from serve.jobs.store import AsyncJobStore
from serve.settings import ApiLimits, JobSettings, ModelSettings
from tests.jobfakes import FakeJobBackend
from tests.unit.test_api import FakeBackend
from tests.unit.test_api_modes import GOOD
from tests.unit.test_jobs_api import wait_for

TEXT = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "prior_steps": 2}
EVERY_STAGE = {stage.name for stage in STAGES}


def make_client(deployed=EVERY_STAGE, default_id=None, stages=None):
    backend = FakeBackend(stages=stages)
    jobs_backend = FakeJobBackend(step_s=0.001)
    settings = JobSettings(progress_interval_s=0.005)
    runner = JobRunner(AsyncJobStore(settings), jobs_backend, settings)
    catalog = ModelCatalog.serving(("2.2", "2.1"), deployed, default_id)
    app = create_app(ApiLimits(max_body_bytes=1024 * 1024, max_image_pixels=512 * 512), backend, jobs=runner,
                     catalog=catalog)
    return TestClient(app), backend, jobs_backend


@pytest.fixture
def served():
    client, backend, jobs_backend = make_client()
    with client:
        yield client, backend, jobs_backend


def test_a_request_gets_the_model_it_names_else_the_default(served):
    client, backend, _ = served
    for body, expected in (({}, ("kandinsky-2-2", "2.2")), ({"model": "kandinsky-2-1"}, ("kandinsky-2-1", "2.1")),
                           ({"model": "kandinsky-2-2"}, ("kandinsky-2-2", "2.2"))):
        assert client.post("/v1/text2img", json={**TEXT, **body}).status_code == 200
        spec, _ = backend.calls[-1]
        assert (spec.model, spec.family) == expected


def test_the_configured_default_model_serves_requests_that_name_none():
    client, backend, _ = make_client(default_id="kandinsky-2-1")
    with client:
        assert client.post("/v1/text2img", json=TEXT).status_code == 200
    assert backend.calls[-1][0].family == "2.1"


def test_an_unknown_model_is_404_naming_the_field_and_listing_the_models(served):
    client, backend, _ = served
    response = client.post("/v1/text2img", json={**TEXT, "model": "kandinsky-3"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "model_not_found"
    assert error["message"].startswith("model:") and "kandinsky-2-2" in error["message"] and "kandinsky-2-1" in error["message"]
    assert backend.calls == []


@pytest.mark.parametrize("mode", sorted(set(FAMILIES["2.2"]) - set(FAMILIES["2.1"])))
def test_a_mode_the_family_lacks_is_422_naming_model_and_mode(served, mode):
    client, backend, _ = served
    response = client.post(f"/v1/{mode}", json={**GOOD[mode], "model": "kandinsky-2-1"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "mode_not_supported"
    assert "kandinsky-2-1" in error["message"] and mode in error["message"] and error["details"][0]["field"] == "model"
    assert backend.calls == []


def test_a_variant_not_configured_for_one_model_is_404_for_that_model_only():
    client, backend, _ = make_client(deployed=EVERY_STAGE - {"InpaintDenoiser21"})
    with client:
        body = GOOD["inpaint"]
        assert client.post("/v1/inpaint", json=body).status_code == 200
        response = client.post("/v1/inpaint", json={**body, "model": "kandinsky-2-1"})
    assert response.status_code == 404 and response.json()["error"]["type"] == "mode_not_configured"
    assert len(backend.calls) == 1


def test_a_model_name_is_bounded_before_anything_else(served):
    client, _, _ = served
    response = client.post("/v1/text2img", json={**TEXT, "model": "x" * 65})
    assert response.status_code == 422 and response.json()["error"]["details"][0]["field"] == "model"


def test_jobs_run_the_model_their_params_name_and_refuse_unknown_ones(served):
    client, _, jobs_backend = served
    response = client.post("/v1/jobs", json={"mode": "text2img", "params": {**TEXT, "model": "kandinsky-2-1"}})
    assert response.status_code == 202, response.text
    assert response.json()["model"] == "kandinsky-2-1"
    assert wait_for(client, response.json()["id"], {"succeeded"})["model"] == "kandinsky-2-1"
    assert jobs_backend.specs[-1].family == "2.1"
    response = client.post("/v1/jobs", json={"mode": "text2img", "params": {**TEXT, "model": "nope"}})
    assert response.status_code == 404
    assert response.json()["error"]["message"].startswith("params.model:")
    response = client.post("/v1/jobs", json={"mode": "variations", "params": {**GOOD["variations"], "model": "kandinsky-2-1"}})
    assert response.status_code == 422 and response.json()["error"]["details"][0]["field"] == "params.model"


def test_the_model_list_says_family_modes_size_default_and_loaded():
    stages = {name: "ready" for name in EVERY_STAGE} | {"Prior21": "UPDATING: no running replica"}
    client, _, _ = make_client(stages=stages)
    with client:
        listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    models = {model["id"]: model for model in listing["data"]}
    assert set(models) == {"kandinsky-2-2", "kandinsky-2-1"}
    assert models["kandinsky-2-2"]["default"] and not models["kandinsky-2-1"]["default"]
    assert models["kandinsky-2-2"]["modes"] == list(FAMILIES["2.2"])
    assert models["kandinsky-2-1"]["modes"] == list(FAMILIES["2.1"]) and models["kandinsky-2-1"]["family"] == "2.1"
    assert models["kandinsky-2-2"]["loaded"] and not models["kandinsky-2-1"]["loaded"]
    assert models["kandinsky-2-2"]["default_size"] == {"width": 512, "height": 512}
    assert all(model["object"] == "model" for model in listing["data"])  # OpenAI's model-list shape


def test_settings_name_the_served_models_and_check_the_default(tmp_path):
    assert ModelSettings().model_ids() == ["kandinsky-2-2"]
    both = ModelSettings(prior_21_path=tmp_path, decoder_21_path=tmp_path)
    assert both.model_ids() == ["kandinsky-2-2", "kandinsky-2-1"] and both.default_model_id() == "kandinsky-2-2"
    with pytest.raises(ValueError, match="default_model"):
        ModelSettings(default_model="kandinsky-2-1")
    with pytest.raises(ValueError, match="prior_21_path and decoder_21_path"):
        ModelSettings(decoder_21_path=tmp_path)


def test_openai_model_names_a_served_model_and_openai_names_mean_the_default(served):
    client, _, jobs_backend = served
    for model, family in (("kandinsky-2-1", "2.1"), ("dall-e-3", "2.2"), ("gpt-image-1", "2.2"), (None, "2.2")):
        body = {"prompt": "a red circle", "size": "64x64", "response_format": "b64_json", "steps": 2, "prior_steps": 2}
        response = client.post("/v1/images/generations", json={**body, **({"model": model} if model else {})})
        assert response.status_code == 200, response.text
        assert jobs_backend.specs[-1].family == family
    unknown = client.post("/v1/images/generations", json={"prompt": "a", "model": "sdxl"})
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["param"] == "model" and "kandinsky-2-1" in error["message"]


def test_a1111_override_settings_and_options_choose_the_model_per_client(served):
    client, _, jobs_backend = served
    body = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "prior_steps": 2}
    assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["kandinsky-2-2", "kandinsky-2-1"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "kandinsky-2-2"
    result = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "kandinsky-2-1",
                                                                                  "CLIP_stop_at_last_layers": 2}})
    assert result.status_code == 200, result.text
    info = json.loads(result.json()["info"])
    assert jobs_backend.specs[-1].family == "2.1" and info["sd_model_name"] == "kandinsky-2-1"
    assert "override_settings.CLIP_stop_at_last_layers" in info["unsupported_fields"]
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    assert jobs_backend.specs[-1].family == "2.2"  # the override was for that request only
    # The options route sets this client's model for its later requests (A1111 [hash] titles accepted).
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "kandinsky-2-1 [abc123]"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "kandinsky-2-1"
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    assert jobs_backend.specs[-1].family == "2.1"
    unknown = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "sdxl"}})
    assert unknown.status_code == 404 and "sd_model_checkpoint" in unknown.json()["error"]["message"]
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "kandinsky-2-2"})
