"""Stage model classes against diffusers' pipelines, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.denoiser import DenoiserModel
from deployments.messages import DenoiseParams, ImageEmbeddings, PriorParams, TextEmbeddings, TextRows
from deployments.movq import MovqModel, encode_image
from deployments.prior import PriorModel
from deployments.text_encoder import TextEncoderModel
from tests.reference import MAX_PIXEL_DIFF, decode_png, max_diff, reference_images, spec


class LocalGraph:
    """The four stage models chained in one process, as the ingress chains the deployments."""

    def __init__(self, prior_path, decoder_path):
        self.text = TextEncoderModel.from_pretrained(prior_path)
        self.prior = PriorModel.from_pretrained(prior_path)
        self.denoiser = DenoiserModel.from_pretrained(decoder_path)
        self.movq = MovqModel.from_pretrained(decoder_path)

    def embeddings(self, s):
        texts = [s.prompt, s.negative_prompt if s.negative_prompt is not None else ""]
        return TextEmbeddings(*self.text.encode(texts))

    def run_batch(self, specs):
        """Every spec through every stage, all in one batch per stage."""
        prior_jobs = [
            (self.embeddings(s), PriorParams(s.seeds, s.prior_steps, s.prior_guidance_scale, TextRows.pair(s.negative_prompt is not None)))
            for s in specs
        ]
        embeds = self.prior.generate(prior_jobs)
        denoise_jobs = [
            (ImageEmbeddings(e, n, list(s.seeds)), DenoiseParams(s.height, s.width, s.steps, s.guidance_scale))
            for (e, n), s in zip(embeds, specs)
        ]
        latents = self.denoiser.generate(denoise_jobs)
        return self.movq.decode_many(latents)


@pytest.fixture(scope="module")
def graph(tiny_checkpoint):
    return LocalGraph(tiny_checkpoint.prior, tiny_checkpoint.decoder)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"negative_prompt": "blue square"},
        {"negative_prompt": ""},  # "" is a real negative prompt for the reference, not "no negative"
        {"width": 128, "height": 64, "seeds": (3, 4)},
        {"prior_guidance_scale": 1.0, "guidance_scale": 1.0},  # no classifier-free guidance at all
        {"negative_prompt": "dog", "prior_guidance_scale": 1.0},
    ],
)
def test_models_match_diffusers_pipelines(graph, tiny_checkpoint, overrides):
    s = spec(**overrides)
    [ours] = graph.run_batch([s])
    reference = reference_images(tiny_checkpoint, s)
    assert len(ours) == len(reference) == len(s.seeds)
    for mine, theirs in zip(ours, reference):
        assert mine.shape == (s.height, s.width, 3)
        assert max_diff(mine, theirs) <= MAX_PIXEL_DIFF
        assert mine.std() > 0  # not a blank image that would match anything blank


def test_result_does_not_depend_on_batch_mates(graph):
    target = spec(seeds=(5,), negative_prompt="green")
    mates = [
        spec(prompt="a cat", seeds=(1, 2)),
        spec(prompt="a dog", width=128, seeds=(9,)),
        spec(prompt="a tree", steps=3, prior_steps=2, seeds=(4,)),
        spec(prompt="a boat", guidance_scale=1.0, seeds=(6,)),
    ]
    [alone] = graph.run_batch([target])
    together = graph.run_batch([mates[0], target, *mates[1:]])
    assert max_diff(alone[0], together[1][0]) <= MAX_PIXEL_DIFF


def test_different_seeds_give_different_images(graph):
    [images] = graph.run_batch([spec(seeds=(1, 2))])
    assert max_diff(images[0], images[1]) > 10


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_encode_image_formats(fmt, magic):
    pixels = (np.arange(64 * 64 * 3) % 251).astype("uint8").reshape(64, 64, 3)
    data = encode_image(pixels, fmt)
    assert data.startswith(magic)
    if fmt == "png":
        assert np.array_equal(decode_png(data), pixels)  # lossless


def test_encode_image_rejects_unknown_format():
    with pytest.raises(ValueError, match="output_format"):
        encode_image(np.zeros((8, 8, 3), "uint8"), "gif")


def test_step_batching_joining_mid_flight_gives_the_same_image(graph):
    """A request that joins a batch already at a later timestep still draws exactly its own image."""
    import asyncio

    from deployments.batching import StepScheduler

    target = spec(seeds=(5,), steps=8)
    early = spec(prompt="a blue square", seeds=(6, 7), steps=12)
    s = target
    [(embeds, negative)] = graph.prior.generate(
        [(graph.embeddings(s), PriorParams(s.seeds, s.prior_steps, s.prior_guidance_scale))]
    )
    [(e_embeds, e_negative)] = graph.prior.generate(
        [(graph.embeddings(early), PriorParams(early.seeds, early.prior_steps, early.prior_guidance_scale))]
    )
    params = DenoiseParams(s.height, s.width, s.steps, s.guidance_scale)
    alone = graph.denoiser.generate([(ImageEmbeddings(embeds, negative, list(s.seeds)), params)])[0]

    async def joined():
        batches = []

        async def step(states):
            batches.append(len(states))
            graph.denoiser.step(states)
            await asyncio.sleep(0)

        scheduler = StepScheduler(step, max_batch=8)
        early_states = graph.denoiser.start_all(
            ImageEmbeddings(e_embeds, e_negative, list(early.seeds)), DenoiseParams(64, 64, early.steps, 4.0)
        )
        running = [asyncio.ensure_future(scheduler.submit(st, total_steps=st.total_steps)) for st in early_states]
        while len(batches) < 3:  # the early request is three steps in
            await asyncio.sleep(0)
        states = graph.denoiser.start_all(ImageEmbeddings(embeds, negative, list(s.seeds)), params)
        [item] = await asyncio.gather(*(scheduler.submit(st, total_steps=st.total_steps) for st in states))
        await asyncio.gather(*running)
        return graph.denoiser.finish_all(states), item

    latents, item = asyncio.run(joined())
    assert item.max_batch_size == 3, "the target must have shared steps with the two early images"
    assert max_diff(graph.movq.decode(latents)[0], graph.movq.decode(alone)[0]) <= MAX_PIXEL_DIFF
