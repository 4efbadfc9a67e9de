"""The stage registry: every stage, once — the generation graph's and the image-understanding ones.

Settings (which deployments a config may name, which take loop settings), the graph
builder (what to deploy, from which checkpoint), the ingress (which deployment serves a
call), the plan (which U-Net serves a mode), the cluster check and the tests read this
table; nothing else spells a stage's deployment name. Adding a stage is one entry here
plus its module in ``deployments/``.

Plain data, no torch or Ray import: the settings and the CLI read it without loading a model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

MODES = ("text2img", "img2img", "inpaint", "mix", "variations", "controlnet")
"""Every generation mode (``/v1/<mode>``)."""

FAMILIES: dict[str, tuple[str, ...]] = {
    "2.2": MODES,
    # What diffusers offers for 2.1: no ControlNet, no emb2emb prior (variations).
    "2.1": ("text2img", "img2img", "inpaint", "mix"),
}
"""Each model family and the modes it can serve."""
DEFAULT_FAMILY = "2.2"
MODEL_IDS = {"2.2": "kandinsky-2-2", "2.1": "kandinsky-2-1"}
"""The id each family's model is requested by (``model`` on every generation request)."""


@dataclass(frozen=True)
class Stage:
    name: str
    """The Ray Serve deployment name (configs' ``deployments[].name``, metrics' ``deployment`` label)."""
    deployment: str
    """``module:attribute`` of the Ray Serve deployment, imported when the graph is built."""
    role: str
    """What the ingress calls it for: ``text_encoder``, ``image_encoder``, ``prior``, ``denoiser``, ``movq``,
    ``decoder_text_encoder`` (2.1) or ``understanding`` (an image-understanding route)."""
    checkpoint: str
    """The checkpoint it loads: a ``ModelSettings`` field ``<checkpoint>_path`` and env ``KANDINSKY_<CHECKPOINT>_PATH``."""
    subfolders: tuple[str, ...]
    """The checkpoint subfolders it reads."""
    loop: bool
    """A step loop: its ``user_config`` is ``LoopBatchSettings`` and it reports request progress."""
    modes: tuple[str, ...]
    """The generation modes that call it (for an understanding stage: its routes, ``/v1/<mode>``)."""
    resource: str
    """The custom Ray resource (``ray_actor_options.resources``) that places it on its node type in cluster configs."""
    variant: str | None = None
    """For a denoiser: the decoder variant the plan asks for (``text2img``, ``inpaint``, ``controlnet``)."""
    optional: bool = False
    """Deployed only when its checkpoint is configured (the embedded model has all); else its modes answer 404."""
    family: str | None = DEFAULT_FAMILY
    """The model family it serves (:data:`FAMILIES`); a family other than the default is
    deployed only when its checkpoints are configured. None: an image-understanding stage."""

    @property
    def path_field(self) -> str:
        return f"{self.checkpoint}_path"

    @property
    def path_env(self) -> str:
        return f"KANDINSKY_{self.checkpoint.upper()}_PATH"

    def load(self) -> Any:
        """The Ray Serve deployment object (imports torch, diffusers and Ray)."""
        module, attribute = self.deployment.split(":")
        return getattr(importlib.import_module(module), attribute)


_PLAIN_DECODER_MODES = ("text2img", "img2img", "mix", "variations")
_MODES_21 = FAMILIES["2.1"]

STAGES: tuple[Stage, ...] = (
    Stage("TextEncoder", "deployments.text_encoder:TextEncoder", "text_encoder", "prior",
          ("tokenizer", "text_encoder"), loop=False, modes=MODES, resource="kandinsky_small"),
    Stage("ImageEncoder", "deployments.image_encoder:ImageEncoder", "image_encoder", "prior",
          ("image_processor", "image_encoder"), loop=False, modes=("mix", "variations"), resource="kandinsky_small"),
    Stage("Prior", "deployments.prior:Prior", "prior", "prior",
          ("prior", "scheduler"), loop=True, modes=MODES, resource="kandinsky_small"),
    Stage("Denoiser", "deployments.denoiser:Denoiser", "denoiser", "decoder",
          ("unet", "scheduler"), loop=True, modes=_PLAIN_DECODER_MODES, resource="kandinsky_denoiser", variant="text2img"),
    Stage("InpaintDenoiser", "deployments.denoiser:InpaintDenoiser", "denoiser", "inpaint_decoder",
          ("unet", "scheduler"), loop=True, modes=("inpaint",), resource="kandinsky_denoiser", variant="inpaint",
          optional=True),
    Stage("ControlnetDenoiser", "deployments.denoiser:ControlnetDenoiser", "denoiser", "controlnet_decoder",
          ("unet", "scheduler"), loop=True, modes=("controlnet",), resource="kandinsky_denoiser", variant="controlnet",
          optional=True),
    # The MOVQ of the text-to-image decoder decodes every variant's latents: the published
    # 2.2 decoders (plain, inpaint, ControlNet) share one MOVQ.
    Stage("MovqDecoder", "deployments.movq:MovqDecoder", "movq", "decoder",
          ("movq",), loop=False, modes=MODES, resource="kandinsky_small"),
    # Kandinsky 2.1: the same stage code on 2.1 checkpoints (a prior of 2.2's architecture, a
    # U-Net also conditioned on text), plus the decoder's own multilingual text encoder. Whole
    # families are deployments of their own: their U-Nets and MOVQs differ.
    Stage("TextEncoder21", "deployments.text_encoder:TextEncoder", "text_encoder", "prior_21",
          ("tokenizer", "text_encoder"), loop=False, modes=_MODES_21, resource="kandinsky_small", family="2.1"),
    Stage("ImageEncoder21", "deployments.image_encoder:ImageEncoder", "image_encoder", "prior_21",
          ("image_processor", "image_encoder"), loop=False, modes=("mix",), resource="kandinsky_small", family="2.1"),
    Stage("Prior21", "deployments.prior:Prior", "prior", "prior_21",
          ("prior", "scheduler"), loop=True, modes=_MODES_21, resource="kandinsky_small", family="2.1"),
    Stage("DecoderTextEncoder21", "deployments.text_encoder:MultilingualTextEncoder", "decoder_text_encoder", "decoder_21",
          ("tokenizer", "text_encoder"), loop=False, modes=_MODES_21, resource="kandinsky_small", family="2.1"),
    Stage("Denoiser21", "deployments.denoiser:Denoiser", "denoiser", "decoder_21",
          ("unet", "scheduler"), loop=True, modes=("text2img", "img2img", "mix"), resource="kandinsky_denoiser",
          variant="text2img", family="2.1"),
    Stage("InpaintDenoiser21", "deployments.denoiser:InpaintDenoiser", "denoiser", "inpaint_decoder_21",
          ("unet", "scheduler"), loop=True, modes=("inpaint",), resource="kandinsky_denoiser", variant="inpaint",
          optional=True, family="2.1"),
    Stage("MovqDecoder21", "deployments.movq:MovqDecoder", "movq", "decoder_21",
          ("movq",), loop=False, modes=_MODES_21, resource="kandinsky_small", family="2.1"),
    # Image understanding: of no model family (no plan of their own, no U-Net); each deployed
    # only when its checkpoint is configured, else its routes answer 404. Florence-2 also
    # serves generation's caption_check.
    Stage("Florence2", "deployments.florence2:Florence2", "understanding", "florence2",
          (), loop=False, modes=("caption", "detect", "ground", "ocr"), resource="kandinsky_small", optional=True,
          family=None),
    Stage("Kosmos2", "deployments.kosmos2:Kosmos2", "understanding", "kosmos2",
          (), loop=False, modes=("grounded-caption",), resource="kandinsky_small", optional=True, family=None),
)

INGRESS_NAME = "Ingress"
"""The HTTP ingress deployment (not a stage: it calls them)."""

GENERATION_STAGES = tuple(stage for stage in STAGES if stage.family is not None)
"""The generation graph's stages, every family's."""
UNDERSTANDING_STAGES = tuple(stage for stage in STAGES if stage.role == "understanding")
"""Image-understanding stages, beside the generation graph."""

STAGE_NAMES = tuple(stage.name for stage in STAGES)
LOOP_STAGE_NAMES = tuple(stage.name for stage in STAGES if stage.loop)
BY_NAME = {stage.name: stage for stage in STAGES}
CHECKPOINTS = tuple(dict.fromkeys(stage.checkpoint for stage in GENERATION_STAGES))
"""Every checkpoint some generation stage loads, required ones first: ``prior``, ``decoder``, then the variants'."""
OPTIONAL_STAGES = tuple(stage for stage in GENERATION_STAGES if stage.optional and stage.family == DEFAULT_FAMILY)
"""The default family's decoder variants, each left out when its checkpoint is not configured."""


def understanding_stage(mode: str) -> Stage:
    """The image-understanding stage that serves ``mode``."""
    return next(stage for stage in UNDERSTANDING_STAGES if mode in stage.modes)


def stage_for(role: str, variant: str | None = None, family: str = DEFAULT_FAMILY) -> Stage:
    """The one stage of ``family`` playing ``role`` (for a denoiser: of ``variant``)."""
    matches = [s for s in GENERATION_STAGES if s.role == role and s.family == family and (variant is None or s.variant == variant)]
    if len(matches) != 1:
        raise KeyError(f"{len(matches)} stages with role {role!r}, variant {variant!r} in family {family}; expected one")
    return matches[0]


def denoiser_of_mode(mode: str, family: str = DEFAULT_FAMILY) -> Stage:
    """The U-Net stage of ``family`` that serves ``mode``; each batches only with itself."""
    matches = [s for s in GENERATION_STAGES if s.role == "denoiser" and s.family == family and mode in s.modes]
    if len(matches) != 1:
        raise KeyError(f"{len(matches)} denoisers of family {family} serve mode {mode!r}; expected one")
    return matches[0]
