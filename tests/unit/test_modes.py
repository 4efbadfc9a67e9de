"""Every generation mode, wired by serve.graph.plan through the stage models in process, against diffusers' pipelines."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.messages import SCHEDULERS
from serve.http.schemas import MixItem
from serve.graph.local import BatchedCalls, LocalCalls
from tests.reference import MAX_PIXEL_DIFF, box_mask, max_diff, reference_images, solid_image, spec

PICTURE = solid_image(64, 64, seed=1)
WIDE = solid_image(128, 64, seed=3)
DEPTH = solid_image(64, 64, seed=2)


BATCH_TOLERANCE = {"text2img-dpmsolver++-karras": 2}
"""Pixel differences allowed between a request alone and batched with others, where more than
MAX_PIXEL_DIFF: Karras sigmas end on very small noise levels, where float32 rounding that
depends on the batch's shape (BLAS blocking) moves a few pixels by 2 at one thread."""


def batch_tolerance(name: str) -> int:
    return BATCH_TOLERANCE.get(name, MAX_PIXEL_DIFF)


def mode_specs() -> dict[str, object]:
    """One small request per mode and variant that the parity tests cover."""
    return {
        "img2img": spec(mode="img2img", image=PICTURE, strength=0.5),
        "img2img-negative-two-seeds": spec(mode="img2img", image=PICTURE, strength=0.7, negative_prompt="dog", seeds=(4, 5)),
        "img2img-wide": spec(mode="img2img", image=WIDE, width=128, height=64, strength=0.6),
        "img2img-ddim": spec(mode="img2img", image=PICTURE, strength=0.5, scheduler="ddim"),
        "img2img-dpmsolver++-sde": spec(mode="img2img", image=PICTURE, strength=0.5, scheduler="dpmsolver++-sde"),
        "inpaint": spec(mode="inpaint", image=PICTURE, mask=box_mask(64, 64)),
        "inpaint-wide-negative": spec(mode="inpaint", image=WIDE, mask=box_mask(128, 64), width=128, height=64, negative_prompt="red"),
        "mix-text-and-image": spec(mode="mix", prompt="", mix=(MixItem(0.4, text="a cat"), MixItem(0.6, image=PICTURE))),
        "mix-two-texts-negative": spec(
            mode="mix", prompt="", negative_prompt="dark",
            mix=(MixItem(0.5, text="a cat"), MixItem(0.3, text="a dog"), MixItem(0.2, image=WIDE)),
        ),
        "variations": spec(mode="variations", prompt="", image=PICTURE, strength=0.5),
        "variations-prompt-negative": spec(mode="variations", prompt="a cat", negative_prompt="dog", image=WIDE, strength=0.8),
        "controlnet": spec(mode="controlnet", hint=DEPTH),
        "controlnet-img2img": spec(mode="controlnet", hint=DEPTH, image=PICTURE, strength=0.6),
        **{f"text2img-{name}": spec(scheduler=name) for name in SCHEDULERS if name != "ddpm"},
    }


@pytest.fixture(scope="module")
def local(tiny_checkpoint):
    return LocalCalls(tiny_checkpoint)


@pytest.mark.parametrize("name", list(mode_specs()))
def test_mode_matches_its_diffusers_pipeline(local, tiny_checkpoint, name):
    s = mode_specs()[name]
    ours = local.generate(s)
    reference = reference_images(tiny_checkpoint, s)
    assert len(ours) == len(reference) == len(s.seeds)
    for mine, theirs in zip(ours, reference):
        assert mine.shape == (s.height, s.width, 3)
        assert max_diff(mine, theirs) <= MAX_PIXEL_DIFF
        assert mine.std() > 5  # a real picture, not a blank that would match any blank


def test_schedulers_give_different_images(local):
    images = {name: local.generate(spec(scheduler=name))[0] for name in SCHEDULERS}
    assert len({image.tobytes() for image in images.values()}) == len(SCHEDULERS)


def test_strength_and_mix_weights_change_the_result(local):
    low, high = (local.generate(spec(mode="img2img", image=PICTURE, strength=x))[0] for x in (0.2, 0.9))
    assert max_diff(low, high) > 10
    a, b = (
        local.generate(spec(mode="mix", prompt="", mix=(MixItem(w, text="a cat"), MixItem(1 - w, image=PICTURE))))[0]
        for w in (0.1, 0.9)
    )
    assert max_diff(a, b) > 10


def _border(image: np.ndarray, width: int = 8) -> np.ndarray:
    return np.concatenate([image[:width].ravel(), image[-width:].ravel(), image[:, :width].ravel(), image[:, -width:].ravel()])


def _centre(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return image[3 * h // 8 : 5 * h // 8, 3 * w // 8 : 5 * w // 8]


def test_inpainting_repaints_only_where_the_mask_is_white(local):
    """The kept region's latents are re-imposed exactly, so two different generations agree
    there (up to the decoder's spread across the mask edge) and differ where it repaints."""
    picture = solid_image(128, 128, seed=5)
    mask = box_mask(128, 128)  # white centre: repaint; black border: keep

    def run(seed, **extra):
        return local.generate(spec(mode="inpaint", image=picture, mask=mask, width=128, height=128, seeds=(seed,), **extra))[0]

    a, b = run(1), run(2, prompt="a blue square")
    border_change = np.abs(_border(a).astype(int) - _border(b).astype(int)).mean()
    centre_change = np.abs(_centre(a).astype(int) - _centre(b).astype(int)).mean()
    assert centre_change > 4 * border_change

    # Inverted: the centre is kept and the border repainted.
    inverted = spec(mode="inpaint", image=picture, mask=255 - mask, width=128, height=128)
    c = local.generate(inverted)[0]
    d = local.generate(spec(mode="inpaint", image=picture, mask=255 - mask, width=128, height=128, seeds=(2,), prompt="a blue square"))[0]
    border_change = np.abs(_border(c).astype(int) - _border(d).astype(int)).mean()
    centre_change = np.abs(_centre(c).astype(int) - _centre(d).astype(int)).mean()
    assert border_change > 4 * centre_change


def test_mask_blur_feathers_only_near_the_mask_edge(local):
    picture = solid_image(128, 128, seed=5)
    mask = box_mask(128, 128)
    sharp = local.generate(spec(mode="inpaint", image=picture, mask=mask, width=128, height=128))[0]
    soft = local.generate(spec(mode="inpaint", image=picture, mask=mask, width=128, height=128, mask_blur=6.0))[0]
    # Far inside the repaint region the generated pixels are untouched; outside, the original shows through.
    assert max_diff(_centre(sharp), _centre(soft)) <= 1
    assert np.abs(_border(soft, 4).astype(int) - _border(picture, 4).astype(int)).max() <= 1
    assert max_diff(sharp, soft) > 10


def test_every_mode_is_the_same_alone_and_batched_with_the_others(local):
    named = mode_specs()
    specs = list(named.values())
    batched = BatchedCalls(local)
    together = batched.run(specs)
    # The point: requests of different modes really shared each stage's batch.
    assert batched.batch_sizes["prior"] == len(specs) and batched.batch_sizes["encode"] >= 6
    for name, s, images in zip(named, specs, together):
        for mine, alone in zip(images, local.generate(s)):
            assert max_diff(mine, alone) <= batch_tolerance(name), name
