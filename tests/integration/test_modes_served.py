"""Every mode through the deployed graph (shared Ray instance), against diffusers, alone and concurrently."""

from __future__ import annotations

import asyncio

import pytest

from tests.reference import MAX_PIXEL_DIFF, decode_png, max_diff, reference_images
from tests.unit.test_modes import batch_tolerance, mode_specs

SERVED = [
    "img2img", "img2img-wide", "inpaint-wide-negative", "mix-two-texts-negative", "variations-prompt-negative",
    "controlnet", "controlnet-img2img", "text2img-unipc",
]


def _generate(handle, s, request_id="t"):
    return handle.generate.remote(s, request_id).result(timeout_s=120)


@pytest.mark.parametrize("name", SERVED)
def test_served_mode_matches_diffusers(served_app, tiny_checkpoint, name):
    _, handle = served_app
    s = mode_specs()[name]
    result = _generate(handle, s, f"parity-{name}")
    assert result.seeds == list(s.seeds)
    for data, reference in zip(result.images, reference_images(tiny_checkpoint, s), strict=True):
        assert max_diff(decode_png(data), reference) <= MAX_PIXEL_DIFF


def test_each_mode_reports_the_stages_it_went_through(served_app):
    _, handle = served_app
    specs = mode_specs()
    expected = {
        "img2img": {"text_encoder", "prior", "movq_encode", "denoiser", "movq"},
        "inpaint": {"text_encoder", "prior", "movq_encode", "denoiser_inpaint", "movq"},
        "mix-text-and-image": {"text_encoder", "image_encoder", "prior", "denoiser", "movq"},
        "variations": {"text_encoder", "image_encoder", "prior", "denoiser", "movq"},
        "controlnet": {"text_encoder", "prior", "denoiser_controlnet", "movq"},
    }
    for name, stages in expected.items():
        assert set(_generate(handle, specs[name]).timings) == stages, name


def test_every_mode_alone_equals_every_mode_concurrently(served_app):
    _, handle = served_app
    named = mode_specs()
    specs = list(named.values())
    alone = [[decode_png(data) for data in _generate(handle, s, f"alone{i}").images] for i, s in enumerate(specs)]

    async def together():
        return await asyncio.gather(*(handle.generate.remote(s, f"mixed{i}") for i, s in enumerate(specs)))

    results = asyncio.run(together())
    # Requests of different modes really shared the prior's and the denoiser's batches.
    assert max(r.timings["prior"].batch_size for r in results) > 1
    assert max(r.timings.get("denoiser", r.timings.get("prior")).batch_size for r in results) > 1
    for name, result, expected in zip(named, results, alone):
        for data, image in zip(result.images, expected, strict=True):
            assert max_diff(decode_png(data), image) <= batch_tolerance(name), name
