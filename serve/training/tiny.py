"""Tiny random-weight Kandinsky 2.2 and 2.1 checkpoints, written in the published layouts.

Everything is made here and deterministic from a seed: the CLIP tokenizer's
vocabulary and merges are learned from a built-in word list, and every model is
built by the training recipe's builders at tiny sizes and saved with
``save_pretrained`` (safetensors), so the very same loading code serves tiny and
full-size checkpoints.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from deployments.loading import DECODER_21_LAYOUT, DECODER_LAYOUT, PRIOR_LAYOUT, CheckpointError, check_layout
from serve.training.tokenizer import build_tokenizer, build_xlm_roberta_tokenizer

CLIP_DIM = 32  # pooled text/image embedding size (1280 in the real model)
MAX_TOKENS = 77  # CLIP's context length, as in the real tokenizer
NUM_MERGES = 400


def _prior_components(seed: int) -> dict:
    from serve.training.clip import build_clip, build_image_processor
    from serve.training.prior import build_prior

    tokenizer = build_tokenizer(num_merges=NUM_MERGES, max_length=MAX_TOKENS)
    text_encoder, image_encoder = build_clip(tokenizer, seed, CLIP_DIM, vision_hidden=CLIP_DIM, vision_layers=2, patch_size=16)
    prior = build_prior(CLIP_DIM, MAX_TOKENS, seed + 2, heads=2)
    # Left at their zero init, clip_std would make post_process_latents return 0.
    prior.clip_mean = torch.nn.Parameter(torch.randn(1, CLIP_DIM) * 0.1)
    prior.clip_std = torch.nn.Parameter(torch.ones(1, CLIP_DIM))
    return {
        "prior": prior,
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": prior_scheduler(),
        "image_processor": build_image_processor(),
    }


DECODER_VARIANTS = {
    # name: (seed offset, U-Net input channels, addition_embed_type), as the published 2.2 decoders
    "decoder": (3, 4, "image"),
    "decoder_inpaint": (5, 9, "image"),  # latents + masked-image latents + mask
    "decoder_controlnet": (6, 8, "image_hint"),  # latents + the hint encoder's 4 channels
}


def _decoder_components(seed: int, variant: str = "decoder") -> dict:
    from serve.training.decoder import build_unet
    from serve.training.movq import LATENT_CHANNELS, build_movq

    offset, in_channels, addition = DECODER_VARIANTS[variant]
    unet = build_unet(
        CLIP_DIM, LATENT_CHANNELS, seed + offset, in_channels=in_channels, addition_embed_type=addition,
        head_dim=4, norm_groups=32, sample_size=None,
    )
    # Every variant gets the same MOVQ, as the published 2.2 decoders share one.
    movq = build_movq(seed + 4, channels=(32, 32, 32, 64), codebook=64, attention=True)
    return {"unet": unet, "scheduler": decoder_scheduler(), "movq": movq}


def prior_scheduler():
    """The prior's scheduler with ``kandinsky-2-2-prior``'s settings (random and trained tiny models alike)."""
    from diffusers import UnCLIPScheduler

    return UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )


def decoder_scheduler():
    """The decoder's scheduler with ``kandinsky-2-2-decoder``'s settings (every variant, random or trained)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
        variance_type="fixed_small",
    )


class TinyCheckpoint(NamedTuple):
    """Paths of a tiny checkpoint: the prior and the three decoder variants."""

    prior: Path
    decoder: Path
    inpaint_decoder: Path
    controlnet_decoder: Path


def _paths(root: Path) -> TinyCheckpoint:
    return TinyCheckpoint(root / "prior", root / "decoder", root / "decoder_inpaint", root / "decoder_controlnet")


def _check(checkpoint: TinyCheckpoint) -> TinyCheckpoint:
    check_layout(checkpoint.prior, PRIOR_LAYOUT, "prior")
    check_layout(checkpoint.decoder, DECODER_LAYOUT, "decoder")
    check_layout(checkpoint.inpaint_decoder, DECODER_LAYOUT, "decoder-inpaint")
    check_layout(checkpoint.controlnet_decoder, DECODER_LAYOUT, "controlnet-depth")
    return checkpoint


def make_tiny(out_dir: Path | str, seed: int = 0) -> TinyCheckpoint:
    """Write ``prior``, ``decoder``, ``decoder_inpaint`` and ``decoder_controlnet`` under ``out_dir``."""
    from diffusers import (
        KandinskyV22ControlnetPipeline,
        KandinskyV22InpaintPipeline,
        KandinskyV22Pipeline,
        KandinskyV22PriorPipeline,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _paths(out_dir)
    KandinskyV22PriorPipeline(**_prior_components(seed)).save_pretrained(paths.prior, safe_serialization=True)
    for pipeline, variant, path in (
        (KandinskyV22Pipeline, "decoder", paths.decoder),
        (KandinskyV22InpaintPipeline, "decoder_inpaint", paths.inpaint_decoder),
        (KandinskyV22ControlnetPipeline, "decoder_controlnet", paths.controlnet_decoder),
    ):
        pipeline(**_decoder_components(seed, variant)).save_pretrained(path, safe_serialization=True)
    return _check(paths)


# -- Kandinsky 2.1 ----------------------------------------------------------------------

MCLIP_HIDDEN = 32  # the multilingual text encoder's width (1024 in the real XLM-R large)


def _multilingual_text_encoder(tokenizer, seed: int):
    """2.1's ``MultilingualCLIP`` (XLM-Roberta + a projection to the CLIP image-embedding size)."""
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    torch.manual_seed(seed)
    config = MCLIPConfig(
        transformerDimSize=MCLIP_HIDDEN, imageDimSize=CLIP_DIM, hidden_size=MCLIP_HIDDEN, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS + 4,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return MultilingualCLIP(config).eval()


def _unet_21(seed: int, in_channels: int):
    """2.1's U-Net: conditioned on the text's hidden states and pooled embedding *and* the image embedding."""
    from serve.training.decoder import build_unet
    from serve.training.movq import LATENT_CHANNELS

    # Cross-attention has the image embedding's width (CLIP_DIM), as build_unet's 32.
    return build_unet(MCLIP_HIDDEN, LATENT_CHANNELS, seed, in_channels=in_channels, addition_embed_type="text_image",
                      encoder_hid_dim_type="text_image_proj", head_dim=4, norm_groups=32, sample_size=None)


def decoder_21_scheduler():
    """The decoder's scheduler with ``kandinsky-2-1``'s settings (DDIM)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
    )


def _decoder_21_components(seed: int, inpaint: bool) -> dict:
    from serve.training.movq import LATENT_CHANNELS, build_movq

    tokenizer = build_xlm_roberta_tokenizer()
    return {
        "text_encoder": _multilingual_text_encoder(tokenizer, seed + 21),
        "tokenizer": tokenizer,
        "unet": _unet_21(seed + (25 if inpaint else 23), 2 * LATENT_CHANNELS + 1 if inpaint else LATENT_CHANNELS),
        "scheduler": decoder_21_scheduler(),
        # One MOVQ for both, as the published 2.1 decoders share theirs.
        "movq": build_movq(seed + 24, channels=(32, 32, 32, 64), codebook=64, attention=True),
    }


class TinyCheckpoint21(NamedTuple):
    """Paths of a tiny Kandinsky 2.1 checkpoint, named as the published repositories."""

    prior: Path
    decoder: Path
    inpaint_decoder: Path


def make_tiny_21(out_dir: Path | str, seed: int = 0) -> TinyCheckpoint21:
    """Write ``kandinsky-2-1-prior``, ``kandinsky-2-1`` and ``kandinsky-2-1-inpaint`` under ``out_dir``."""
    from diffusers import KandinskyInpaintPipeline, KandinskyPipeline, KandinskyPriorPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = TinyCheckpoint21(out_dir / "kandinsky-2-1-prior", out_dir / "kandinsky-2-1", out_dir / "kandinsky-2-1-inpaint")
    # The 2.1 prior has 2.2's architecture (CLIP text and image towers, PriorTransformer, UnCLIP).
    KandinskyPriorPipeline(**_prior_components(seed + 20)).save_pretrained(paths.prior, safe_serialization=True)
    KandinskyPipeline(**_decoder_21_components(seed, inpaint=False)).save_pretrained(paths.decoder, safe_serialization=True)
    KandinskyInpaintPipeline(**_decoder_21_components(seed, inpaint=True)).save_pretrained(
        paths.inpaint_decoder, safe_serialization=True)
    check_layout(paths.prior, PRIOR_LAYOUT, "prior")
    check_layout(paths.decoder, DECODER_21_LAYOUT, "decoder")
    check_layout(paths.inpaint_decoder, DECODER_21_LAYOUT, "decoder-inpaint")
    return paths


def build_once(target: Path, build: Callable[[Path], object], check: Callable[[Path], object]) -> Path:
    """``build(dir)`` into ``target`` unless ``check(target)`` passes, atomically.

    Concurrent callers (several replicas on one node) each build into a private
    temporary directory; the first rename wins and the others discard theirs.
    """
    try:
        check(target)
        return target
    except CheckpointError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        build(staging)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            pass  # another process finished first; its copy is identical
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
