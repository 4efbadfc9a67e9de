"""OpenAI Images and AUTOMATIC1111 translation and routes, with a fake backend. No Ray, no models."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest

from serve.http.compat import (
    A1111Img2ImgRequest,
    A1111OptionsRequest,
    A1111PngInfoRequest,
    A1111Txt2ImgRequest,
    CompatError,
    OpenAIImageRequest,
    a1111_to_native,
    a1111_translated_fields,
    json_request_body,
    openai_to_native,
    scheduler_for_sampler,
)
from tests.jobfakes import FakeJobBackend
from tests.unit.test_api_modes import encode
from tests.unit.test_jobs_api import make_client

PNG_B64 = base64.b64encode(b"not decoded by the translation").decode()


def test_openai_body_maps_to_text2img():
    body = OpenAIImageRequest(prompt="a cat", n=2, size="128x64", response_format="b64_json", model="dall-e-2",
                              seed=5, steps=7, output_format="webp")
    assert openai_to_native(body) == {"prompt": "a cat", "width": 128, "height": 64, "num_images": 2,
                                      "output_format": "webp", "seed": 5, "steps": 7}
    for size in (None, "auto"):  # the native endpoint's default: the model's own size
        assert "width" not in openai_to_native(OpenAIImageRequest(prompt="x", size=size))
    with pytest.raises(CompatError, match="size"):
        openai_to_native(OpenAIImageRequest(prompt="x", size="big"))


def test_a1111_txt2img_maps_fields_and_lists_what_it_does_not_use():
    body = {"prompt": "a cat", "negative_prompt": "blur", "steps": 9, "cfg_scale": 7, "width": 64, "height": 128,
            "seed": 11, "batch_size": 2, "n_iter": 3, "sampler_name": "DPM++ 2M", "restore_faces": False,
            "enable_hr": False, "hr_scale": 3, "styles": []}
    mode, native, unsupported, _ = a1111_to_native(body, img2img=False)
    assert mode == "text2img"
    assert native == {"prompt": "a cat", "negative_prompt": "blur", "steps": 9, "guidance_scale": 7.0, "width": 64,
                      "height": 128, "seed": 11, "num_images": 6, "scheduler": "dpmsolver++"}
    assert unsupported == ["restore_faces", "styles"]  # hr_* change nothing with enable_hr off, as in A1111


@pytest.mark.parametrize("fields, hires, substitution", [
    ({}, {"scale": 2.0, "strength": 0.7, "upscale": "latent"}, None),
    ({"hr_scale": 1.5, "denoising_strength": 0.4, "hr_second_pass_steps": 7, "hr_upscaler": "Latent"},
     {"scale": 1.5, "strength": 0.4, "steps": 7, "upscale": "latent"}, None),
    ({"hr_upscaler": "R-ESRGAN 4x+", "hr_second_pass_steps": 0},
     {"scale": 2.0, "strength": 0.7, "upscale": "pixel"}, {"asked": "R-ESRGAN 4x+", "used": "Bicubic"}),
    ({"hr_upscaler": "Latent (bicubic antialiased)"}, {"scale": 2.0, "strength": 0.7, "upscale": "latent"},
     {"asked": "Latent (bicubic antialiased)", "used": "Latent"}),
])
def test_a1111_hires_fix_maps_to_the_native_hires(fields, hires, substitution):
    _, native, unsupported, substitutions = a1111_to_native({"prompt": "a", "enable_hr": True, **fields}, img2img=False)
    assert native["hires"] == hires and unsupported == []
    assert substitutions.get("hr_upscaler") == substitution


def test_a1111_hires_upscaler_is_a_short_name():
    with pytest.raises(CompatError, match="hr_upscaler"):
        a1111_to_native({"prompt": "a", "enable_hr": True, "hr_upscaler": "x" * 65}, img2img=False)
    with pytest.raises(CompatError, match="hr_upscaler"):
        a1111_to_native({"prompt": "a", "enable_hr": True, "hr_upscaler": 4}, img2img=False)


def test_a1111_hires_errors_name_a1111_fields(client):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "width": 512, "height": 512, "enable_hr": True,
                                                      "hr_scale": 3})
    assert response.status_code == 422 and "hr_scale" in response.json()["error"]["message"]
    _, random_seed, _, _ = a1111_to_native({"prompt": "a", "seed": -1}, img2img=False)
    assert "seed" not in random_seed


def test_a1111_img2img_and_inpainting():
    mode, native, unsupported, _ = a1111_to_native(
        {"prompt": "a", "init_images": ["data:image/png;base64," + PNG_B64], "denoising_strength": 0.5, "mask_blur": 4},
        img2img=True,
    )
    assert mode == "img2img" and native["image"] == PNG_B64 and native["strength"] == 0.5
    assert unsupported == ["mask_blur"]  # no mask: nothing to blur
    mode, native, unsupported, _ = a1111_to_native(
        {"prompt": "a", "init_images": [PNG_B64], "mask": PNG_B64, "inpainting_mask_invert": 1, "denoising_strength": 0.75},
        img2img=True,
    )
    assert mode == "inpaint" and native["invert_mask"] is True and native["mask_blur"] == 4.0
    assert unsupported == ["denoising_strength"]
    with pytest.raises(CompatError, match="init_images"):
        a1111_to_native({"prompt": "a", "init_images": [PNG_B64, PNG_B64]}, img2img=True)


def test_samplers_map_by_name_or_alias_and_other_a1111_samplers_to_the_nearest():
    assert scheduler_for_sampler("DDIM") == ("ddim", False) and scheduler_for_sampler("unipc") == ("unipc", False)
    assert scheduler_for_sampler("Euler a") == ("ddpm", True)  # webuiapi's default
    assert scheduler_for_sampler("DPM++ 2M Karras") == ("dpmsolver++-karras", False)
    assert scheduler_for_sampler("DPM++ 2M Exponential") == ("dpmsolver++", True)
    assert scheduler_for_sampler("DPM++ 2M SDE Karras") == ("dpmsolver++-sde", True)
    assert scheduler_for_sampler("dpm++ 3m sde") == ("dpmsolver++-sde", True)
    assert scheduler_for_sampler("euler") == ("dpmsolver++", True)
    with pytest.raises(CompatError, match="Warp drive"):
        scheduler_for_sampler("Warp drive")
    _, native, _, substitutions = a1111_to_native({"prompt": "a", "sampler_name": "Euler a", "sampler_index": "Euler a"},
                                                  img2img=False)
    assert native["scheduler"] == "ddpm" and substitutions == {"sampler_name": {"asked": "Euler a", "used": "DDPM"}}


@pytest.fixture
def client():
    client, _ = make_client(FakeJobBackend(step_s=0.002))
    with client:
        yield client


def test_openai_route_returns_b64_or_job_urls(client):
    inline = client.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, "size": "64x64",
                                                         "response_format": "b64_json", "seed": 4, "steps": 3})
    assert inline.status_code == 200, inline.text
    body = inline.json()
    assert isinstance(body["created"], int)
    assert [base64.b64decode(d["b64_json"]) for d in body["data"]] == [b"img0", b"img1"]
    linked = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "steps": 3},
                         headers={"Host": "evil.example:1"})
    url = linked.json()["data"][0]["url"]
    assert url.startswith("/v1/jobs/") and "evil" not in linked.text  # relative: never the client's Host
    assert client.get(url).content == b"img0"


@pytest.mark.parametrize("patch,field", [({"size": "100x64"}, "size"), ({"n": 9}, "n"), ({"colour": "red"}, "colour"),
                                         ({"size": "huge"}, "size"), ({"output_compression": 101}, "output_compression")])
def test_openai_bad_input_is_400_in_openais_error_shape_and_field_names(client, patch, field):
    response = client.post("/v1/images/generations", json={"prompt": "a cat", **patch})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == field and field in error["message"] and error["code"] == "validation_error"


def test_the_sdks_other_fields_are_accepted_and_reported(client):
    response = client.post("/v1/images/generations", json={
        "prompt": "a cat", "size": "64x64", "steps": 3, "response_format": "b64_json", "quality": "high",
        "background": "opaque", "moderation": "low", "output_compression": 80, "user": "u-1"})
    assert response.status_code == 200, response.text
    assert response.json()["unsupported_fields"] == ["background", "moderation", "output_compression"]


@pytest.mark.parametrize("quality, preset", [("low", "fast"), ("medium", "balanced"), ("HIGH", "best"), ("hd", "best"),
                                             ("standard", None), ("auto", None), ("fast", "fast")])
def test_openai_quality_picks_a_preset(quality, preset):
    native = openai_to_native(OpenAIImageRequest(prompt="a cat", quality=quality))
    assert native.get("quality") == preset


def test_an_unknown_openai_quality_is_refused_naming_it(client):
    response = client.post("/v1/images/generations", json={"prompt": "a cat", "quality": "ultra"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "quality"


def test_sdapi_txt2img_returns_images_parameters_and_info(client):
    body = {"prompt": "a cat", "steps": 4, "width": 64, "height": 64, "seed": 8, "batch_size": 2,
            "sampler_name": "DDIM", "tiling": False}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert [base64.b64decode(image) for image in result["images"]] == [b"img0", b"img1"]
    assert result["parameters"] == body
    info = json.loads(result["info"])
    assert info["all_seeds"] == [8, 9] and info["sampler_name"] == "DDIM" and info["unsupported_fields"] == ["tiling"]
    assert info["interrupted"] is False


def test_sdapi_errors_use_its_field_names(client):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "cfg_scale": 500})
    assert response.status_code == 422 and "cfg_scale" in response.json()["error"]["message"]
    unknown = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "sampler_name": "Warp drive"})
    assert unknown.status_code == 422 and "sampler_name" in unknown.json()["error"]["message"]


def test_an_a1111_sampler_we_do_not_run_is_substituted_and_says_so(client):
    result = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "width": 64, "height": 64,
                                                    "sampler_name": "Euler a", "scheduler": "automatic"})
    assert result.status_code == 200, result.text
    info = json.loads(result.json()["info"])
    assert info["sampler_name"] == "DDPM" and info["substitutions"] == {"sampler_name": {"asked": "Euler a", "used": "DDPM"}}
    assert "Sampler substitution: Euler a -> DDPM" in info["infotexts"][0]
    assert "scheduler" in info["unsupported_fields"]


def test_sdapi_lists_samplers_and_models():
    client, _ = make_client(unavailable={"controlnet": "not configured"})
    with client:
        samplers = client.get("/sdapi/v1/samplers").json()
        models = client.get("/sdapi/v1/sd-models").json()
    assert {s["name"] for s in samplers} == {"DDPM", "DDIM", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "UniPC", "DEIS"}
    assert [m["model_name"] for m in models] == ["kandinsky-2-2"]  # the models, as GET /v1/models


def test_sdapi_progress_and_interrupt():
    client, backend = make_client(FakeJobBackend(step_s=0.01))
    with client:
        idle = client.get("/sdapi/v1/progress").json()
        assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0
        result = {}
        worker = threading.Thread(target=lambda: result.update(response=client.post(
            "/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 150, "width": 64, "height": 64})))
        worker.start()
        deadline = time.monotonic() + 20
        while True:
            progress = client.get("/sdapi/v1/progress").json()
            if progress["textinfo"] == "denoise" and progress["state"]["sampling_step"] > 2:
                break
            assert time.monotonic() < deadline, progress
            time.sleep(0.01)  # polling interval
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
        job = progress["state"]["job"]
        while (progress := client.get("/sdapi/v1/progress").json())["current_image"] is None:
            assert time.monotonic() < deadline, progress  # a preview every 10 steps (jobs.a1111_preview_every)
            time.sleep(0.01)  # polling interval
        assert base64.b64decode(progress["current_image"]) == b"\xff\xd8preview"
        assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": [job]}
        worker.join(timeout=20)
    response = result["response"]
    assert response.status_code == 200
    assert response.json()["images"] == [] and json.loads(response.json()["info"])["interrupted"] is True
    assert backend.steps_run[job] < 25 + 150


def test_sdapi_options_scripts_and_skip_as_open_webui_and_webuiapi_call_them():
    client, _ = make_client(FakeJobBackend(step_s=0.002), unavailable={"controlnet": "not configured"})
    with client:
        options = client.get("/sdapi/v1/options", headers={"authorization": ""}).json()  # Open WebUI, no auth
        titles = [model["title"] for model in client.get("/sdapi/v1/sd-models").json()]
        assert options["sd_model_checkpoint"] == titles[0]
        # Open WebUI sets a model by posting the whole options object back, changed.
        # A title listed before models were named still names the 2.2 model.
        legacy = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "kandinsky-2-2-decoder [text2img]"})
        assert legacy.status_code == 200, legacy.text
        chosen = client.post("/sdapi/v1/options", json={**options, "sd_model_checkpoint": titles[-1],
                                                          "CLIP_stop_at_last_layers": 2})
        assert chosen.status_code == 200, chosen.text
        assert chosen.json() == {"applied": sorted(options), "unsupported": ["CLIP_stop_at_last_layers"]}
        unknown = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl.safetensors"})
        assert unknown.status_code == 422 and "sd_model_checkpoint" in unknown.json()["error"]["message"]
        assert titles[0] in unknown.json()["error"]["message"]
        assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
        assert client.post("/sdapi/v1/skip").json() == {"interrupted": []}


def test_openai_links_use_the_configured_public_base_url():
    client, _ = make_client(FakeJobBackend(step_s=0.002), public_base_url="https://images.example.com/k/")
    with client:
        linked = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "steps": 3},
                             headers={"Host": "evil.example:1"}).json()
    assert linked["data"][0]["url"].startswith("https://images.example.com/k/v1/jobs/")


def test_open_webui_gpt_image_models_get_image_urls_it_can_fetch_given_a_public_base_url():
    """Open WebUI's "openai" engine leaves response_format out for models matching
    IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN ("^gpt-image"), then GETs each ``data[i].url`` with
    its Authorization header and keeps it if the content-type is image/*. It fetches only
    http(s) URLs (any other string it decodes as base64), so those models need
    ``jobs.public_base_url``: without it the URLs are relative."""
    client, _ = make_client(FakeJobBackend(step_s=0.002), public_base_url="http://testserver")
    headers = {"Authorization": "Bearer sk-open-webui", "Content-Type": "application/json"}
    with client:
        res = client.post("/v1/images/generations", headers=headers,
                          json={"model": "gpt-image-1", "prompt": "a cat", "n": 1, "size": "64x64", "steps": 3})
        assert res.status_code == 200, res.text
        link = res.json()["data"][0]["url"]
        assert link.startswith("http://testserver/v1/jobs/")
        image = client.get(link, headers={k: v for k, v in headers.items() if k != "Content-Type"})
    assert image.status_code == 200 and image.headers["content-type"].split("/")[0] == "image"
    assert image.content == b"img0"


def png_b64() -> str:
    from PIL import Image

    return encode(Image.new("RGB", (64, 64)))


@pytest.mark.parametrize("patch, field", [
    ({"inpainting_mask_invert": "false"}, "inpainting_mask_invert"),
    ({"inpainting_mask_invert": 2}, "inpainting_mask_invert"),
    ({"mask_blur": "abc"}, "mask_blur"),
    ({"mask_blur": []}, "mask_blur"),
])
def test_a1111_inpaint_flags_and_numbers_are_parsed_strictly(client, patch, field):
    body = {"prompt": "a cat", "init_images": [png_b64()], "mask": png_b64(), **patch}
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == field


@pytest.mark.parametrize("strength", ["abc", {}, None, True])
def test_a1111_denoising_strength_must_be_a_number(client, strength):
    body = {"prompt": "a cat", "init_images": [png_b64()], "denoising_strength": strength}
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 422 and "denoising_strength" in response.json()["error"]["message"]


def test_deeply_nested_bodies_are_4xx_on_every_route_family(client):
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    for path in ("/sdapi/v1/txt2img", "/v1/images/generations", "/v1/text2img", "/v1/jobs"):
        response = client.post(path, content=deep, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:200])
        assert "error" in response.json()


def sse_payloads(text: str) -> list[tuple[str | None, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "data" in lines:
            out.append((lines.get("event"), json.loads(lines["data"])))
    return out


def test_openai_stream_sends_partial_images_then_each_image():
    client, _ = make_client(FakeJobBackend(step_s=0.002))
    with client:
        response = client.post("/v1/images/generations", json={
            "prompt": "a cat", "size": "64x64", "n": 2, "steps": 30, "stream": True, "partial_images": 2})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(response.text)
    kinds = [payload["type"] for _, payload in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"] * 2, kinds
    assert all(event == payload["type"] for event, payload in events)
    assert [payload["partial_image_index"] for _, payload in events[:2]] == [0, 1]
    assert base64.b64decode(events[0][1]["b64_json"]) == b"\xff\xd8preview"
    assert [base64.b64decode(payload["b64_json"]) for _, payload in events[2:]] == [b"img0", b"img1"]
    assert events[2][1]["size"] == "64x64" and events[2][1]["output_format"] == "png"


def test_openai_stream_refusals_come_before_the_stream():
    client, _ = make_client(FakeJobBackend(step_s=0.002))
    with client:
        refused = client.post("/v1/images/generations", json={"prompt": "a cat", "stream": True, "partial_images": 4})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "partial_images"


def rgba_png(alpha) -> bytes:
    from PIL import Image

    pixels = np.zeros((64, 64, 4), np.uint8)
    pixels[..., 3] = alpha
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def test_openai_edits_with_a_mask_inpaint_where_it_is_transparent_and_without_one_img2img():
    backend = FakeJobBackend(step_s=0.002)
    client, _ = make_client(backend)
    picture = base64.b64decode(png_b64())
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[16:48, 16:48] = 0  # edit the middle
    with client:
        inpainted = client.post("/v1/images/edits", data={"prompt": "a cat", "size": "64x64", "steps": "3",
                                                          "response_format": "b64_json"},
                                files={"image": ("a.png", picture, "image/png"), "mask": ("m.png", rgba_png(alpha), "image/png")})
        edited = client.post("/v1/images/edits", data={"prompt": "a cat", "size": "64x64", "steps": "4", "n": "2"},
                             files={"image[]": ("a.png", picture, "image/png")})
        no_alpha = client.post("/v1/images/edits", data={"prompt": "a cat"},
                               files={"image": ("a.png", picture, "image/png"), "mask": ("m.png", picture, "image/png")})
        two = client.post("/v1/images/edits", data={"prompt": "a cat"},
                          files=[("image[]", ("a.png", picture, "image/png")), ("image[]", ("b.png", picture, "image/png"))])
    assert inpainted.status_code == 200, inpainted.text
    assert edited.status_code == 200 and len(edited.json()["data"]) == 2, edited.text
    specs = [spec for spec in backend.specs if spec.mode in ("inpaint", "img2img")]
    inpaint, img2img = specs[-2:]
    assert inpaint.mode == "inpaint" and inpaint.mask[32, 32] == 255 and inpaint.mask[0, 0] == 0
    assert img2img.mode == "img2img" and img2img.strength == 0.75
    assert no_alpha.status_code == 400 and no_alpha.json()["error"]["param"] == "mask"
    assert two.status_code == 400 and two.json()["error"]["param"] == "image"


def test_openai_variations_run_the_image_embedding_prior():
    backend = FakeJobBackend(step_s=0.002)
    client, _ = make_client(backend)
    with client:
        varied = client.post("/v1/images/variations", data={"size": "64x64", "n": "2", "steps": "3",
                                                             "response_format": "b64_json"},
                             files={"image": ("a.png", base64.b64decode(png_b64()), "image/png")})
        missing = client.post("/v1/images/variations", data={"size": "64x64"})
    assert varied.status_code == 200, varied.text
    assert len(varied.json()["data"]) == 2 and backend.specs[-1].mode == "variations"
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "image"


def test_openai_edits_still_take_a_place_in_the_gate_once_the_form_is_read():
    from fastapi.testclient import TestClient

    from serve.http.app import create_app
    from serve.jobs.runner import JobRunner
    from serve.jobs.store import AsyncJobStore
    from serve.settings import AdmissionSettings, ApiLimits, JobSettings
    from tests.unit.test_api import FakeBackend

    settings = JobSettings(progress_interval_s=0.005)
    runner = JobRunner(AsyncJobStore(settings), FakeJobBackend(step_s=0.002), settings)
    app = create_app(ApiLimits(), FakeBackend(), jobs=runner,
                     admission=AdmissionSettings(max_inflight_requests=4, max_inflight_per_client=1))
    form = {"data": {"prompt": "a cat", "size": "64x64", "steps": "3"},
            "files": {"image": ("a.png", base64.b64decode(png_b64()), "image/png")}}
    with TestClient(app) as client:
        gate = app.state.admission_gate
        assert gate.enter("addr:testclient") is None  # this client's one place, taken
        refused = client.post("/v1/images/edits", **form)
        gate.leave(None, "addr:testclient")
        served = client.post("/v1/images/edits", **form)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_inflight", refused.text
    assert served.status_code == 200, served.text
    assert gate.inside == 0


# -- the /sdapi/v1 request models: in the OpenAPI document, the routes unchanged -------------------


class ReadKeys(dict):
    """A body that records which keys the code reads (get, [] and in)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def every_field(model) -> dict:
    """A body giving every field of ``model`` a value a1111_to_native accepts."""
    values = {"prompt": "a", "negative_prompt": "b", "steps": 3, "cfg_scale": 4.0, "width": 64, "height": 64,
              "seed": 5, "batch_size": 1, "n_iter": 1, "sampler_name": "DDIM", "sampler_index": "DDIM",
              "prior_steps": 2, "prior_guidance_scale": 4.0, "init_images": [PNG_B64], "denoising_strength": 0.5,
              "mask": PNG_B64, "inpainting_mask_invert": 0, "mask_blur": 4,
              "override_settings": {"sd_model_checkpoint": "kandinsky-2-2"}, "enable_hr": True, "hr_scale": 2.0,
              "hr_upscaler": "Latent", "hr_second_pass_steps": 2}
    return {name: values.get(name, True) for name in model.model_fields}


def test_the_a1111_models_name_exactly_the_keys_a1111_to_native_reads():
    """What the code reads (recorded while translating bodies that reach every branch) is
    exactly the translated fields of the model; every other field is one it lists as unsupported."""
    for model, img2img, bodies in (
        (A1111Txt2ImgRequest, False, [{}, every_field(A1111Txt2ImgRequest)]),
        (A1111Img2ImgRequest, True, [{"init_images": [PNG_B64]}, every_field(A1111Img2ImgRequest),
                                     {**every_field(A1111Img2ImgRequest), "mask": None}]),
    ):
        read: set[str] = set()
        for body in bodies:
            recorded = ReadKeys(body)
            a1111_to_native(recorded, img2img=img2img)
            read |= recorded.read
        translated = a1111_translated_fields(model)
        assert read == translated, (model.__name__, read ^ translated)
        _, _, unsupported, _ = a1111_to_native(every_field(model), img2img=img2img)
        marked = set(model.model_fields) - translated
        assert marked and marked <= set(unsupported), (model.__name__, marked - set(unsupported))


def sdapi_request_schema(client, path: str) -> dict:
    document = client.get("/openapi.json").json()
    body = document["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    return body["content"]["application/json"]["schema"]


@pytest.mark.parametrize("path, model, fields", [
    ("/sdapi/v1/txt2img", A1111Txt2ImgRequest,
     {"prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "seed", "batch_size", "n_iter",
      "sampler_name", "sampler_index", "scheduler", "restore_faces", "tiling", "send_images", "save_images",
      "override_settings", "enable_hr", "denoising_strength", "prior_steps"}),
    ("/sdapi/v1/img2img", A1111Img2ImgRequest,
     {"prompt", "steps", "cfg_scale", "seed", "sampler_name", "init_images", "denoising_strength", "mask",
      "inpainting_mask_invert", "mask_blur", "inpainting_fill", "inpaint_full_res", "resize_mode"}),
    ("/sdapi/v1/options", A1111OptionsRequest, {"sd_model_checkpoint"}),
    ("/sdapi/v1/png-info", A1111PngInfoRequest, {"image"}),
])
def test_the_openapi_document_describes_each_sdapi_body(client, path, model, fields):
    from jsonschema import Draft202012Validator

    schema = sdapi_request_schema(client, path)
    assert schema["title"] == model.__name__ and fields <= set(schema["properties"])
    assert schema["additionalProperties"] is True  # A1111 clients send many more keys: accepted
    assert all(schema["properties"][name].get("description") for name in schema["properties"])
    Draft202012Validator.check_schema(schema)
    assert "$defs" not in schema and "$ref" not in json.dumps(schema)  # flat: nothing to dangle
    unsupported = {name for name, field in schema["properties"].items() if field.get("x-unsupported")}
    assert unsupported == set(model.model_fields) - a1111_translated_fields(model)  # none for options, png-info


def test_the_openapi_document_still_builds_and_every_reference_resolves(client):
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    references = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                references.add(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    assert references and all(ref.startswith("#/components/schemas/") for ref in references)
    assert {ref.rsplit("/", 1)[1] for ref in references} <= set(schemas)


def test_the_bodies_clients_send_are_valid_by_the_documented_schemas(client):
    """webuiapi's and Open WebUI's bodies (and this file's) validate against the document."""
    from jsonschema import Draft202012Validator

    txt2img = Draft202012Validator(sdapi_request_schema(client, "/sdapi/v1/txt2img"))
    img2img = Draft202012Validator(sdapi_request_schema(client, "/sdapi/v1/img2img"))
    for body in ({"prompt": "a cat", "batch_size": 2, "width": 64, "height": 64, "steps": 2, "negative_prompt": "x"},
                 {"prompt": "a", "sampler_name": "Euler a", "scheduler": "automatic", "enable_hr": False,
                  "styles": [], "seed": -1, "cfg_scale": 7, "alwayson_scripts": {}, "unknown_key": 1}):
        txt2img.validate(body)
    img2img.validate({"prompt": "a", "init_images": ["data:image/png;base64," + PNG_B64], "mask": PNG_B64,
                      "inpainting_mask_invert": 1, "mask_blur": 4, "inpainting_fill": 1, "inpaint_full_res": False})
    assert not img2img.is_valid({"prompt": "a"})  # init_images is required, as the route says (422)


def test_the_models_document_only_the_sdapi_routes_still_read_the_raw_body(client):
    """Unknown keys stay accepted and reported; refusals keep this service's error shape (never
    FastAPI's ``detail``), naming the A1111 field."""
    accepted = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "width": 64, "height": 64,
                                                      "restore_faces": True, "made_up": {"x": 1}})
    assert accepted.status_code == 200, accepted.text
    assert json.loads(accepted.json()["info"])["unsupported_fields"] == ["made_up", "restore_faces"]
    for path, body, field in (
        ("/sdapi/v1/img2img", {"prompt": "a"}, "init_images"),
        ("/sdapi/v1/txt2img", {"prompt": "a", "batch_size": 0}, "batch_size"),
        ("/sdapi/v1/txt2img", [1, 2], "body"),
        ("/sdapi/v1/png-info", {"img": "x"}, "image"),
        ("/sdapi/v1/options", "checkpoint", "body"),
    ):
        refused = client.post(path, json=body)
        assert refused.status_code == 422, (path, refused.text)
        assert set(refused.json()) == {"error", "request_id"} and "detail" not in refused.json()
        assert refused.json()["error"]["details"][0]["field"] == field, (path, refused.text)
    not_json = client.post("/sdapi/v1/txt2img", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["error"]["details"][0]["field"] == "body"
    options = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
    assert options.status_code == 200 and options.json() == {"applied": [], "unsupported": ["CLIP_stop_at_last_layers"]}


def test_a_nested_request_model_is_refused_rather_than_documented_with_a_dangling_reference():
    from pydantic import BaseModel

    class Inner(BaseModel):
        x: int

    class Outer(BaseModel):
        inner: Inner

    with pytest.raises(TypeError, match="flat"):
        json_request_body(Outer)
