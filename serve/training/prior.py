"""The prior: ``PriorTransformer`` maps CLIP text features to a CLIP image embedding.

As in Kandinsky 2.2 (and DALL·E 2): the model predicts the clean image embedding
itself (``prediction_type="sample"``) in a space normalised by ``clip_mean`` /
``clip_std`` (``post_process_latents`` undoes it), conditioned on the text
encoder's ``text_embeds`` and ``last_hidden_state`` with the tokenizer's attention
mask. Classifier-free guidance: a fraction of the captions is replaced by ``""``,
the prompt the prior pipeline uses as the unconditional one.

:func:`prior_training_loop` is the one loop behind the tiny recipe, single-machine
fine-tuning and each Ray Train worker (DDP); :func:`finetune_prior` wires a folder
of captioned images to it, with the base checkpoint's own CLIP encoders for targets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from serve.training.common import LossLog, optimiser_step, optimizer_and_schedule

UNCOND_PROB = 0.1


def build_prior(clip_dim: int, max_tokens: int, seed: int, heads: int = 4):
    from diffusers import PriorTransformer

    torch.manual_seed(seed)
    return PriorTransformer(
        num_attention_heads=heads,
        attention_head_dim=clip_dim // heads,
        num_layers=2,
        embedding_dim=clip_dim,
        num_embeddings=max_tokens,
        additional_embeddings=4,
    )


def set_clip_stats(prior, image_embeds: torch.Tensor) -> None:
    """``clip_mean`` / ``clip_std`` from the training image embeddings (``post_process_latents`` uses them)."""
    prior.clip_mean = torch.nn.Parameter(image_embeds.mean(0, keepdim=True).clone(), requires_grad=False)
    prior.clip_std = torch.nn.Parameter(image_embeds.std(0, keepdim=True).clamp(min=1e-3).clone(), requires_grad=False)


@torch.no_grad()
def encode_text(tokenizer, text_encoder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text_embeds, last_hidden_state, mask) exactly as ``KandinskyV22PriorPipeline._encode_prompt`` computes them."""
    tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    output = text_encoder(tokens.input_ids.to(text_encoder.device))
    return output.text_embeds, output.last_hidden_state, tokens.attention_mask.bool().to(text_encoder.device)


def prior_loss(model, scheduler, clip_mean, clip_std, text_embeds, hidden, mask, image_embeds, generator) -> torch.Tensor:
    """x0-prediction MSE in the normalised embedding space, at a uniformly drawn timestep."""
    target = (image_embeds - clip_mean) / clip_std
    n, device = target.shape[0], target.device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
    alpha_bar = scheduler.alphas_cumprod[t].unsqueeze(1).to(device)
    t = t.to(device)
    noise = torch.randn(target.shape, generator=generator).to(device)
    noisy = alpha_bar.sqrt() * target + (1 - alpha_bar).sqrt() * noise
    predicted = model(noisy, timestep=t, proj_embedding=text_embeds, encoder_hidden_states=hidden, attention_mask=mask).predicted_image_embedding
    return F.mse_loss(predicted, target)


@dataclass
class PriorData:
    """Image embeddings (targets) and, per image, a way to draw a caption."""

    image_embeds: torch.Tensor  # (N, D)
    draw_captions: Callable[[Sequence[int], random.Random], list[str]]

    def __len__(self) -> int:
        return len(self.image_embeds)


@dataclass
class CaptionLists:
    """A ``draw_captions`` for fixed caption lists: one of each image's captions at random
    (a plain object, so it travels to Ray Train workers)."""

    captions: list[list[str]]

    def __call__(self, indices: Sequence[int], rng: random.Random) -> list[str]:
        return [rng.choice(self.captions[i]) for i in indices]


def captions_from_lists(captions: list[list[str]]) -> CaptionLists:
    return CaptionLists([list(c) for c in captions])


def prior_training_loop(
    model, prior, scheduler, tokenizer, text_encoder, data: PriorData, steps: int, batch_size: int, lr: float,
    seed: int, rank: int = 0, world_size: int = 1, log_path=None, progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` (``prior`` itself, or ``prior`` wrapped in DDP) for ``steps`` steps.

    With ``world_size`` > 1 every rank draws the same global batch order from
    ``seed`` and takes its own slice of it (``batch_size`` is per rank), so the
    gradient DDP averages is that of the global batch.
    """
    model.train()
    optimizer, schedule = optimizer_and_schedule(model.parameters(), lr, steps)
    order_generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator().manual_seed(seed * 1000 + rank + 1)
    rng = random.Random(seed * 1000 + rank)
    global_batch = batch_size * world_size
    n = len(data)
    log = LossLog("prior", steps, log_path, progress=progress and rank == 0)
    order, position = torch.randperm(n, generator=order_generator), 0
    for step in range(steps):
        if position + global_batch > n:
            order, position = torch.randperm(n, generator=order_generator), 0
        chunk = order[position : position + global_batch]
        if len(chunk) < global_batch:  # datasets smaller than a global batch: sample with replacement
            chunk = torch.randint(0, n, (global_batch,), generator=order_generator)
        position += global_batch
        indices = chunk[rank * batch_size : (rank + 1) * batch_size].tolist()
        texts = [("" if rng.random() < UNCOND_PROB else text) for text in data.draw_captions(indices, rng)]
        text_embeds, hidden, mask = encode_text(tokenizer, text_encoder, texts)
        loss = prior_loss(model, scheduler, prior.clip_mean, prior.clip_std, text_embeds, hidden, mask, data.image_embeds[indices], noise_generator)
        optimiser_step(loss, optimizer, schedule, model.parameters())
        log.step(step, loss=loss.item())
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()
    return log.close()


# --- fine-tuning a checkpoint on a folder of captioned images ---------------------------


def load_prior_components(base: Path | str) -> dict:
    """The six components of a ``kandinsky-2-2-prior`` directory (safetensors only, offline)."""
    from diffusers import PriorTransformer, UnCLIPScheduler
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    from deployments.loading import PRIOR_LAYOUT, check_layout, load_pretrained

    root = check_layout(base, PRIOR_LAYOUT, "prior")
    components = {
        "prior": load_pretrained(PriorTransformer, root, "prior", dtype=torch.float32),
        "text_encoder": load_pretrained(CLIPTextModelWithProjection, root, "text_encoder", dtype=torch.float32),
        "image_encoder": load_pretrained(CLIPVisionModelWithProjection, root, "image_encoder", dtype=torch.float32),
        "tokenizer": load_pretrained(CLIPTokenizer, root, "tokenizer"),
        "scheduler": load_pretrained(UnCLIPScheduler, root, "scheduler"),
        "image_processor": load_pretrained(CLIPImageProcessor, root, "image_processor"),
    }
    components["prior"].requires_grad_(True)
    components["prior"].clip_mean.requires_grad_(False)
    components["prior"].clip_std.requires_grad_(False)
    return components


@torch.no_grad()
def folder_prior_data(folder: Path | str, image_processor, image_encoder, batch_size: int = 64) -> PriorData:
    """Targets from the checkpoint's own image processor and image encoder; captions from the files."""
    from PIL import Image

    from serve.training.data import load_caption_folder

    pairs = load_caption_folder(folder)
    embeds = []
    for start in range(0, len(pairs), batch_size):
        images = [Image.open(path).convert("RGB") for path, _ in pairs[start : start + batch_size]]
        pixels = image_processor(images, return_tensors="pt").pixel_values.to(image_encoder.dtype)
        embeds.append(image_encoder(pixel_values=pixels).image_embeds.float())
    return PriorData(torch.cat(embeds), captions_from_lists([captions for _, captions in pairs]))


def save_prior_pipeline(components: dict, out: Path | str) -> Path:
    from diffusers import KandinskyV22PriorPipeline

    from deployments.loading import PRIOR_LAYOUT, check_layout

    out = Path(out)
    backend = getattr(components["tokenizer"], "backend_tokenizer", None)
    if backend is not None:
        # A fast tokenizer's backend keeps the padding of its last call and tokenizer.json
        # saves it: without this the file depends on whether the prior trained in this process.
        backend.no_padding()
        backend.no_truncation()
    KandinskyV22PriorPipeline(**components).save_pretrained(out, safe_serialization=True)
    return check_layout(out, PRIOR_LAYOUT, "prior")
