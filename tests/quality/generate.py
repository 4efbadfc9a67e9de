"""Generation for the quality tests: diffusers' own Kandinsky 2.2 pipelines on the shipped weights.

The service is proven equal to these pipelines by the parity tests; here they
are called in batches (one prompt list, one generator per call) to keep the tests fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from serve.training.data import HELD_OUT, LANGUAGES, full_caption

PRIOR_STEPS = 10
STEPS = 20
GUIDANCE = 4.0  # the service's default for both prior and decoder
SIZE = 64


@dataclass
class Pipelines:
    prior: object
    decoder: object
    img2img: object


@lru_cache(maxsize=1)
def pipelines() -> Pipelines:
    from diffusers import KandinskyV22Img2ImgPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline

    from serve.embedded import trained_checkpoint

    # QUALITY_CHECKPOINT=DIR (with DIR/prior and DIR/decoder) judges another checkpoint.
    if os.environ.get("QUALITY_CHECKPOINT"):
        root = Path(os.environ["QUALITY_CHECKPOINT"])
        prior_dir, decoder_dir = root / "prior", root / "decoder"
    else:
        prior_dir, decoder_dir = trained_checkpoint()
    kwargs = {"local_files_only": True, "use_safetensors": True}
    prior = KandinskyV22PriorPipeline.from_pretrained(str(prior_dir), **kwargs)
    decoder = KandinskyV22Pipeline.from_pretrained(str(decoder_dir), **kwargs)
    img2img = KandinskyV22Img2ImgPipeline(**decoder.components)
    for pipe in (prior, decoder, img2img):
        pipe.set_progress_bar_config(disable=True)
    return Pipelines(prior, decoder, img2img)


def embed(prompts: list[str], seed: int, guidance: float = GUIDANCE, negative_prompt: str | None = None, steps: int = PRIOR_STEPS):
    pipes = pipelines()
    output = pipes.prior(
        prompts,
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt is not None else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
    )
    return output.image_embeds, output.negative_image_embeds


def decode(image_embeds, negative_embeds, seed: int, guidance: float = GUIDANCE, steps: int = STEPS) -> list[np.ndarray]:
    images = pipelines().decoder(
        image_embeds=image_embeds,
        negative_image_embeds=negative_embeds,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    return [np.clip(np.rint(image * 255), 0, 255).astype(np.uint8) for image in images]


def text_to_image(prompts: list[str], seed: int = 0, guidance: float = GUIDANCE, negative_prompt: str | None = None) -> list[np.ndarray]:
    image_embeds, negative = embed(prompts, seed, guidance, negative_prompt)
    return decode(image_embeds, negative, seed + 1, guidance)


def img2img(images: list[np.ndarray], prompts: list[str], strength: float, seed: int = 0) -> list[np.ndarray]:
    from PIL import Image

    image_embeds, negative = embed(prompts, seed)
    out = pipelines().img2img(
        image=[Image.fromarray(image) for image in images],
        image_embeds=image_embeds,
        negative_image_embeds=negative,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        strength=strength,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(seed + 1),
        output_type="np",
    ).images
    return [np.clip(np.rint(image * 255), 0, 255).astype(np.uint8) for image in out]


def mix(prompts: list[str], weights: list[float], seed: int, count: int) -> list[np.ndarray]:
    """``KandinskyV22PriorPipeline.interpolate`` then the decoder, ``count`` images."""
    pipes = pipelines()
    output = pipes.prior.interpolate(
        prompts, weights, num_images_per_prompt=count, num_inference_steps=PRIOR_STEPS,
        guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(seed),
    )
    return decode(output.image_embeds, output.negative_image_embeds, seed + 1)


def held_out_prompts(lang: str, per_combo: int) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Each held-out (colour, shape, background) combination's full caption, ``per_combo`` times."""
    assert lang in LANGUAGES
    combos = [combo for combo in HELD_OUT for _ in range(per_combo)]
    return [full_caption(c, s, b, lang) for c, s, b in combos], combos
