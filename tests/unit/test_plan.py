"""serve.graph.plan with fake stage calls: which texts go where, by name, and the result's story."""

from __future__ import annotations

import asyncio

import numpy as np

from deployments.messages import (
    ClipImageEmbeddings,
    EncodedImages,
    ImageEmbeddings,
    Latents,
    StageTiming,
    TextEmbeddings,
    TextRows,
)
from serve.graph.plan import plan
from serve.http.schemas import MixItem
from tests.reference import solid_image, spec


def _timing(batch_size: int) -> dict:
    return StageTiming(1.0, 2.0, batch_size)


class RecordingCalls:
    """Stage calls that record what they were given; each output carries only its own timing."""

    async def encode_text(self, texts, request_id):
        self.texts = list(texts)
        n = len(texts)
        return TextEmbeddings(np.zeros((n, 4)), np.zeros((n, 3, 4)), np.ones((n, 3), bool),
                              {"text_encoder": _timing(1)}, ("prompt truncated",))

    async def embed_images(self, images, request_id):
        return ClipImageEmbeddings(np.zeros((len(images), 4)), {"image_encoder": _timing(2)})

    async def prior(self, text, params, images=None):
        self.prior_params = params
        n = len(params.seeds)
        return ImageEmbeddings(np.zeros((n, 4)), np.zeros((n, 4)), list(params.seeds), {"prior": _timing(3)})

    async def encode_image(self, image):
        raise AssertionError("text-to-image and mixing encode no input image")

    async def denoise(self, decoder, embeddings, params, init=None, hint=None):
        self.decoder = decoder
        return Latents(np.zeros((embeddings.count, 4, 8, 8)), {"denoiser": _timing(4)})

    async def decode(self, latents, params):
        return EncodedImages([b"png"] * latents.count, "image/png", timings={"movq": _timing(5)})


def test_text2img_names_the_prompt_rows_and_collects_every_stages_timing_seeds_and_notes():
    calls = RecordingCalls()
    result = asyncio.run(plan(spec(negative_prompt="blurry", seeds=(3, 4)), calls, "r1"))
    rows = calls.prior_params.rows
    assert calls.texts[rows.prompt] == "a red circle" and calls.texts[rows.negative] == "blurry"
    assert rows.unconditional == rows.negative  # guidance pushes away from the negative prompt
    assert calls.decoder == "text2img"
    assert result.seeds == [3, 4] and result.images == [b"png", b"png"]
    assert {key: timing.batch_size for key, timing in result.timings.items()} == {
        "text_encoder": 1, "prior": 3, "denoiser": 4, "movq": 5}
    assert result.notes == ("prompt truncated",)


def test_without_a_negative_prompt_the_unconditional_row_is_the_empty_text():
    calls = RecordingCalls()
    asyncio.run(plan(spec(), calls, "r2"))
    rows = calls.prior_params.rows
    assert rows == TextRows.pair(False) and rows.negative is None and calls.texts[rows.unconditional] == ""


def test_a_mix_names_its_unconditional_and_negative_rows_after_its_text_items():
    calls = RecordingCalls()
    items = (MixItem(0.5, text="a red circle"), MixItem(0.3, image=solid_image(64, 64)), MixItem(0.2, text="a blue square"))
    result = asyncio.run(plan(spec(mode="mix", prompt="", mix=items, negative_prompt="dark"), calls, "r3"))
    params = calls.prior_params
    assert [calls.texts[term.index] for term in params.mix if term.source == "text"] == ["a red circle", "a blue square"]
    assert calls.texts[params.rows.unconditional] == "" and calls.texts[params.rows.negative] == "dark"
    assert set(result.timings) == {"text_encoder", "image_encoder", "prior", "denoiser", "movq"}
