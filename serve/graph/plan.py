"""How one request of any mode flows through the stages — written once.

:func:`plan` wires a :class:`~serve.http.schemas.GenerationSpec` through a
:class:`StageCalls`: the ingress passes calls on Ray DeploymentHandles, tests pass
calls that run the stage models in process. Either way the same messages flow in
the same order, and independent calls (text encoding, image embedding, MOVQ
encoding of an input image) run concurrently.

Each call is awaited before its output goes on to the next stage, rather than
chaining Ray ``DeploymentResponse`` objects replica to replica: in Ray Serve 2.60 a
chained call whose upstream replica's node died is retried by the downstream router
forever (the request hangs), while an awaited call fails at once and can be retried
on another replica. What comes back between stages is small (embeddings; latents of
tens to hundreds of KB) next to the final images.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from collections.abc import Awaitable
from typing import Any, Protocol

import numpy as np

from deployments.registry import FAMILIES, denoiser_of_mode
from deployments.messages import (
    CaptionCheck, Composite, DecodeParams, DenoiseParams, EncodedImages, InitImage, MixTerm, PriorParams, StageTiming,
    TextRows, UpscaleParams,
)
from serve.http.schemas import GenerationSpec

# Which decoder U-Net variant serves each mode of each family; each has its own deployment
# and batches only with itself.
DECODER_OF_MODE = {(family, mode): denoiser_of_mode(mode, family).variant for family, modes in FAMILIES.items() for mode in modes}


class StageCalls(Protocol):
    """One awaitable call per stage method, returning the stage's output message. One
    StageCalls serves one model family (the family's own deployments)."""

    def encode_text(self, texts: list[str], request_id: str) -> Awaitable[Any]: ...

    def encode_decoder_text(self, texts: list[str], request_id: str) -> Awaitable[Any]:
        """Kandinsky 2.1 only: the decoder's own (multilingual) text encoder."""
        ...

    def embed_images(self, images: list[np.ndarray], request_id: str) -> Awaitable[Any]: ...

    def prior(self, text: Any, params: PriorParams, images: Any = None) -> Awaitable[Any]: ...

    def encode_image(self, image: InitImage) -> Awaitable[Any]: ...

    def denoise(
        self, decoder: str, embeddings: Any, params: DenoiseParams, init: Any = None, hint: np.ndarray | None = None,
        text: Any = None,
    ) -> Awaitable[Any]: ...

    def decode(self, latents: Any, params: DecodeParams) -> Awaitable[Any]: ...

    def upscale(self, latents: Any, params: UpscaleParams) -> Awaitable[Any]:
        """Hires fix: the latents at the output size (one row per image), as input latents."""
        ...

    def caption(self, image: np.ndarray, request_id: str) -> Awaitable[Any]:
        """Florence-2's brief caption of one (H, W, 3) uint8 image (an ``UnderstandingAnswer``)."""
        ...


async def _none() -> None:
    return None


async def plan(spec: GenerationSpec, calls: StageCalls, request_id: str) -> Any:
    """Run every stage call of ``spec``; return the MOVQ's images with the request's seeds,
    every stage's timing and the text encoder's notes."""
    seeds = tuple(spec.seeds)
    images = None
    if spec.mode == "mix":
        # Texts: the text items, then "" (the unconditional text), then the negative prompt.
        # As KandinskyV22PriorPipeline.interpolate, "" as negative prompt means none.
        has_negative = bool(spec.negative_prompt)
        item_texts = [item.text for item in spec.mix if item.text is not None]
        text = calls.encode_text([*item_texts, "", *([spec.negative_prompt] if has_negative else [])], request_id)
        rows = TextRows(unconditional=len(item_texts), negative=len(item_texts) + 1 if has_negative else None)
        item_images = [item.image for item in spec.mix if item.image is not None]
        if item_images:
            images = calls.embed_images(item_images, request_id)
        terms, text_index, image_index = [], 0, 0
        for item in spec.mix:
            if item.text is not None:
                terms.append(MixTerm("text", text_index, item.weight))
                text_index += 1
            else:
                terms.append(MixTerm("image", image_index, item.weight))
                image_index += 1
        prior_params = PriorParams(
            seeds, spec.prior_steps, spec.prior_guidance_scale, rows, request_id, mix=tuple(terms), model=spec.prior_model
        )
    else:
        has_negative = spec.negative_prompt is not None
        text = calls.encode_text([spec.prompt, spec.negative_prompt if has_negative else ""], request_id)
        prior_strength = None
        if spec.mode == "variations":
            images = calls.embed_images([spec.image], request_id)
            prior_strength = spec.strength
        prior_params = PriorParams(
            seeds, spec.prior_steps, spec.prior_guidance_scale, TextRows.pair(has_negative), request_id,
            strength=prior_strength, model=spec.prior_model,
        )
    init = None
    decoder_strength = None
    if spec.mode in ("img2img", "inpaint") or (spec.mode == "controlnet" and spec.image is not None):
        mask = spec.mask if spec.mode == "inpaint" else None
        init = calls.encode_image(InitImage(spec.image, spec.width, spec.height, mask, request_id))
        decoder_strength = None if spec.mode == "inpaint" else spec.strength
    decoder_text = None
    if spec.family == "2.1":
        # 2.1's U-Net also reads the prompt through its own encoder: [prompt, negative or ""].
        decoder_text = calls.encode_decoder_text([spec.prompt, spec.negative_prompt or ""], request_id)
    # The first wave is independent: encoders run side by side.
    text, images, init, decoder_text = await asyncio.gather(
        text, images or _none(), init or _none(), decoder_text or _none())
    embeddings = await calls.prior(text, prior_params, images)
    # Hires fix: the first pass runs at the request's own size, the output is larger.
    width, height = (spec.hires.width, spec.hires.height) if spec.hires else (spec.width, spec.height)
    denoise_params = DenoiseParams(height, width, spec.steps, spec.guidance_scale, request_id, spec.scheduler, decoder_strength)
    hint = spec.hint if spec.mode == "controlnet" else None
    decoder = DECODER_OF_MODE[(spec.family, spec.mode)]

    def denoise(params: DenoiseParams, init: Any) -> Awaitable[Any]:
        if decoder_text is None:
            return calls.denoise(decoder, embeddings, params, init, hint)
        return calls.denoise(decoder, embeddings, params, init, hint, decoder_text)

    latents = await denoise(denoise_params, init)
    upscaled = first_pass = None
    if spec.hires is not None:
        # Upscale each image, then image-to-image on the same embeddings at the output size.
        upscaled = await calls.upscale(latents, UpscaleParams(spec.width, spec.height, spec.hires.upscale, request_id))
        first_pass = latents
        hires_params = DenoiseParams(spec.height, spec.width, spec.hires.steps, spec.guidance_scale, request_id,
                                     spec.scheduler, spec.hires.strength)
        latents = await denoise(hires_params, upscaled)

    composite = None
    if spec.mode == "inpaint" and spec.mask_blur > 0:
        composite = Composite(spec.image, spec.mask, spec.mask_blur)
    decoded = await calls.decode(latents, DecodeParams(spec.output_format, request_id, composite))
    checks, check_timings = None, {}
    if spec.caption_check:
        prompt_embedding = text.text_embeds[0] if spec.prompt else None
        checks, check_timings = await caption_check(decoded, prompt_embedding, calls, request_id)
    # Each stage's output carries its own timing only; the request's whole story is told here.
    timings: dict = {}
    for output in (text, images, embeddings, init, decoder_text, first_pass, upscaled, latents, decoded):
        timings.update(getattr(output, "timings", None) or {})
    if first_pass is not None:  # the second pass's timing under its own key
        for key, timing in (first_pass.timings or {}).items():
            timings[key], timings[f"{key}_hires"] = timing, latents.timings.get(key, timing)
    timings.update(check_timings)
    return replace(decoded, seeds=list(seeds), timings=timings, notes=tuple(text.notes), checks=checks)


async def caption_check(decoded: EncodedImages, prompt_embedding: np.ndarray | None, calls: StageCalls,
                        request_id: str) -> tuple[list[CaptionCheck], dict[str, StageTiming]]:
    """Each decoded image's Florence-2 caption and the cosine similarity of its CLIP image
    embedding to ``prompt_embedding`` (None: no similarity), with the two calls' timings as
    ``caption_check`` (the slowest image's caption) and ``caption_check_embed``.

    What is checked is the image the client gets: decoded from its encoding (lossy ones
    included). Captions go one call per image, which the Florence-2 stage batches."""
    pixels = await asyncio.to_thread(_pixels, decoded)
    *answers, embedded = await asyncio.gather(
        *(calls.caption(image, request_id) for image in pixels),
        calls.embed_images(pixels, request_id) if prompt_embedding is not None else _none())
    similarities: list[float | None] = [None] * len(pixels)
    timings: dict[str, StageTiming] = {}
    if embedded is not None:
        text = prompt_embedding / np.linalg.norm(prompt_embedding)
        images = embedded.image_embeds / np.linalg.norm(embedded.image_embeds, axis=1, keepdims=True)
        similarities = [float(value) for value in images @ text]
        timings.update({"caption_check_embed": timing for timing in (embedded.timings or {}).values()})
    caption_timings = [timing for answer in answers for timing in (answer.timings or {}).values()]
    if caption_timings:
        timings["caption_check"] = max(caption_timings, key=lambda t: t.queue_ms + t.compute_ms)
    checks = [CaptionCheck(answer.answer.get("text", ""), similarity) for answer, similarity in zip(answers, similarities)]
    return checks, timings


def _pixels(decoded: EncodedImages) -> list[np.ndarray]:
    """The decoded images as (H, W, 3) uint8 arrays (``raw``: they already are)."""
    if decoded.media_type == "raw":
        return [np.asarray(image) for image in decoded.images]
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in decoded.images]
