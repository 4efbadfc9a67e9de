"""Typed messages exchanged between stages.

Arrays are numpy (zero-copy through Ray's object store on one node) and always
float32 on the wire, whatever dtype a stage computes in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


# Decoder schedulers that work with Kandinsky's U-Net and its pipelines' step loop: API
# name -> (diffusers class, config overrides). The pipelines never call scale_model_input,
# so only schedulers whose input scaling is the identity (init_noise_sigma 1: the VP
# solvers) can match them; Euler, Euler ancestral, Heun, LMS, KDPM2 and the k-diffusion
# DPMSolverSDEScheduler scale by sigma and draw wrong images in diffusers' pipeline too.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsolver++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmsolver++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}


@dataclass(frozen=True)
class StageTiming:
    """Where one request's time went in one stage."""

    queue_ms: float
    compute_ms: float
    batch_size: int


Timings = dict[str, StageTiming]
"""A stage output's own timing, by timing key (one entry; ``serve.graph.plan`` merges a request's)."""


@dataclass
class TextEmbeddings:
    """CLIP text encodings of a call's texts, one row each, in request order."""

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
class TextRows:
    """Which row of the text embeddings is which prompt."""

    prompt: int = 0
    """The prompt (unused by a mix, whose text items name their rows)."""
    unconditional: int = 1
    """What guidance pushes away from: the negative prompt when there is one, else ``""``."""
    negative: int | None = None
    """The user's negative prompt, itself denoised into the negative image embedding; None: none given."""

    @classmethod
    def pair(cls, has_negative: bool) -> "TextRows":
        """The rows of ``[prompt, negative prompt or ""]``."""
        return cls(prompt=0, unconditional=1, negative=1 if has_negative else None)


@dataclass(frozen=True)
class PriorParams:
    """How the prior should turn one prompt (or a mix) into one image embedding per seed."""

    seeds: tuple[int, ...]
    num_steps: int
    guidance_scale: float
    rows: TextRows = TextRows()
    request_id: str = ""
    strength: float | None = None
    """Variations: start from the input image's embedding re-noised this much (emb2emb)."""
    mix: tuple[MixTerm, ...] = ()
    """Mixing: the weighted sum of these terms, texts run in order with one generator per seed."""
    model: str = ""
    """A fine-tuned prior's id (the replica's multiplexed model); empty: the stage's own prior."""

    @property
    def has_negative(self) -> bool:
        return self.rows.negative is not None


@dataclass
class ImageEmbeddings:
    """CLIP image embeddings from the prior: one row per image to generate."""

    image_embeds: np.ndarray  # (N, D)
    negative_image_embeds: np.ndarray  # (N, D)
    seeds: list[int]
    """One per row: the denoiser draws each image's initial noise from its seed."""
    timings: Timings = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class DenoiseParams:
    """Decoder settings shared by every image of one request."""

    height: int
    width: int
    num_steps: int
    guidance_scale: float
    request_id: str = ""
    scheduler: str = "ddpm"
    """One of :data:`SCHEDULERS`."""
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
class UpscaleParams:
    """Hires fix: bring a request's latents to the output size before its second pass."""

    width: int
    height: int
    """The output size in pixels."""
    mode: Literal["pixel", "latent"] = "pixel"
    """pixel: decode, resize the pixels (bicubic), encode; latent: resize the latents (bilinear)."""
    request_id: str = ""


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
    timings: Timings = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.latents)


@dataclass(frozen=True)
class DecodeParams:
    output_format: str  # "png" | "jpeg" | "webp"
    request_id: str = ""
    composite: Composite | None = None


@dataclass
class EncodedImages:
    """The request's images, encoded. From the MOVQ stage with its own timing only; the
    plan adds the request's seeds, every stage's timing and the text encoder's notes."""

    images: list[bytes]
    media_type: str
    seeds: list[int] = field(default_factory=list)
    timings: Timings = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    """Things the client should know (e.g. a prompt truncated to the encoder's window)."""
    call_ms: dict[str, float] = field(default_factory=dict)
    """Each stage call's round trip from the ingress (queue + compute + routing and transfer), by timing key."""
    checks: list[CaptionCheck] | None = None
    """``caption_check``: one per image, in image order; None when the request did not ask."""

    @property
    def count(self) -> int:
        return len(self.images)

    def checks_json(self) -> list[dict] | None:
        """``checks`` as JSON-able dicts; None when the request did not ask."""
        return None if self.checks is None else [dict(vars(check)) for check in self.checks]


@dataclass(frozen=True)
class CaptionCheck:
    """What a generated image shows: Florence-2's caption of it, and the cosine similarity of
    its CLIP image embedding to the prompt's CLIP text embedding (None: no prompt, as in mix)."""

    caption: str
    clip_similarity: float | None


CAPTION_TASK = "<CAPTION>"
"""Florence-2's brief-caption task token (``caption_check`` and ``/v1/caption``'s default)."""


@dataclass(frozen=True)
class Florence2Request:
    """One image, one Florence-2 task token and, for grounding only, its text."""

    image: np.ndarray  # (H, W, 3) uint8
    task: str
    text: str | None = None


@dataclass
class UnderstandingAnswer:
    """One image-understanding answer (Florence-2's or Kosmos-2's parsed output, JSON-able)."""

    answer: dict
    timings: Timings = field(default_factory=dict)
