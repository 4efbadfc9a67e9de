"""Kandinsky 2.1 through the stage models in process, against diffusers' own 2.1 pipelines.

The 2.1 decoder's U-Net is conditioned on its own multilingual text encoding as well as on the
prior's image embedding; the same denoiser loop serves it (one scheduler and generator per
image, images at different steps sharing a forward pass).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from deployments.denoiser import DenoiserModel
from deployments.messages import DenoiseParams, ImageEmbeddings, TextEmbeddings
from serve.http.schemas import MixItem
from serve.graph.local import LocalCalls
from tests.reference import MAX_PIXEL_DIFF, box_mask, max_diff, reference_images_21, solid_image, spec

PICTURE = solid_image(64, 64, seed=1)
WIDE = solid_image(128, 64, seed=3)


def mode_specs() -> dict[str, object]:
    """The modes diffusers offers for 2.1: text-to-image, image-to-image, inpainting, mixing."""
    return {
        "text2img": spec(),
        "text2img-ddim-negative-two-seeds": spec(scheduler="ddim", negative_prompt="blue", seeds=(4, 5)),
        "text2img-no-guidance": spec(guidance_scale=1.0, scheduler="ddim"),
        "text2img-wide-dpmsolver++": spec(width=128, height=64, scheduler="dpmsolver++"),
        "img2img": spec(mode="img2img", image=PICTURE, strength=0.5, scheduler="ddim"),
        "img2img-negative-ddpm": spec(mode="img2img", image=PICTURE, strength=0.8, negative_prompt="dog"),
        "inpaint": spec(mode="inpaint", image=PICTURE, mask=box_mask(64, 64), scheduler="ddim"),
        "inpaint-wide-negative": spec(mode="inpaint", image=WIDE, mask=box_mask(128, 64), width=128, height=64,
                                      negative_prompt="red"),
        "mix-text-and-image": spec(mode="mix", prompt="", mix=(MixItem(0.4, text="a cat"), MixItem(0.6, image=PICTURE)),
                                   scheduler="ddim"),
    }


@pytest.fixture(scope="module")
def local21(tiny_checkpoint_21):
    return LocalCalls(tiny_checkpoint_21)


def test_the_tiny_21_checkpoint_is_the_published_layout(tiny_checkpoint_21):
    import json

    names = [path.name for path in tiny_checkpoint_21]
    assert names == ["kandinsky-2-1-prior", "kandinsky-2-1", "kandinsky-2-1-inpaint"]
    index = json.loads((tiny_checkpoint_21.decoder / "model_index.json").read_text())
    assert index["_class_name"] == "KandinskyPipeline"
    assert index["text_encoder"] == ["kandinsky", "MultilingualCLIP"]
    assert index["tokenizer"][1] == "XLMRobertaTokenizer"
    assert index["scheduler"][1] == "DDIMScheduler"
    assert json.loads((tiny_checkpoint_21.inpaint_decoder / "unet" / "config.json").read_text())["in_channels"] == 9
    assert not list(tiny_checkpoint_21.decoder.rglob("*.bin"))


@pytest.mark.parametrize("name", list(mode_specs()))
def test_21_mode_matches_its_diffusers_pipeline(local21, tiny_checkpoint_21, name):
    s = mode_specs()[name]
    ours = local21.generate(s)
    reference = reference_images_21(tiny_checkpoint_21, s)
    assert len(ours) == len(reference) == len(s.seeds)
    for mine, theirs in zip(ours, reference):
        assert mine.shape == (s.height, s.width, 3)
        assert max_diff(mine, theirs) <= MAX_PIXEL_DIFF
        assert mine.std() > 5  # a real picture, not a blank that would match any blank


def test_the_21_decoder_reads_the_prompt_and_the_negative_prompt(local21):
    base = local21.generate(spec())[0]
    # The prior sees the same texts in both; only the decoder's own text encoding differs.
    other_prompt = local21.generate(spec(prompt="a blue square"))[0]
    with_negative = local21.generate(spec(negative_prompt="green"))[0]
    assert max_diff(base, other_prompt) > 10 and max_diff(base, with_negative) > 10


def test_a_21_decoder_refuses_a_start_without_its_text(local21):
    model = local21.decoders["text2img"]
    embeddings = ImageEmbeddings(np.zeros((1, 32), np.float32), np.zeros((1, 32), np.float32), [0])
    params = DenoiseParams(64, 64, 3, 4.0)
    with pytest.raises(ValueError, match="2.1 decoder needs its text"):
        model.start_all(embeddings, params)
    model.health_probe()


def _states(local21, s, seed_offset=0):
    """One request's denoiser states (prior run in process), for driving steps by hand."""
    decoder_text = TextEmbeddings(*local21.decoder_text.encode([s.prompt, s.negative_prompt or ""]))
    text = asyncio.run(local21.encode_text([s.prompt, s.negative_prompt or ""], "r"))
    from deployments.messages import PriorParams, TextRows

    prior_params = PriorParams(tuple(s.seeds), s.prior_steps, s.prior_guidance_scale, TextRows.pair(s.negative_prompt is not None))
    embeddings = asyncio.run(local21.prior(text, prior_params))
    params = DenoiseParams(s.height, s.width, s.steps, s.guidance_scale, scheduler=s.scheduler)
    return local21.decoders["text2img"].start_all(embeddings, params, None, None, decoder_text)


def test_21_images_are_the_same_alone_and_joined_mid_flight(local21):
    model = local21.decoders["text2img"]
    first = spec(prompt="a red circle", seeds=(1,), steps=6, scheduler="ddim")
    second = spec(prompt="a green cat", negative_prompt="dark", seeds=(2, 3), steps=6, scheduler="ddpm")

    def alone(s):
        states = _states(local21, s)
        while not all(state.finished for state in states):
            model.step(states)
        return model.finish_all(states)

    expected_first, expected_second = alone(first), alone(second)
    a, b = _states(local21, first), _states(local21, second)
    for _ in range(2):  # the first request runs two steps alone, then the second joins its batch
        model.step(a)
    while not all(state.finished for state in a + b):
        model.step([state for state in a + b if not state.finished])
    # Batched matmuls round differently from lone ones (~1e-5 here); the images must agree.
    for joined, expected in ((model.finish_all(a), expected_first), (model.finish_all(b), expected_second)):
        np.testing.assert_allclose(joined, expected, rtol=1e-3, atol=1e-3)
        for mine, theirs in zip(local21.movq.decode(joined), local21.movq.decode(expected)):
            assert max_diff(mine, theirs) <= MAX_PIXEL_DIFF
    assert np.abs(model.finish_all(b)[0] - model.finish_all(b)[1]).max() > 1e-1  # two seeds, two images


def test_the_21_img2img_strength_changes_the_result(local21):
    weak = local21.generate(spec(mode="img2img", image=PICTURE, strength=0.3))[0]
    strong = local21.generate(spec(mode="img2img", image=PICTURE, strength=0.9))[0]
    assert max_diff(weak, strong) > 10
    # A weak strength keeps closer to the input picture.
    distance = lambda image: np.abs(image.astype(int) - PICTURE.astype(int)).mean()  # noqa: E731
    assert distance(weak) < distance(strong)


def test_2_2_decoders_take_no_21_text(tiny_checkpoint):
    model = DenoiserModel.from_pretrained(tiny_checkpoint.decoder)
    assert not model.text_conditioned
    text = TextEmbeddings(np.zeros((2, 32), np.float32), np.zeros((2, 77, 32), np.float32), np.ones((2, 77), bool))
    embeddings = ImageEmbeddings(np.zeros((1, 32), np.float32), np.zeros((1, 32), np.float32), [0])
    with pytest.raises(ValueError, match="takes no text"):
        model.start_all(embeddings, DenoiseParams(64, 64, 3, 4.0), None, None, text)


def test_every_21_mode_is_the_same_alone_and_batched_with_the_others(local21):
    from serve.graph.local import BatchedCalls

    specs = [replace(s, family="2.1") for s in mode_specs().values()]
    batched = BatchedCalls(local21)
    together = batched.run(specs)
    assert batched.batch_sizes["prior"] == len(specs) and batched.batch_sizes["denoise"] >= 6
    for s, images in zip(specs, together):
        for mine, alone in zip(images, local21.generate(s)):
            assert max_diff(mine, alone) <= MAX_PIXEL_DIFF


def test_the_21_text_encoder_reads_77_tokens_and_says_when_it_cut_a_prompt(local21):
    encoder = local21.decoder_text
    long = " ".join(["red circle"] * 60)
    _, hidden, mask = encoder.encode([long, "a cat"])
    assert hidden.shape[1] == 77 and mask[0].all() and not mask[1].all()
    [note] = encoder.truncated([long, "a cat"])
    assert "the 2.1 decoder's text encoder reads only the first 77" in note
