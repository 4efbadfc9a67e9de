"""The whole tiny-Kandinsky recipe: data -> CLIP -> MOVQ (refined, latents rescaled) -> decoder -> prior -> two pipeline folders.

Deterministic from one seed on one machine (each stage derives its own seed; float rounding
differs between CPUs, and a stage retrained elsewhere drifts from the first steps). Each finished stage is
kept under ``work_dir`` (``work_dir/<stage>/``, with the loss log) so that an
interrupted run resumes where it stopped; ``summary.json`` records the settings,
each stage's seconds and last losses, and the checkpoint size.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from serve.training import clip as clip_mod
from serve.training import decoder as decoder_mod
from serve.training import movq as movq_mod
from serve.training import prior as prior_mod
from serve.training.common import seed_everything
from serve.training.tiny import decoder_scheduler, prior_scheduler
from serve.training.data import DATA_VERSION, make_scene_set


@dataclass(frozen=True)
class RecipeConfig:
    seed: int = 0
    num_scenes: int = 12000
    free_fraction: float = 0.3  # scenes in an unnamed colour (see serve.training.data)
    clip_steps: int = 6000
    clip_batch: int = 128
    clip_lr: float = 1e-3
    movq_steps: int = 2200
    movq_schedule_steps: int | None = None  # the learning-rate schedule's length (None: movq_steps)
    movq_batch: int = 8  # 2200 steps of 8 take the time of 1200 of 16 (with the edge term: README)
    movq_crop: int = 64  # whole images: the encoder's GroupNorm sees other statistics on crops
    movq_lr: float = 2e-3
    movq_edge_weight: float = 1.0  # serve.training.movq.reconstruction_loss
    movq_refine_steps: int = 200  # then the decoder half alone, encoder (and so the latents) frozen
    movq_latent_scale: float = 2.0  # the trained MOVQ reparametrised to latents this many times larger (movq.scale_latents)
    prior_steps: int = 2000
    prior_batch: int = 64
    prior_lr: float = 1e-3
    decoder_scenes: int = 12000  # the first N scenes' MOVQ latents
    decoder_steps: int = 3800
    decoder_batch: int = 64
    decoder_lr: float = 1e-3
    decoder_low_noise_t: int = 250  # below this timestep ...
    decoder_mismatch: float = 0.5  # ... this share of rows sees another image's embedding (serve.training.decoder)
    decoder_channels: tuple[int, int] = (48, 96)
    decoder_ema: float = 0.999  # > 0: ship the moving average of the U-Net's weights


PRESETS = {
    "full": RecipeConfig(),
    # Plumbing only: every stage runs a few steps (tests, and trying the command out).
    "smoke": RecipeConfig(
        num_scenes=128, clip_steps=3, clip_batch=32, movq_steps=3, movq_schedule_steps=None, movq_refine_steps=2, movq_batch=4, prior_steps=3,
        prior_batch=16, decoder_scenes=64, decoder_steps=3, decoder_batch=16,
    ),
}


def _architecture(*models) -> list:
    """The models' configs without bookkeeping keys (``_use_default_values`` is a set's order)."""
    configs = [dict(m.config.to_dict() if hasattr(m.config, "to_dict") else m.config) for m in models]
    return [{k: v for k, v in c.items() if not k.startswith("_") and k != "transformers_version"} for c in configs]


# The settings each stage depends on (its own and those of the stages it builds on), so that
# changing, say, the decoder's steps reuses the finished CLIP, MOVQ and prior.
_DATA_FIELDS = ("seed", "num_scenes", "free_fraction")
_MOVQ_FIELDS = (*_DATA_FIELDS, "movq_steps", "movq_schedule_steps", "movq_batch", "movq_crop", "movq_lr", "movq_edge_weight")
_STAGE_FIELDS = {
    "clip": (*_DATA_FIELDS, "clip_"),
    "movq": _MOVQ_FIELDS,
    "movq_refine": (*_MOVQ_FIELDS, "movq_refine_steps"),
    "prior": (*_DATA_FIELDS, "clip_", "prior_"),
    # Not the refinement: it leaves the encoder, and so the latents, as they are.
    "decoder": ("clip_", *_MOVQ_FIELDS, "movq_latent_scale", "decoder_"),
}


def _key(name: str, config: RecipeConfig, models) -> str:
    fields = {k: v for k, v in asdict(config).items() if any(k == f or (f.endswith("_") and k.startswith(f)) for f in _STAGE_FIELDS[name])}
    return json.dumps({"recipe": fields, "data": DATA_VERSION, "models": _architecture(*models)}, sort_keys=True, default=str)


def _stage(work_dir: Path | None, name: str, config: RecipeConfig, *models):
    """(cached state dict or None, path to save to) for one stage; the cache is keyed by
    the settings the stage depends on and the models' architecture."""
    if work_dir is None:
        return None, None
    path = work_dir / name / "state.pt"
    key_path = work_dir / name / "config.json"
    key = _key(name, config, models)
    if path.is_file() and key_path.is_file() and key_path.read_text() == key:
        return torch.load(path, weights_only=True), path
    return None, path


def _save_stage(path: Path | None, config: RecipeConfig, models, state: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    (path.parent / "config.json").write_text(_key(path.parent.name, config, models))


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _prior_stage(work_dir, config, data, tokenizer, text_encoder, image_encoder, image_embeds, stages, progress):
    prior = prior_mod.build_prior(clip_mod.CLIP_DIM, clip_mod.MAX_TOKENS, config.seed + 30)
    prior_mod.set_clip_stats(prior, image_embeds)
    prior.to(image_embeds.device)
    scheduler = prior_scheduler()
    cached, path = _stage(work_dir, "prior", config, text_encoder, image_encoder, prior)
    if cached is None:
        stages["prior"] = prior_mod.prior_training_loop(
            prior, prior, scheduler, tokenizer, text_encoder, prior_mod.PriorData(image_embeds, data.captions),
            config.prior_steps, config.prior_batch, config.prior_lr, config.seed + 31,
            log_path=work_dir / "logs" / "prior.jsonl", progress=progress,
        )
        _save_stage(path, config, (text_encoder, image_encoder, prior), {"prior": prior.state_dict(), "log": stages["prior"]})
    else:
        prior.load_state_dict(cached["prior"])
        stages["prior"] = {**cached["log"], "cached": True}
    return prior.eval().requires_grad_(False), scheduler


def _movq_refine_stage(work_dir, config, data, movq, stages, progress, device):
    cached, path = _stage(work_dir, "movq_refine", config, movq)
    if cached is None:
        stages["movq_refine"] = movq_mod.refine_movq_decoder(
            movq, data.images, config.movq_refine_steps, config.movq_batch, config.movq_lr / 2, config.seed + 22,
            work_dir / "logs" / "movq_refine.jsonl", progress, device=device, edge_weight=config.movq_edge_weight,
        )
        _save_stage(path, config, (movq,), {"movq": movq.state_dict(), "log": stages["movq_refine"]})
    else:
        movq.load_state_dict(cached["movq"])
        stages["movq_refine"] = {**cached["log"], "cached": True}
    movq.eval().requires_grad_(False)


def train_tiny(
    out_dir: Path | str, config: RecipeConfig = RecipeConfig(), work_dir: Path | str | None = None, progress: bool = True,
    only: str | None = None, device: str = "cpu",
) -> dict:
    """Train all four components and write ``out_dir/prior`` and ``out_dir/decoder``
    (the layouts of ``kandinsky-2-2-prior`` / ``-decoder``); return the summary.

    ``only="prior"`` trains CLIP (or reuses it) and the prior, caches the prior in
    ``work_dir`` and returns: a second process can train the prior while this one
    trains the MOVQ and the decoder (which come first here for that reason), sharing
    ``work_dir``; the full run then finds the prior finished. ``only="movq_refine"`` stops
    after the MOVQ and its decoder-half refinement.

    ``device`` ("cpu", "cuda") is where the models train; random draws come from CPU
    generators either way, so a run is deterministic per device (not bit-equal across them).
    """
    if only not in (None, "prior", "movq_refine"):
        raise ValueError(f"only={only!r}: the stages that run alone are 'prior' and 'movq_refine'")
    from diffusers import KandinskyV22Pipeline

    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir / "work"
    logs = work_dir / "logs"
    seed = config.seed
    started = time.perf_counter()
    stages: dict[str, dict] = {}

    seed_everything(seed)
    t0 = time.perf_counter()
    data = make_scene_set(config.num_scenes, seed, free_fraction=config.free_fraction)
    stages["data"] = {"seconds": round(time.perf_counter() - t0, 1), "scenes": len(data)}

    # 1. CLIP (text + vision), with the tokenizer learned from the caption vocabulary.
    tokenizer = clip_mod.build_trained_tokenizer()
    text_encoder, image_encoder = clip_mod.build_clip(tokenizer, seed + 10)
    cached, path = _stage(work_dir, "clip", config, text_encoder, image_encoder)
    if cached is None:
        stages["clip"] = clip_mod.train_clip(
            text_encoder, image_encoder, tokenizer, data, config.clip_steps, config.clip_batch, config.clip_lr,
            seed + 11, logs / "clip.jsonl", progress, device=device,
        )
        _save_stage(path, config, (text_encoder, image_encoder), {"text": text_encoder.state_dict(), "image": image_encoder.state_dict(), "log": stages["clip"]})
    else:
        text_encoder.to(device).load_state_dict(cached["text"])
        image_encoder.to(device).load_state_dict(cached["image"])
        stages["clip"] = {**cached["log"], "cached": True}
    text_encoder.eval().requires_grad_(False)
    image_encoder.eval().requires_grad_(False)

    # Targets shared by the prior and the decoder.
    t0 = time.perf_counter()
    image_embeds = clip_mod.image_embeddings(image_encoder, data.images)
    zero_embed = clip_mod.zero_image_embedding(image_encoder)
    stages["encode"] = {"seconds": round(time.perf_counter() - t0, 1)}

    if only == "prior":  # the prior alone (another process trains the rest)
        _prior_stage(work_dir, config, data, tokenizer, text_encoder, image_encoder, image_embeds, stages, progress)
        return {"config": asdict(config), "stages": stages, "total_seconds": round(time.perf_counter() - started, 1)}

    # 2. MOVQ autoencoder.
    movq = movq_mod.build_movq(seed + 20)
    cached, path = _stage(work_dir, "movq", config, movq)
    if cached is None:
        stages["movq"] = movq_mod.train_movq(
            movq, data.images, config.movq_steps, config.movq_batch, config.movq_lr, seed + 21,
            logs / "movq.jsonl", progress, crop=config.movq_crop, schedule_steps=config.movq_schedule_steps, device=device,
            edge_weight=config.movq_edge_weight,
        )
        _save_stage(path, config, (movq,), {"movq": movq.state_dict(), "log": stages["movq"]})
    else:
        movq.to(device).load_state_dict(cached["movq"])
        stages["movq"] = {**cached["log"], "cached": True}
    movq.eval().requires_grad_(False)

    # 3. The MOVQ's decoder half alone, encoder frozen (the latents stay as they are).
    _movq_refine_stage(work_dir, config, data, movq, stages, progress, device)
    if only == "movq_refine":
        return {"config": asdict(config), "stages": stages, "total_seconds": round(time.perf_counter() - started, 1)}

    # 4. The same MOVQ reparametrised to larger latents: the scale the U-Net learns and the
    # pipelines use (the stage caches keep the MOVQ as trained).
    movq_mod.scale_latents(movq, config.movq_latent_scale)

    # 5. Decoder U-Net on MOVQ latents, conditioned on image embeddings.
    unet = decoder_mod.build_unet(clip_mod.CLIP_DIM, movq_mod.LATENT_CHANNELS, seed + 40, config.decoder_channels).to(device)
    scheduler_of_decoder = decoder_scheduler()
    cached, path = _stage(work_dir, "decoder", config, image_encoder, movq, unet)
    if cached is None:
        t0 = time.perf_counter()
        decoder_count = min(config.decoder_scenes, len(data))
        latents = movq_mod.encode_latents(movq, data.images[:decoder_count])
        stages["encode_latents"] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "latent_mean": round(latents.mean().item(), 4),
            "latent_std": round(latents.std().item(), 4),
        }
        stages["decoder"] = decoder_mod.train_decoder(
            unet, scheduler_of_decoder, latents, image_embeds[:decoder_count], zero_embed, config.decoder_steps, config.decoder_batch,
            config.decoder_lr, seed + 41, logs / "decoder.jsonl", progress, config.decoder_low_noise_t, config.decoder_mismatch,
            config.decoder_ema,
        )
        _save_stage(path, config, (image_encoder, movq, unet), {"unet": unet.state_dict(), "log": stages["decoder"]})
    else:
        unet.load_state_dict(cached["unet"])
        stages["decoder"] = {**cached["log"], "cached": True}
    unet.eval().requires_grad_(False)

    # 6. Prior: text -> CLIP image embedding.
    prior, scheduler = _prior_stage(work_dir, config, data, tokenizer, text_encoder, image_encoder, image_embeds, stages, progress)
    for model in (text_encoder, image_encoder, movq, prior, unet):
        model.to("cpu")

    # 7. The two folders, saved exactly as serve/training/tiny.py:make_tiny saves them.
    prior_dir = prior_mod.save_prior_pipeline(
        {
            "prior": prior, "image_encoder": image_encoder, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler, "image_processor": clip_mod.build_image_processor(),
        },
        out_dir / "prior",
    )
    decoder_dir = out_dir / "decoder"
    KandinskyV22Pipeline(unet=unet, scheduler=scheduler_of_decoder, movq=movq).save_pretrained(decoder_dir, safe_serialization=True)
    from deployments.loading import DECODER_LAYOUT, check_layout

    check_layout(decoder_dir, DECODER_LAYOUT, "decoder")
    weights = sum(f.stat().st_size for d in (prior_dir, decoder_dir) for f in d.rglob("*.safetensors"))
    summary = {
        "config": asdict(config),
        "torch_threads": torch.get_num_threads(),
        "stages": stages,
        "total_seconds": round(time.perf_counter() - started, 1),
        "weights_bytes": weights,
        "checkpoint_bytes": _dir_size(prior_dir) + _dir_size(decoder_dir),
        "parameters": {
            name: sum(p.numel() for p in model.parameters())
            for name, model in (("text_encoder", text_encoder), ("image_encoder", image_encoder), ("movq", movq), ("prior", prior), ("unet", unet))
        },
    }
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def preset(name: str, **overrides) -> RecipeConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
