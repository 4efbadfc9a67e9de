"""``caption_check``: one more plan stage after decoding — each image's Florence-2 caption and
its CLIP similarity to the prompt — checked against the models run directly, without Ray."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from deployments.florence2 import Florence2Model
from deployments.image_encoder import ImageEncoderModel
from deployments.messages import (
    CAPTION_TASK, CaptionCheck, ClipImageEmbeddings, EncodedImages, Florence2Request, StageTiming, UnderstandingAnswer,
)
from deployments.registry import GENERATION_STAGES, understanding_stage
from deployments.text_encoder import TextEncoderModel
from serve.graph.local import LocalCalls
from serve.graph.plan import caption_check
from serve.http.catalog import ModelCatalog
from serve.http.errors import ApiError
from serve.http.schemas import MixItem, REQUEST_MODELS
from tests.reference import solid_image, spec


@pytest.fixture(scope="module")
def local(tiny_checkpoint, tiny_florence2):
    return LocalCalls(tiny_checkpoint, florence2=tiny_florence2)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_each_image_gets_florence2s_caption_and_its_clip_similarity_to_the_prompt(local, tiny_checkpoint, tiny_florence2):
    request = spec(prompt="a red square", seeds=(3, 4), caption_check=True)
    result = asyncio.run(_plan(local, request))
    assert len(result.checks) == 2 and len(result.images) == 2

    florence = Florence2Model.from_pretrained(tiny_florence2)
    prompt = TextEncoderModel.from_pretrained(tiny_checkpoint[0]).encode(["a red square"])[0][0]
    embeds = ImageEncoderModel.from_pretrained(tiny_checkpoint[0]).embed(list(result.images))
    for image, embed, check in zip(result.images, embeds, result.checks):
        [answer] = florence.run([Florence2Request(image, CAPTION_TASK)])
        assert check.caption == answer["text"]
        assert check.clip_similarity == pytest.approx(_cosine(prompt, embed), abs=1e-5)


def test_the_check_leaves_the_images_as_they_were(local):
    request = spec(prompt="a blue circle", seeds=(7,))
    checked = asyncio.run(_plan(local, replace(request, caption_check=True)))
    plain = asyncio.run(_plan(local, request))
    assert plain.checks is None
    assert np.array_equal(checked.images[0], plain.images[0])


def test_mix_has_captions_but_no_prompt_to_compare_with(local):
    request = spec(mode="mix", prompt="", mix=(MixItem(0.5, text="a cat"), MixItem(0.5, image=solid_image(64, 64, seed=1))),
                   caption_check=True)
    result = asyncio.run(_plan(local, request))
    [check] = result.checks
    assert check.clip_similarity is None and isinstance(check.caption, str)


async def _plan(calls, request):
    from serve.graph.plan import plan

    return await plan(request, calls, "test")


class FakeCalls:
    """Records what the check sends; answers with fixed embeddings and captions."""

    def __init__(self, embeds: np.ndarray) -> None:
        self.embeds = embeds
        self.captioned: list[np.ndarray] = []
        self.embedded: list[np.ndarray] = []

    async def caption(self, image, request_id):
        self.captioned.append(image)
        timing = StageTiming(1.0, float(len(self.captioned)), 2)
        return UnderstandingAnswer({"task": CAPTION_TASK, "text": f"image {len(self.captioned)}"}, {"florence2": timing})

    async def embed_images(self, images, request_id):
        self.embedded = list(images)
        return ClipImageEmbeddings(self.embeds[: len(images)], {"image_encoder": StageTiming(0.5, 2.0, 1)})


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_encoded_images_are_checked_as_the_client_gets_them():
    images = [solid_image(32, 16, seed=1), solid_image(16, 32, seed=2)]
    calls = FakeCalls(np.array([[1.0, 0.0], [1.0, 1.0]], np.float32))
    decoded = EncodedImages([_png(image) for image in images], "image/png")
    checks, timings = asyncio.run(caption_check(decoded, np.array([2.0, 0.0], np.float32), calls, "r"))

    for sent, image in zip(calls.captioned, images):
        assert np.array_equal(sent, image)
    assert [np.array_equal(sent, image) for sent, image in zip(calls.embedded, images)] == [True, True]
    assert checks == [CaptionCheck("image 1", pytest.approx(1.0)), CaptionCheck("image 2", pytest.approx(2 ** -0.5))]
    # The slowest image's caption call stands for the stage; the embedding under its own key.
    assert timings["caption_check"].compute_ms == 2.0 and timings["caption_check_embed"].compute_ms == 2.0


def test_without_a_prompt_no_image_is_embedded():
    calls = FakeCalls(np.ones((1, 2), np.float32))
    decoded = EncodedImages([solid_image(16, 16, seed=1)], "raw")
    checks, timings = asyncio.run(caption_check(decoded, None, calls, "r"))
    assert checks == [CaptionCheck("image 1", None)] and calls.embedded == [] and "caption_check_embed" not in timings


def test_caption_check_without_the_florence2_stage_is_a_404_naming_the_field_and_the_setting():
    request = REQUEST_MODELS["text2img"].model_validate({"prompt": "a cat", "caption_check": True})
    graph = {stage.name for stage in GENERATION_STAGES}
    without = ModelCatalog.serving(("2.2",), graph).resolve(None, "text2img")
    with pytest.raises(ApiError) as refused:
        without.apply(request.to_spec())
    stage = understanding_stage("caption")
    assert refused.value.status == 404 and refused.value.kind == "mode_not_configured"
    assert refused.value.details[0]["field"] == "caption_check" and stage.path_field in refused.value.message

    served = ModelCatalog.serving(("2.2",), {*graph, stage.name}).resolve(None, "text2img")
    assert served.apply(request.to_spec()).caption_check is True
    # Not asked for: nothing to refuse.
    assert without.apply(replace(request.to_spec(), caption_check=False)).caption_check is False
