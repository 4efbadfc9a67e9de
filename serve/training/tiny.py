"""Tiny random-weight Kandinsky 2.2 checkpoints, written in the published layout.

Everything is made here and deterministic from a seed: the CLIP tokenizer's
vocabulary and merges are learned from a built-in word list, and every model is
built from a small config and saved with ``save_pretrained`` (safetensors), so
the very same loading code serves tiny and full-size checkpoints.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from deployments.loading import DECODER_LAYOUT, PRIOR_LAYOUT, CheckpointError, check_layout

CLIP_DIM = 32  # pooled text/image embedding size (1280 in the real model)
MAX_TOKENS = 77  # CLIP's context length, as in the real tokenizer
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 400

_CORPUS = """
a an the of and with on in at to from by for is are this that photo picture painting drawing image render
red green blue yellow orange purple pink black white gray grey brown cyan magenta gold silver colorful
circle square triangle star heart cross ring dot line stripe shape shapes small big large tiny huge
cat dog horse bird fish tree flower house car boat city mountain river sea sky sun moon cloud night day
portrait landscape forest street beach snow rain fire water stone glass metal wood paper cartoon anime
realistic detailed beautiful ugly bright dark soft sharp blurry quality high low best worst 4k hd
left right top bottom center middle background foreground above below near far one two three many
""".split()


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-unicode table (a fixed, public mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_clip_vocab(
    num_merges: int = NUM_MERGES, corpus: list[str] | None = None
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a CLIP-style byte-level BPE vocabulary from a word list (default: the built-in one).

    Words are learned in their byte-level form (UTF-8 bytes through the byte-to-unicode
    table, as CLIP's tokenizer sees them), so non-Latin scripts merge like any other.
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab_tokens = byte_chars + [c + "</w>" for c in byte_chars]
    table = _bytes_to_unicode()
    byte_words = ["".join(table[b] for b in w.encode("utf-8")) for w in (corpus if corpus is not None else _CORPUS)]
    words = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in byte_words)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        # Ties broken lexicographically so the vocabulary never depends on dict order.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab_tokens.append(best[0] + best[1])
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    vocab_tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(vocab_tokens)}, merges


def build_tokenizer(corpus: list[str] | None = None, num_merges: int = NUM_MERGES, max_length: int = MAX_TOKENS):
    """A ``CLIPTokenizer`` learned from ``corpus`` (default: the built-in word list)."""
    from transformers import CLIPTokenizer

    vocab, merges = build_clip_vocab(num_merges, corpus)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _prior_components(seed: int) -> dict:
    from diffusers import PriorTransformer
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=CLIP_DIM,
            projection_dim=CLIP_DIM,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed + 1)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=CLIP_DIM,
            projection_dim=CLIP_DIM,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=64,
            patch_size=16,
            num_channels=3,
        )
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
    )
    torch.manual_seed(seed + 2)
    prior = PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        embedding_dim=CLIP_DIM,
        num_embeddings=MAX_TOKENS,
        additional_embeddings=4,
    )
    # Left at their zero init, clip_std would make post_process_latents return 0.
    prior.clip_mean = torch.nn.Parameter(torch.randn(1, CLIP_DIM) * 0.1)
    prior.clip_std = torch.nn.Parameter(torch.ones(1, CLIP_DIM))
    scheduler = prior_scheduler()
    return {
        "prior": prior,
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "image_processor": image_processor,
    }


DECODER_VARIANTS = {
    # name: (seed offset, U-Net input channels, addition_embed_type), as the published 2.2 decoders
    "decoder": (3, 4, "image"),
    "decoder_inpaint": (5, 9, "image"),  # latents + masked-image latents + mask
    "decoder_controlnet": (6, 8, "image_hint"),  # latents + the hint encoder's 4 channels
}


def _decoder_components(seed: int, variant: str = "decoder") -> dict:
    from diffusers import UNet2DConditionModel, VQModel

    offset, in_channels, addition = DECODER_VARIANTS[variant]
    torch.manual_seed(seed + offset)
    unet = UNet2DConditionModel(
        in_channels=in_channels,
        out_channels=8,  # mean and learned variance, as in the real decoder
        addition_embed_type=addition,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=CLIP_DIM,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    # Every variant gets the same MOVQ, as the published 2.2 decoders share one.
    torch.manual_seed(seed + 4)
    # Four levels: a scale factor of 8, as in the real MOVQ (64 px -> 8 latent px).
    movq = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=64,
        vq_embed_dim=4,
    )
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
