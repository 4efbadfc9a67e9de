"""Typed messages exchanged between stages.

Arrays are numpy (zero-copy through Ray's object store on one node) and always
float32 on the wire, whatever dtype a stage computes in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class PriorParams:
    """How the prior should turn one prompt into one image embedding per seed."""

    seeds: tuple[int, ...]
    num_steps: int
    guidance_scale: float
    has_negative: bool
    """True when row 1 of the text embeddings is a user negative prompt (not "")."""
    request_id: str = ""


@dataclass
class ImageEmbeddings:
    """CLIP image embeddings from the prior: one row per image to generate."""

    image_embeds: np.ndarray  # (N, D)
    negative_image_embeds: np.ndarray  # (N, D)
    seeds: list[int]
    timings: Timings = field(default_factory=dict)


@dataclass(frozen=True)
class DenoiseParams:
    """Decoder settings shared by every image of one request."""

    height: int
    width: int
    num_steps: int
    guidance_scale: float
    request_id: str = ""


@dataclass
class Latents:
    """Final MOVQ latents, one row per image."""

    latents: np.ndarray  # (N, C, h, w)
    seeds: list[int]
    timings: Timings = field(default_factory=dict)


@dataclass(frozen=True)
class DecodeParams:
    output_format: str  # "png" | "jpeg" | "webp"
    request_id: str = ""


@dataclass
class EncodedImages:
    """The request's images, encoded, with every stage's timing."""

    images: list[bytes]
    media_type: str
    seeds: list[int]
    timings: Timings = field(default_factory=dict)
