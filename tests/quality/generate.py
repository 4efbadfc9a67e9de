"""Generation for the quality tests: the service's own graph (``serve.plan`` and the stage
models, in process, each stage batched) on the shipped weights.

The parity tests prove this graph equal to diffusers' Kandinsky 2.2 pipelines and the
served deployments equal to it; here it runs without Ray to keep the tests fast.
``QUALITY_CHECKPOINT=DIR`` (with ``DIR/prior`` and ``DIR/decoder``) judges another
checkpoint, e.g. a fresh ``kandinsky-serve train tiny --out DIR``.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from serve.http.schemas import GenerationSpec, MixItem, Text2ImgRequest
from serve.training.data import LANGUAGES
from serve.graph.local import BatchedCalls, embedded_graph
from serve.tools.bench_quality import held_out

PRIOR_STEPS = 10  # fewer than the service's defaults, for the checks that need many runs
STEPS = 20

_REQUEST_FIELDS = Text2ImgRequest.model_fields
SERVICE_PRIOR_STEPS = _REQUEST_FIELDS["prior_steps"].default  # the service's defaults: what a user gets
SERVICE_STEPS = _REQUEST_FIELDS["steps"].default
GUIDANCE = _REQUEST_FIELDS["guidance_scale"].default  # the service's default (prior and decoder alike)
SIZE = 64


@lru_cache(maxsize=1)
def graph() -> BatchedCalls:
    return embedded_graph(os.environ.get("QUALITY_CHECKPOINT"))


def spec(prompt: str, seed: int, guidance: float = GUIDANCE, prior_steps: int = PRIOR_STEPS, steps: int = STEPS, **fields) -> GenerationSpec:
    """One 64×64 image of ``prompt``; ``guidance`` is both the prior's and the decoder's scale."""
    return GenerationSpec(
        prompt=prompt, negative_prompt=fields.pop("negative_prompt", None), width=SIZE, height=SIZE, seeds=(seed,),
        prior_steps=prior_steps, prior_guidance_scale=guidance, steps=steps, guidance_scale=guidance, **fields,
    )


def run(specs: list[GenerationSpec]) -> list[np.ndarray]:
    """The first image of each spec, all specs batched stage by stage."""
    return [images[0] for images in graph().run(specs)]


def text_to_image(prompts: list[str], seed: int = 0, guidance: float = GUIDANCE, negative_prompt: str | None = None, **steps) -> list[np.ndarray]:
    return run([spec(p, seed + i, guidance, negative_prompt=negative_prompt, **steps) for i, p in enumerate(prompts)])


def img2img(images: list[np.ndarray], prompts: list[str], strength: float, seed: int = 0) -> list[np.ndarray]:
    return run([spec(p, seed + i, mode="img2img", image=image, strength=strength) for i, (image, p) in enumerate(zip(images, prompts))])


def inpaint(images: list[np.ndarray], masks: list[np.ndarray], prompts: list[str], seed: int = 0) -> list[np.ndarray]:
    """``masks``: (H, W) uint8, white = repaint."""
    return run([spec(p, seed + i, mode="inpaint", image=image, mask=mask) for i, (image, mask, p) in enumerate(zip(images, masks, prompts))])


def mix(prompts: list[str], weights: list[float], seed: int, count: int) -> list[np.ndarray]:
    items = tuple(MixItem(weight, text=prompt) for prompt, weight in zip(prompts, weights))
    return run([spec("", seed + i, mode="mix", mix=items) for i in range(count)])


def held_out_prompts(lang: str, per_combo: int) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Each held-out (colour, shape, background) combination's full caption, ``per_combo`` times."""
    assert lang in LANGUAGES
    return held_out((lang,), per_combo)
