"""Generation parameters inside the returned images, as AUTOMATIC1111 tools read them."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from deployments.messages import EncodedImages
from serve.http.metadata import parameters_text, parse_parameters, read_parameters, stamped, with_parameters
from serve.settings import ServiceSettings
from tests.jobfakes import FakeJobBackend
from tests.unit.test_jobs_api import make_client

SPEC = SimpleNamespace(prompt="a red circle, «синий квадрат»", negative_prompt="blue", steps=5, guidance_scale=4.0,
                       width=64, height=64, strength=None, prior_steps=3, prior_guidance_scale=4.0, mode="text2img",
                       seeds=(42, 43), scheduler="ddpm", model="kandinsky-2-2")


def encoded(fmt: str, **options) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, media_type, options", [
    ("PNG", "image/png", {}), ("JPEG", "image/jpeg", {"quality": 90}),
    ("WEBP", "image/webp", {"quality": 80}), ("WEBP", "image/webp", {"lossless": True}),
])
def test_parameters_round_trip_through_pillow_and_the_pixels_stay_the_same(fmt, media_type, options):
    original = encoded(fmt, **options)
    text = parameters_text(SPEC, 42, "kandinsky-2-2", "0.1.0", "DDPM")
    carrying = with_parameters(original, media_type, text)
    assert carrying != original and read_parameters(carrying) == text
    before, after = (np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in (original, carrying))
    assert np.array_equal(before, after)
    assert read_parameters(original) is None


def test_the_text_is_a1111s_infotext_and_parses_back():
    text = parameters_text(SPEC, 42, "kandinsky-2-2", "0.1.0", "DDPM")
    assert text.splitlines()[:2] == ["a red circle, «синий квадрат»", "Negative prompt: blue"]
    fields = parse_parameters(text)
    assert fields["Prompt"] == SPEC.prompt and fields["Negative prompt"] == "blue"
    assert {k: fields[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Mode")} == {
        "Steps": "5", "Sampler": "DDPM", "CFG scale": "4", "Seed": "42", "Size": "64x64", "Model": "kandinsky-2-2",
        "Mode": "text2img"}
    assert fields["Version"] == "kandinsky-serve 0.1.0"


def test_each_image_carries_its_own_seed_and_the_setting_turns_it_off():
    from serve.graph.ingress import Ingress

    result = EncodedImages([encoded("PNG"), encoded("PNG")], "image/png", seeds=[42, 43])
    seeds = [parse_parameters(read_parameters(image))["Seed"] for image in stamped(result, SPEC, "m", "DDPM").images]
    assert seeds == ["42", "43"]
    ingress = SimpleNamespace(settings=ServiceSettings.model_validate({"outputs": {"embed_parameters": False}}))
    assert Ingress.func_or_class._stamped(ingress, SPEC, result) is result
    ingress.settings = ServiceSettings()
    assert read_parameters(Ingress.func_or_class._stamped(ingress, SPEC, result).images[0]) is not None


def test_png_info_reads_what_an_image_carries():
    text = parameters_text(SPEC, 42, "kandinsky-2-2", "0.1.0", "DDPM")
    image = base64.b64encode(with_parameters(encoded("PNG"), "image/png", text)).decode()
    client, _ = make_client(FakeJobBackend(step_s=0.002))
    with client:
        info = client.post("/sdapi/v1/png-info", json={"image": f"data:image/png;base64,{image}"}).json()
        plain = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(encoded("PNG")).decode()}).json()
        bad = client.post("/sdapi/v1/png-info", json={"image": "not an image"})
    assert info["info"] == text and info["items"] == {"parameters": text} and info["parameters"]["Seed"] == "42"
    assert plain == {"info": "", "items": {}, "parameters": {}}
    assert bad.status_code == 422 and "image" in bad.json()["error"]["message"]
