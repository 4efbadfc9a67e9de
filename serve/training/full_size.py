"""Full-size random-weight Kandinsky 2.2 checkpoints, in the published layouts.

The architectures are those of ``kandinsky-community/kandinsky-2-2-prior`` and
``kandinsky-2-2-decoder`` (and the ``-decoder-inpaint`` and ``-controlnet-depth`` U-Nets):
the same shapes, so the same FLOPs and memory, with seeded random weights, so nothing is
downloaded. The tokenizer is the locally learned CLIP BPE of the tiny checkpoints (its
vocabulary is smaller than CLIP's 49408, which the text encoder's embedding keeps: only the
ids differ, not the work).

Memory stays near one module's weights in the target dtype: each module is built with its
parameters on the meta device (buffers stay real), then each parameter is made directly in
the target dtype, filled from its own generator (seeded by the seed and the parameter's
name, so the result does not depend on order) and the module is saved (safetensors) and
dropped before the next.
"""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from deployments.loading import DECODER_LAYOUT, DTYPES, PRIOR_LAYOUT, check_layout

MAX_TOKENS = 77  # CLIP's context length, and the prior's num_embeddings
CLIP_IMAGE_SIZE = 224

# kandinsky-2-2-prior/text_encoder/config.json: the text tower of CLIP ViT-bigG/14 (laion2B-39B-b160k).
TEXT_ENCODER = {
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1280,
    "num_attention_heads": 20, "num_hidden_layers": 32, "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5,
}
# kandinsky-2-2-prior/image_encoder/config.json: the vision tower of CLIP ViT-bigG/14.
IMAGE_ENCODER = {
    "hidden_size": 1664, "intermediate_size": 8192, "projection_dim": 1280, "num_attention_heads": 16,
    "num_hidden_layers": 48, "image_size": CLIP_IMAGE_SIZE, "patch_size": 14, "num_channels": 3,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5,
}
# kandinsky-2-2-prior/prior/config.json (PriorTransformer: 20 layers, 32 heads, width 2048).
PRIOR = {
    "num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 20, "embedding_dim": 1280,
    "num_embeddings": MAX_TOKENS, "additional_embeddings": 4, "dropout": 0.0,
}
# kandinsky-2-2-decoder/unet/config.json (diffusers' scripts/convert_kandinsky_to_diffusers.py UNET_CONFIG,
# with 2.2's image conditioning: addition_embed_type "image", encoder_hid_dim 1280, "image_proj").
UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 8, "act_fn": "silu",
    "addition_embed_type": "image", "addition_embed_type_num_heads": 64, "attention_head_dim": 64,
    "block_out_channels": [384, 768, 1152, 1536], "layers_per_block": 3, "cross_attention_dim": 768,
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                         "SimpleCrossAttnDownBlock2D"],
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                       "ResnetUpsampleBlock2D"],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "encoder_hid_dim": 1280, "encoder_hid_dim_type": "image_proj",
    "resnet_time_scale_shift": "scale_shift", "class_embed_type": None, "norm_num_groups": 32, "norm_eps": 1e-5,
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "time_embedding_type": "positional", "use_linear_projection": False, "upcast_attention": False,
}
# kandinsky-2-2-decoder/movq/config.json (the convert script's MOVQ_CONFIG).
MOVQ = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "num_vq_embeddings": 16384, "block_out_channels": [128, 256, 256, 512], "vq_embed_dim": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "norm_type": "spatial",
}
CONFIGS = {"text_encoder": TEXT_ENCODER, "image_encoder": IMAGE_ENCODER, "prior": PRIOR, "unet": UNET, "movq": MOVQ}
"""Component name -> the published architecture's config."""

VARIANTS = {
    # name: (directory, pipeline class, U-Net overrides), as the published 2.2 decoders
    "decoder": ("decoder", "KandinskyV22Pipeline", {}),
    "inpaint": ("decoder_inpaint", "KandinskyV22InpaintPipeline", {"in_channels": 9}),  # + masked latents + mask
    "controlnet": ("decoder_controlnet", "KandinskyV22ControlnetPipeline",
                   {"in_channels": 8, "addition_embed_type": "image_hint"}),  # + the hint encoder's 4 channels
}


class FullSizeCheckpoint(NamedTuple):
    """Paths of a full-size checkpoint; a variant not written is ``None``."""

    prior: Path
    decoder: Path
    inpaint_decoder: Path | None = None
    controlnet_decoder: Path | None = None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device (no memory); buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _config(component: str, overrides: dict | None) -> dict:
    return {**CONFIGS[component], **((overrides or {}).get(component) or {})}


def build_meta(component: str, overrides: dict | None = None, tokenizer=None, **extra) -> torch.nn.Module:
    """One component with its parameters on the meta device (``overrides[component]`` changes its config)."""
    config = {**_config(component, overrides), **extra}
    with _parameters_on_meta():
        if component == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection

            if tokenizer is not None:
                config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
            return CLIPTextModelWithProjection(CLIPTextConfig(**config))
        if component == "image_encoder":
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
        if component == "prior":
            from diffusers import PriorTransformer

            return PriorTransformer(**config)
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**config)
        if component == "movq":
            from diffusers import VQModel

            return VQModel(**config)
    raise ValueError(f"unknown component {component!r}; expected one of {sorted(CONFIGS)}")


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _init_value(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Norm weights and ``clip_std`` 1, biases 0, everything else N(0, 1/fan_in): activations stay
    O(1) through every layer, so float16 neither overflows nor underflows on random weights."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or "bias" in leaf:
        return torch.zeros(shape)
    if len(shape) == 1 or leaf == "clip_std":
        return torch.ones(shape)
    fan_in = max(1, shape[1:].numel() if len(shape) > 2 else shape[-1])
    return torch.empty(shape).normal_(0.0, fan_in ** -0.5, generator=generator)


@torch.no_grad()
def materialize(module: torch.nn.Module, seed: int, dtype: torch.dtype, prefix: str) -> torch.nn.Module:
    """Give every meta parameter real memory in ``dtype`` and a seeded value (per name: order-free)."""
    for module_name, sub in module.named_modules():
        for name, param in list(sub._parameters.items()):
            if param is None or not param.is_meta:
                continue
            full = f"{prefix}.{module_name}.{name}"
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(full.encode()))
            sub._parameters[name] = torch.nn.Parameter(_init_value(full, param.shape, generator).to(dtype),
                                                       requires_grad=False)
        for name, buffer in sub._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                sub._buffers[name] = buffer.to(dtype)
    return module.eval()


def _write(component: str, path: Path, seed: int, dtype: torch.dtype, overrides: dict | None, **extra) -> None:
    module = materialize(build_meta(component, overrides, **extra), seed, dtype, component)
    module.save_pretrained(path, safe_serialization=True)
    del module


def _save_index(pipeline_class: str, path: Path, components: dict) -> None:
    """``model_index.json`` (so diffusers' own pipelines load the directory), from meta-device modules."""
    import diffusers

    getattr(diffusers, pipeline_class)(**components).save_config(path)


def make_full_size(
    out_dir: Path | str, seed: int = 0, dtype: str = "float16", variants: tuple[str, ...] = ("decoder",),
    overrides: dict | None = None,
) -> FullSizeCheckpoint:
    """Write ``prior`` and the ``variants`` (``decoder``, ``inpaint``, ``controlnet``) under ``out_dir``.

    ``overrides`` ({component: {config key: value}}) shrinks the architectures: for tests only.
    """
    from serve.training.clip import build_image_processor
    from serve.training.tiny import NUM_MERGES, decoder_scheduler, prior_scheduler
    from serve.training.tokenizer import build_tokenizer

    unknown = set(variants) - set(VARIANTS)
    if unknown or "decoder" not in variants:
        raise ValueError(f"variants {list(variants)}: must include 'decoder', each one of {list(VARIANTS)}")
    torch_dtype = DTYPES[dtype]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    prior_dir = out_dir / "prior"
    max_tokens = _config("text_encoder", overrides)["max_position_embeddings"]
    tokenizer = build_tokenizer(num_merges=NUM_MERGES, max_length=max_tokens)
    tokenizer.save_pretrained(prior_dir / "tokenizer")
    image_size = _config("image_encoder", overrides)["image_size"]
    processor = build_image_processor()
    processor.size, processor.crop_size = {"shortest_edge": image_size}, {"height": image_size, "width": image_size}
    processor.save_pretrained(prior_dir / "image_processor")
    prior_scheduler().save_pretrained(prior_dir / "scheduler")
    _write("text_encoder", prior_dir / "text_encoder", seed, torch_dtype, overrides, tokenizer=tokenizer)
    _write("image_encoder", prior_dir / "image_encoder", seed, torch_dtype, overrides)
    _write("prior", prior_dir / "prior", seed, torch_dtype, overrides)
    _save_index("KandinskyV22PriorPipeline", prior_dir, {
        "prior": build_meta("prior", overrides), "image_encoder": build_meta("image_encoder", overrides),
        "text_encoder": build_meta("text_encoder", overrides, tokenizer=tokenizer), "tokenizer": tokenizer,
        "scheduler": prior_scheduler(), "image_processor": processor,
    })
    check_layout(prior_dir, PRIOR_LAYOUT, "prior")

    paths = {}
    for variant in variants:
        directory, pipeline_class, unet_extra = VARIANTS[variant]
        path = paths[variant] = out_dir / directory
        _write("unet", path / "unet", seed + 1, torch_dtype, overrides, **unet_extra)
        _write("movq", path / "movq", seed, torch_dtype, overrides)  # one MOVQ, shared by every variant
        decoder_scheduler().save_pretrained(path / "scheduler")
        _save_index(pipeline_class, path, {"unet": build_meta("unet", overrides, **unet_extra),
                                           "scheduler": decoder_scheduler(), "movq": build_meta("movq", overrides)})
        check_layout(path, DECODER_LAYOUT, directory)
    return FullSizeCheckpoint(prior_dir, paths["decoder"], paths.get("inpaint"), paths.get("controlnet"))
