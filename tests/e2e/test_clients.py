"""The AUTOMATIC1111 clients people run, unmodified, against the live service: ``webuiapi``
(PyPI) as its users call it, and Open WebUI's call sequences replayed from its source
(``backend/open_webui/routers/images.py``): its "automatic1111" engine (verify, list models,
read and set the model, generate) and its "openai" engine (generate, edit)."""

from __future__ import annotations

import base64
import io
import json
import uuid

import httpx
import numpy as np
import pytest
import webuiapi  # the dev extra installs it
from PIL import Image

TINY = {"width": 64, "height": 64, "steps": 3, "cfg_scale": 4.0, "seed": 7}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def native_image(url: str, headers: dict | None = None, **overrides) -> np.ndarray:
    body = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "guidance_scale": 4.0, "seed": 7,
            "scheduler": "ddpm", **overrides}
    response = httpx.post(f"{url}/v1/text2img", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return pixels(base64.b64decode(response.json()["images"][0]))


def test_webuiapi_unmodified_draws_the_native_image_with_its_default_sampler(served_app):
    url, _ = served_app
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")  # default sampler "Euler a", scheduler "automatic"
    result = api.txt2img(prompt="a red circle", **TINY)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert result.info["substitutions"] == {"sampler_name": {"asked": "Euler a", "used": "DDPM"}}
    assert {"alwayson_scripts", "scheduler"} <= set(result.info["unsupported_fields"])
    assert "enable_hr" not in result.info["unsupported_fields"]  # read: off (webuiapi's default), no hires pass
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")), native_image(url))
    # The image carries its parameters (a PNG chunk Pillow reads), and png-info reads them back.
    carried = result.images[0].info["parameters"]
    assert carried.startswith("a red circle\nNegative prompt: \n") and "Seed: 7" in carried and "Steps: 3" in carried
    assert api.png_info(result.images[0]).info == carried
    current = api.util_get_current_model()
    assert current in api.util_get_model_names()
    api.util_set_model(current)  # posts {"sd_model_checkpoint": ...}
    assert api.get_progress()["state"]["job_count"] == 0
    assert api.interrupt() == {"interrupted": []}


def test_webuiapi_with_http_basic_auth_uses_the_key_as_password(guarded_app):
    url, keys = guarded_app
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", username="webui", password=keys["normal"])
    result = api.txt2img(prompt="a red circle", **{**TINY, "steps": 2})
    assert result.images[0].size == (64, 64)
    refused = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", username="webui", password="ks-not-a-key")
    with pytest.raises(RuntimeError) as error:
        refused.txt2img(prompt="a red circle", **{**TINY, "steps": 2})
    assert error.value.args[0] == 401


def test_open_webui_a1111_call_sequence(guarded_app):
    """What Open WebUI sends, in its order: each GET/POST of /sdapi/v1/options carries its
    ``authorization`` header (HTTP Basic of its AUTOMATIC1111_API_AUTH ``user:password``)."""
    url, keys = guarded_app
    base = url.rstrip("/")
    auth = {"authorization": "Basic " + base64.b64encode(f"openwebui:{keys['normal']}".encode()).decode()}
    with httpx.Client(timeout=120) as client:
        client.get(f"{base}/sdapi/v1/options", headers=auth).raise_for_status()  # "verify URL"
        models = [{"id": m["title"], "name": m["model_name"]}
                  for m in client.get(f"{base}/sdapi/v1/sd-models", headers=auth).json()]
        options = client.get(f"{base}/sdapi/v1/options", headers=auth).json()
        assert options["sd_model_checkpoint"] in [m["id"] for m in models]
        chosen = models[-1]["id"]
        if chosen != options["sd_model_checkpoint"]:  # set_image_model: the whole options object back
            options["sd_model_checkpoint"] = chosen
            client.post(f"{base}/sdapi/v1/options", json=options, headers=auth).raise_for_status()
        data = {"prompt": "a red circle", "batch_size": 2, "width": 64, "height": 64, "steps": 2,
                "negative_prompt": "blue"}
        res = client.post(f"{base}/sdapi/v1/txt2img", json=data, headers=auth).json()
        assert len(res["images"]) == 2
        assert all(pixels(base64.b64decode(image)).shape == (64, 64, 3) for image in res["images"])
        assert json.loads(res["info"])["negative_prompt"] == "blue"
        # Without the key (Open WebUI sends an empty header when no auth is set): the 401 it shows.
        assert client.get(f"{base}/sdapi/v1/options", headers={"authorization": ""}).status_code == 401


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def open_webui_image_data(data: str) -> tuple[bytes, str]:
    """Open WebUI's ``get_image_data`` for a ``b64_json`` item: no comma, so image/png, base64."""
    assert "," not in data and not data.startswith(("http://", "https://"))
    return base64.b64decode(data), "image/png"


def test_open_webui_openai_call_sequence(guarded_app, served_app):
    """Open WebUI's "openai" engine, replayed from ``backend/open_webui/routers/images.py``
    (open-webui/open-webui, stored at commit 02530d501461ce58ab06231d7c2ef2024a141ddf).

    ``get_models``: the "openai" engine's list is fixed in the source (dall-e-2, dall-e-3,
    gpt-image-1, gpt-image-1.5), so nothing is requested; ``get_image_model``: its
    IMAGE_GENERATION_MODEL, else "dall-e-2". ``image_generations``: POST
    ``{IMAGES_OPENAI_API_BASE_URL}/images/generations`` (``?api-version=`` only when one is
    configured, for Azure), headers ``Authorization: Bearer {IMAGES_OPENAI_API_KEY}`` and
    ``Content-Type: application/json``, body ``{model, prompt, n, size (the form's or its
    IMAGE_SIZE), response_format: "b64_json" (left out for models matching
    IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN, "^gpt-image"), **IMAGES_OPENAI_API_PARAMS}``;
    ``raise_for_status``; each ``res["data"][i]``: its ``url`` fetched (same headers less
    Content-Type), else its ``b64_json`` decoded. ``image_edits``: POST
    ``{IMAGES_EDIT_OPENAI_API_BASE_URL}/images/edits``, multipart (aiohttp FormData) of the
    fields as strings ``{model: IMAGE_EDIT_MODEL, prompt, n (if given), size (if given),
    background (if given), response_format: "b64_json" (same rule)}`` then the image as file
    ``image`` (one data URL) or ``image[]`` (a list), named ``{uuid4}.png``; header
    ``Authorization`` only."""
    url, keys = guarded_app
    config = {  # Open WebUI's image settings for this service
        "IMAGES_OPENAI_API_BASE_URL": f"{url}/v1", "IMAGES_OPENAI_API_KEY": keys["normal"],
        "IMAGE_GENERATION_MODEL": "",  # unset: get_image_model answers "dall-e-2"
        "IMAGE_SIZE": "64x64",  # (default 512x512; the guarded app's max_side is 64)
        # Merged into the body as they are: the one way to pass our extensions, here to keep it short.
        "IMAGES_OPENAI_API_PARAMS": {"steps": 2, "prior_steps": 2},
    }
    headers = {"Authorization": f"Bearer {config['IMAGES_OPENAI_API_KEY']}", "Content-Type": "application/json"}
    data = {"model": config["IMAGE_GENERATION_MODEL"] or "dall-e-2", "prompt": "a red circle", "n": 2,
            "size": config["IMAGE_SIZE"], "response_format": "b64_json",  # "dall-e-2" !~ ^gpt-image
            **config["IMAGES_OPENAI_API_PARAMS"]}
    with httpx.Client(timeout=120) as client:
        r = client.post(f"{config['IMAGES_OPENAI_API_BASE_URL']}/images/generations", json=data, headers=headers)
        r.raise_for_status()
        res = r.json()
        generated = []
        for image in res["data"]:
            assert not image.get("url")  # b64_json asked: nothing to fetch
            image_data, _ = open_webui_image_data(image["b64_json"])
            generated.append(image_data)
        assert len(generated) == 2
        for image_data in generated:
            assert image_data.startswith(PNG_SIGNATURE)
            picture = Image.open(io.BytesIO(image_data))
            assert picture.format == "PNG" and picture.size == (64, 64)
        assert generated[0] != generated[1]  # seeds differ
        # With a wrong key it is refused, and Open WebUI's raise_for_status shows it.
        refused = client.post(f"{config['IMAGES_OPENAI_API_BASE_URL']}/images/generations", json=data,
                              headers={**headers, "Authorization": "Bearer ks-not-a-key"})
        assert refused.status_code == 401 and refused.json()["error"]["message"]

        # Editing the image just made (Open WebUI's edit_image tool passes its file, read back
        # as a data: URL). Edits have no IMAGES_OPENAI_API_PARAMS, so they run the default
        # steps: on the app without tight step caps (any Authorization is accepted there).
        edit_base = f"{served_app[0]}/v1"
        edit_headers = {"Authorization": "Bearer sk-open-webui"}
        edit_data = {"model": "dall-e-2", "prompt": "a blue square", "size": "64x64", "response_format": "b64_json"}
        for field in ("image", "image[]"):  # one image (a string), or a list of one
            files = [(field, (f"{uuid.uuid4()}.png", io.BytesIO(generated[0]), "image/png"))]
            r = client.post(f"{edit_base}/images/edits", data={key: str(value) for key, value in edit_data.items()},
                            files=files, headers=edit_headers)
            r.raise_for_status()
            res = r.json()
            assert len(res["data"]) == 1  # n not given: one
            image_data, _ = open_webui_image_data(res["data"][0]["b64_json"])
            assert image_data.startswith(PNG_SIGNATURE) and Image.open(io.BytesIO(image_data)).size == (64, 64)
            assert parse_mode(image_data) == "img2img"


def test_the_openai_sdk_raises_its_own_errors_and_accepts_its_own_fields(served_app):
    from openai import BadRequestError, OpenAI

    url, _ = served_app
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120.0)
    with pytest.raises(BadRequestError) as refused:
        client.images.generate(prompt="a red circle", size="100x64")
    assert refused.value.status_code == 400 and refused.value.body["param"] == "size"
    result = client.images.generate(prompt="a red circle", size="64x64", response_format="b64_json", quality="high",
                                    background="opaque", extra_body={"steps": 2, "prior_steps": 2})
    assert len(result.data) == 1 and result.model_extra["unsupported_fields"] == ["background"]


def test_the_openai_sdk_streams_partial_images_then_the_image(served_app):
    from openai import OpenAI

    url, _ = served_app
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120.0)
    # Long enough (about a second of denoising) for a preview to be made before the end: a
    # partial image is at most what was asked, fewer when the image is done first (as OpenAI's).
    stream = client.images.generate(prompt="a red circle", size="256x256", stream=True, partial_images=1,
                                    extra_body={"steps": 40, "prior_steps": 2, "seed": 3})
    events = list(stream)
    assert [event.type for event in events] == ["image_generation.partial_image", "image_generation.completed"]
    preview, final = (Image.open(io.BytesIO(base64.b64decode(event.b64_json))) for event in events)
    assert final.size == (256, 256) and max(preview.size) <= 128  # jobs.preview_max_side
    assert parse_mode(base64.b64decode(events[-1].b64_json)) == "text2img"


def test_the_openai_sdk_edits_with_and_without_a_mask_and_makes_variations(served_app):
    from openai import OpenAI

    url, _ = served_app
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120.0)
    buffer = io.BytesIO()
    Image.fromarray(native_image(url)).save(buffer, format="PNG")
    picture = ("picture.png", buffer.getvalue(), "image/png")
    mask = np.full((64, 64, 4), 255, np.uint8)
    mask[16:48, 16:48, 3] = 0  # transparent: edit here
    buffer = io.BytesIO()
    Image.fromarray(mask, "RGBA").save(buffer, format="PNG")
    extra = {"steps": 3, "prior_steps": 2, "seed": 5}
    inpainted = client.images.edit(image=picture, mask=("mask.png", buffer.getvalue(), "image/png"), prompt="a blue square",
                                   size="64x64", response_format="b64_json", extra_body=extra)
    edited = client.images.edit(image=picture, prompt="a blue square", size="64x64", response_format="b64_json",
                                extra_body={**extra, "strength": 0.5})
    varied = client.images.create_variation(image=picture, size="64x64", n=2, response_format="b64_json",
                                            extra_body={**extra, "prior_steps": 4, "strength": 0.5})
    modes = {}
    for name, result, count in (("inpaint", inpainted, 1), ("img2img", edited, 1), ("variations", varied, 2)):
        images = [pixels(base64.b64decode(item.b64_json)) for item in result.data]
        assert len(images) == count and all(image.shape == (64, 64, 3) for image in images)
        modes[name] = parse_mode(base64.b64decode(result.data[0].b64_json))
    assert modes == {"inpaint": "inpaint", "img2img": "img2img", "variations": "variations"}


def parse_mode(png: bytes) -> str:
    """The mode an image says it was made in (its embedded parameters)."""
    from serve.http.metadata import parse_parameters, read_parameters

    return parse_parameters(read_parameters(png))["Mode"]
