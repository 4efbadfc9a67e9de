"""The embedded default model: a tiny Kandinsky 2.2 trained on synthetic scenes, shipped as package data.

``prior/`` and ``decoder/`` are in the layouts of ``kandinsky-2-2-prior`` and
``kandinsky-2-2-decoder`` (safetensors, with ``model_index.json``), written by
``kandinsky-serve train tiny --out serve/embedded`` (``training_summary.json`` has
the settings, each stage's time and last losses). The service serves them when no
checkpoint paths are configured; ``kandinsky-serve make-tiny`` still writes
random-weight checkpoints for tests that need a given architecture.

The inpainting and ControlNet decoders are not trained. They are derived from the
shipped decoder on first use (:func:`derive_variant`), so that every endpoint works
with the default model: the decoder's U-Net weights, with the extra input channels
(masked-image latents and mask; the depth hint) weighted zero. The inpainting
pipeline keeps the unmasked region by blending the input's latents in at every
step, so inpainting works as such; the ControlNet variant ignores the hint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from deployments.loading import DECODER_LAYOUT, PRIOR_LAYOUT, check_layout

EMBEDDED_DIR = Path(__file__).resolve().parent
# variant folder -> (U-Net in_channels, addition_embed_type, layout label), as in the published checkpoints.
VARIANTS = {
    "decoder_inpaint": (9, "image", "decoder-inpaint"),  # latents + masked-image latents + mask
    "decoder_controlnet": (8, "image_hint", "controlnet-depth"),  # latents + the hint encoder's 4 channels
}


def trained_checkpoint() -> tuple[Path, Path]:
    """(prior_dir, decoder_dir) of the shipped trained model, checked."""
    return (
        check_layout(EMBEDDED_DIR / "prior", PRIOR_LAYOUT, "prior"),
        check_layout(EMBEDDED_DIR / "decoder", DECODER_LAYOUT, "decoder"),
    )


def embedded_checkpoint(cache_dir: Path | str):
    """The shipped prior and decoder plus both decoder variants (derived once per cache
    dir and shipped weights); a :class:`serve.training.tiny.TinyCheckpoint`."""
    return with_derived_variants(*trained_checkpoint(), cache_dir)


def with_derived_variants(prior: Path, decoder: Path, cache_dir: Path | str):
    """``prior`` and ``decoder`` plus the decoder's variants, derived into ``cache_dir`` once
    per decoder weights; a :class:`serve.training.tiny.TinyCheckpoint`."""
    from serve.training.tiny import TinyCheckpoint, build_once

    # The variants copy both the U-Net and the MOVQ: a MOVQ retrained alone (the recipe's
    # refinement) must not find variants derived from the old one.
    hasher = hashlib.sha256()
    for part in ("unet", "movq"):
        hasher.update((Path(decoder) / part / "diffusion_pytorch_model.safetensors").read_bytes())
    digest = hasher.hexdigest()[:16]
    target = Path(cache_dir) / f"embedded-variants-{digest}"

    def build(root: Path) -> None:
        for name in VARIANTS:
            derive_variant(decoder, name, root / name)

    def check(root: Path) -> None:
        for name, (_, _, label) in VARIANTS.items():
            check_layout(root / name, DECODER_LAYOUT, label)

    build_once(target, build, check)
    return TinyCheckpoint(Path(prior), Path(decoder), target / "decoder_inpaint", target / "decoder_controlnet")


def derive_variant(decoder: Path, variant: str, out: Path) -> Path:
    """Write ``variant`` (a key of :data:`VARIANTS`) of ``decoder`` to ``out``: same MOVQ and
    scheduler, a U-Net with the decoder's weights whose extra input channels weigh zero."""
    import torch
    from diffusers import DDPMScheduler, KandinskyV22ControlnetPipeline, KandinskyV22InpaintPipeline, UNet2DConditionModel, VQModel

    from deployments.loading import load_pretrained

    in_channels, addition, label = VARIANTS[variant]
    base = load_pretrained(UNet2DConditionModel, decoder, "unet", dtype=torch.float32)
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    torch.manual_seed(0)  # the hint encoder (ControlNet) is new; its output enters zero-weighted channels
    unet = UNet2DConditionModel.from_config({**config, "in_channels": in_channels, "addition_embed_type": addition})
    state = unet.state_dict()
    for name, value in base.state_dict().items():
        if name == "conv_in.weight":
            weight = torch.zeros_like(state[name])
            weight[:, : value.shape[1]] = value  # the latents come first in every variant's input
            state[name] = weight
        elif name in state and state[name].shape == value.shape:
            state[name] = value
    unet.load_state_dict(state)
    pipeline = KandinskyV22InpaintPipeline if variant == "decoder_inpaint" else KandinskyV22ControlnetPipeline
    pipeline(
        unet=unet,
        scheduler=load_pretrained(DDPMScheduler, decoder, "scheduler"),
        movq=load_pretrained(VQModel, decoder, "movq", dtype=torch.float32),
    ).save_pretrained(out, safe_serialization=True)
    return check_layout(out, DECODER_LAYOUT, label)
