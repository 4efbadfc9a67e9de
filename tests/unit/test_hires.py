"""Hires fix: a first pass at the request's size, upscaled, denoised again at a strength —
exactly diffusers' image-to-image pipeline on the upscaled first image — and refused with a
422 naming the field when the output would pass the caps."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve.graph.local import LocalCalls
from serve.http.app import create_app
from serve.http.schemas import Hires, request_models
from serve.settings import ApiLimits
from tests.reference import MAX_PIXEL_DIFF, max_diff, reference_images, spec
from tests.unit.test_api import FakeBackend


def hires_spec(strength: float = 0.5, upscale: str = "pixel", **overrides):
    """64x64 first pass, 128x128 out."""
    return spec(width=128, height=128, hires=Hires(64, 64, strength, 6, upscale), **overrides)


@pytest.fixture(scope="module")
def local(tiny_checkpoint):
    return LocalCalls(tiny_checkpoint)


def _down(image: np.ndarray, side: int = 64) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), Image.BOX))


@pytest.mark.parametrize("overrides", [{}, {"seeds": (3, 4), "negative_prompt": "blue", "scheduler": "dpmsolver++"}])
def test_hires_is_diffusers_img2img_on_the_upscaled_first_pass(local, tiny_checkpoint, overrides):
    """The first pass is diffusers' text-to-image (within 1/255, as every mode), and the output
    is diffusers' image-to-image on that first image, resized: each pass checked on its own
    input, so that a first-pass pixel off by one is not counted twice."""
    s = hires_spec(**overrides)
    ours = local.generate(s)
    first = local.generate(replace(s, width=64, height=64, hires=None))
    for mine, theirs in zip(first, reference_images(tiny_checkpoint, replace(s, width=64, height=64, hires=None))):
        assert max_diff(mine, theirs) <= MAX_PIXEL_DIFF
    for mine, base, seed in zip(ours, first, s.seeds, strict=True):
        second = replace(s, mode="img2img", image=base, strength=s.hires.strength, steps=s.hires.steps, seeds=(seed,),
                         hires=None)
        [theirs] = reference_images(tiny_checkpoint, second)
        assert mine.shape == (128, 128, 3)
        assert max_diff(mine, theirs) <= MAX_PIXEL_DIFF


def test_each_image_is_refined_from_its_own_first_pass():
    """On the embedded model (its MOVQ encodes what it decodes): at a low strength each
    output, shrunk back, is nearer its own first pass than the other image's."""
    from serve.embedded import embedded_checkpoint
    from serve.settings import default_cache_dir

    embedded = LocalCalls(embedded_checkpoint(default_cache_dir()))
    s = hires_spec(strength=0.2, prompt="a red circle on a white background", seeds=(5, 6))
    bases = embedded.generate(replace(s, width=64, height=64, hires=None))
    refined = [_down(image) for image in embedded.generate(s)]
    own = [np.abs(r.astype(float) - b).mean() for r, b in zip(refined, bases)]
    other = [np.abs(r.astype(float) - b).mean() for r, b in zip(refined, bases[::-1])]
    assert max(own) < min(other), (own, other)


def test_latent_upscale_runs_at_the_output_size_and_differs_from_pixel(local):
    latent, pixel = local.generate(hires_spec(upscale="latent"))[0], local.generate(hires_spec())[0]
    assert latent.shape == pixel.shape == (128, 128, 3)
    assert max_diff(latent, pixel) > 10
    assert local.generate(hires_spec(upscale="latent"))[0].tobytes() == latent.tobytes()  # reproducible


def text2img(limits: ApiLimits, **fields):
    return request_models(limits)["text2img"].model_validate({"prompt": "a cat", **fields}).to_spec()


def test_the_request_field_makes_the_spec():
    s = text2img(ApiLimits(), width=512, height=384, steps=30, hires={"scale": 1.5, "strength": 0.4})
    assert (s.width, s.height) == (768, 576) and s.hires == Hires(512, 384, 0.4, 30, "pixel")
    s = text2img(ApiLimits(max_side=2048, max_output_pixels=2048 * 2048), width=512, height=512,
                 hires={"scale": 4, "steps": 20, "upscale": "latent"})
    assert (s.width, s.height) == (2048, 2048) and s.hires.steps == 20 and s.hires.upscale == "latent"


@pytest.mark.parametrize("body, field, words", [
    ({"width": 512, "height": 512, "hires": {"scale": 2.5}}, "hires.scale", "max_side"),
    ({"width": 512, "height": 512, "hires": {"scale": 9}}, "hires.scale", "less than or equal to 4"),
    ({"width": 512, "height": 512, "hires": {"scale": 1.0}}, "hires.scale", "greater than 1"),
    ({"width": 512, "height": 512, "hires": {"scale": 1.5, "strength": 0.01}}, "hires.strength", "no denoising step"),
    ({"width": 512, "height": 512, "hires": {"scale": 1.5, "steps": 999}}, "hires.steps", "150"),
    ({"width": 512, "height": 512, "hires": {"scale": 1.5, "upscale": "nearest"}}, "hires.upscale", "pixel"),
    ({"width": 96, "height": 512}, "width", "multiple of 64"),
    ({"width": 1088, "height": 512}, "width", "1024"),
])
def test_bad_hires_requests_are_refused_naming_the_field_before_any_model_runs(body, field, words):
    backend = FakeBackend()
    client = TestClient(create_app(ApiLimits(), backend))
    response = client.post("/v1/text2img", json={"prompt": "a cat", **body})
    assert response.status_code == 422, response.text
    [detail] = response.json()["error"]["details"]
    assert detail["field"] == field and words in detail["message"], detail
    assert backend.calls == []


def test_the_output_pixel_cap_applies_to_the_upscaled_size():
    with pytest.raises(ValueError, match="max_output_pixels"):
        text2img(ApiLimits(max_side=2048, max_output_pixels=1024 * 1024), width=512, height=512, hires={"scale": 3})
