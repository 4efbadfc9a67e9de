"""The oracle: diffusers' own Kandinsky 2.2 pipelines, one call per seed."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from serve.schemas import Text2ImgSpec

MAX_PIXEL_DIFF = 1  # of 255


@lru_cache(maxsize=4)
def pipelines(prior_path: str, decoder_path: str):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    prior = KandinskyV22PriorPipeline.from_pretrained(prior_path, local_files_only=True, use_safetensors=True)
    decoder = KandinskyV22Pipeline.from_pretrained(decoder_path, local_files_only=True, use_safetensors=True)
    prior.set_progress_bar_config(disable=True)
    decoder.set_progress_bar_config(disable=True)
    return prior, decoder


def reference_images(prior_path, decoder_path, spec: Text2ImgSpec) -> list[np.ndarray]:
    """What ``KandinskyV22PriorPipeline`` then ``KandinskyV22Pipeline`` draw for each seed of ``spec``."""
    prior, decoder = pipelines(str(prior_path), str(decoder_path))
    images = []
    for seed in spec.seeds:
        embeds, negative = prior(
            spec.prompt,
            negative_prompt=spec.negative_prompt,
            num_inference_steps=spec.prior_steps,
            guidance_scale=spec.prior_guidance_scale,
            generator=torch.Generator().manual_seed(seed),
        ).to_tuple()
        image = decoder(
            image_embeds=embeds,
            negative_image_embeds=negative,
            height=spec.height,
            width=spec.width,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            output_type="pil",
        ).images[0]
        images.append(np.asarray(image))
    return images


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data), formats=["PNG"]).convert("RGB"))


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def spec(**overrides) -> Text2ImgSpec:
    """A small, fast request; keyword arguments override any field."""
    fields = dict(
        prompt="a red circle",
        negative_prompt=None,
        width=64,
        height=64,
        seeds=(11,),
        prior_steps=4,
        prior_guidance_scale=4.0,
        steps=6,
        guidance_scale=4.0,
        output_format="png",
    )
    fields.update(overrides)
    return Text2ImgSpec(**fields)
