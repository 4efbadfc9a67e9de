"""Typed messages exchanged between stages.

Arrays are numpy (zero-copy through Ray's object store on one node) and always
float32 on the wire, whatever dtype a stage computes in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class StageTiming:
    """Where one request's time went in one stage."""

    queue_ms: float
    compute_ms: float
    batch_size: int


Timings = dict[str, StageTiming]


@dataclass
class TextEmbeddings:
    """CLIP text encodings of ``texts``, one row each, in request order."""

    texts: list[str]
    text_embeds: np.ndarray  # (n, D) pooled, projected
    hidden_states: np.ndarray  # (n, L, H) last hidden states
    attention_mask: np.ndarray  # (n, L) bool
    timings: Timings = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    """Things the client should know (e.g. a prompt truncated to the encoder's window)."""


@dataclass
class ClipImageEmbeddings:
    """CLIP image embeddings of input images (the image encoder's output), one row each."""

    image_embeds: np.ndarray  # (n, D)
    timings: Timings = field(default_factory=dict)


@dataclass(frozen=True)
class MixTerm:
    """One item of an image mix: a text (a prior run) or an input image's CLIP embedding."""

    source: Literal["text", "image"]
    index: int
    """Row in the text embeddings (a text) or in the image embeddings (an image)."""
    weight: float


@dataclass(frozen=True)
class PriorParams:
    """How the prior should turn one prompt into one image embedding per seed.

    Text rows: ``[prompt, negative prompt or ""]``; for a mix, ``[item texts..., "", negative?]``.
    """

    seeds: tuple[int, ...]
    num_steps: int
    guidance_scale: float
    has_negative: bool
    """True when the text embeddings include a user negative prompt (row 1; for a mix, the last row)."""
    request_id: str = ""
    strength: float | None = None
    """Variations: start from the input image's embedding re-noised this much (emb2emb)."""
    mix: tuple[MixTerm, ...] = ()
    """Mixing: the weighted sum of these terms, texts run in order with one generator per seed."""


@dataclass
class ImageEmbeddings:
    """CLIP image embeddings from the prior: one row per image to generate."""

    image_embeds: np.ndarray  # (N, D)
    negative_image_embeds: np.ndarray  # (N, D)
    seeds: list[int]
    timings: Timings = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    """Things the client should know (e.g. a prompt truncated to the encoder's window)."""


@dataclass(frozen=True)
class DenoiseParams:
    """Decoder settings shared by every image of one request."""

    height: int
    width: int
    num_steps: int
    guidance_scale: float
    request_id: str = ""
    scheduler: str = "ddpm"
    """One of ``deployments.denoiser.SCHEDULERS``."""
    strength: float | None = None
    """Image-to-image: start from the input image's latents noised to this fraction of the schedule."""


@dataclass(frozen=True)
class InitImage:
    """An input image for the MOVQ encoder, as decoded pixels (RGB uint8)."""

    pixels: np.ndarray  # (H, W, 3) uint8
    width: int
    height: int
    """The size the image is resized to (the output size)."""
    mask: np.ndarray | None = None
    """Inpainting: (H, W) uint8, white (>= 128 after resizing) = repaint, black = keep."""
    request_id: str = ""


@dataclass
class ImageLatents:
    """An input image in MOVQ latent space (and, for inpainting, the keep-mask there)."""

    latents: np.ndarray  # (1, C, h, w)
    keep_mask: np.ndarray | None = None  # (1, 1, h, w): 1 keep, 0 repaint
    timings: Timings = field(default_factory=dict)


@dataclass(frozen=True)
class Composite:
    """Inpainting with ``mask_blur``: feather the output into the original in pixel space."""

    pixels: np.ndarray  # (H, W, 3) uint8 original
    mask: np.ndarray  # (H, W) uint8, white = repaint
    blur_radius: float


@dataclass
class Latents:
    """Final MOVQ latents, one row per image."""

    latents: np.ndarray  # (N, C, h, w)
    seeds: list[int]
    timings: Timings = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    """Things the client should know (e.g. a prompt truncated to the encoder's window)."""


@dataclass(frozen=True)
class DecodeParams:
    output_format: str  # "png" | "jpeg" | "webp"
    request_id: str = ""
    composite: Composite | None = None


@dataclass
class EncodedImages:
    """The request's images, encoded, with every stage's timing."""

    images: list[bytes]
    media_type: str
    seeds: list[int]
    timings: Timings = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    """Things the client should know (e.g. a prompt truncated to the encoder's window)."""
