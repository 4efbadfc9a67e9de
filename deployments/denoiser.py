"""Stage 3: the decoder U-Net (``UNet2DConditionModel`` + the decoder's scheduler).

Image embeddings -> MOVQ latents with classifier-free guidance, exactly as
``KandinskyV22Pipeline`` computes them for one image per seed. Each image keeps
its own scheduler, timestep index and generator; the U-Net takes one timestep
per row, so images at different steps (or with different step counts) can share
a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ray import serve

from deployments.batching import StepObserver, group_by, run_until_done
from deployments.loading import DECODER_LAYOUT, CheckpointError, check_layout, load_pretrained, torch_dtype
from deployments.messages import DenoiseParams, ImageEmbeddings, Latents, StageTiming
from deployments.runtime import LoopReplica

STAGE = "denoiser"
LEARNED_VARIANCE = ("learned", "learned_range")


def latent_size(height: int, width: int, scale_factor: int) -> tuple[int, int]:
    """Latent height/width for an image size, by the reference pipelines' rounding rule."""

    def side(pixels: int) -> int:
        return -(-pixels // scale_factor**2) * scale_factor

    return side(height), side(width)


@dataclass
class DenoiseState:
    """One image's decoder denoising."""

    image_embeds: torch.Tensor  # (1, D)
    negative_image_embeds: torch.Tensor | None  # (1, D), only with guidance
    guidance_scale: float
    scheduler: object
    generator: torch.Generator
    latents: torch.Tensor  # (1, C, h, w)
    index: int = 0

    @property
    def total_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def finished(self) -> bool:
        return self.index >= self.total_steps

    @property
    def bucket(self) -> tuple[int, ...]:
        """States share a forward pass only with states of the same latent shape."""
        return tuple(self.latents.shape)

    @property
    def cost(self) -> int:
        """Latent pixels this state adds to a forward pass."""
        rows = 2 if self.negative_image_embeds is not None else 1
        return rows * self.latents.shape[-2] * self.latents.shape[-1]


class DenoiserModel:
    """The decoder U-Net's math, without Ray."""

    def __init__(self, unet, scheduler, movq_scale_factor: int, device: str = "cpu") -> None:
        self.unet = unet
        self.scheduler_class = type(scheduler)
        self.scheduler_config = scheduler.config
        self.movq_scale_factor = movq_scale_factor
        self.device = device
        self.dtype = unet.dtype
        self.latent_channels = unet.config.in_channels
        self.learned_variance = getattr(scheduler.config, "variance_type", None) in LEARNED_VARIANCE

    @classmethod
    def from_pretrained(cls, decoder_path: Path | str, device: str = "cpu", dtype: str = "float32") -> "DenoiserModel":
        import json

        import diffusers

        root = check_layout(decoder_path, DECODER_LAYOUT, "decoder")
        unet = load_pretrained(diffusers.UNet2DConditionModel, root, "unet", device, torch_dtype(dtype))
        scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        scheduler_class = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
            raise CheckpointError(
                f"{root}/scheduler/scheduler_config.json names {scheduler_config.get('_class_name')!r}, "
                "which is not a diffusers scheduler"
            )
        scheduler = load_pretrained(scheduler_class, root, "scheduler")
        # Only the MOVQ's config is needed here (its scale factor), not its weights.
        movq_config = json.loads((root / "movq" / "config.json").read_text())
        return cls(unet, scheduler, 2 ** (len(movq_config["block_out_channels"]) - 1), device)

    def start(self, image_embed: np.ndarray, negative_embed: np.ndarray, params: DenoiseParams, seed: int) -> DenoiseState:
        from diffusers.utils.torch_utils import randn_tensor

        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        scheduler.set_timesteps(params.num_steps, device=self.device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        height, width = latent_size(params.height, params.width, self.movq_scale_factor)
        shape = (1, self.latent_channels, height, width)
        latents = randn_tensor(shape, generator=generator, device=torch.device(self.device), dtype=self.dtype)

        def row(array: np.ndarray) -> torch.Tensor:
            # A copy: arrays that come through Ray's object store are read-only.
            return torch.tensor(array[None]).to(self.device, self.dtype)

        guided = params.guidance_scale > 1
        return DenoiseState(
            image_embeds=row(image_embed),
            negative_image_embeds=row(negative_embed) if guided else None,
            guidance_scale=params.guidance_scale,
            scheduler=scheduler,
            generator=generator,
            latents=latents * scheduler.init_noise_sigma,
        )

    @torch.inference_mode()
    def step(self, states: list[DenoiseState]) -> None:
        """One U-Net forward over every state (all must share a latent size), then each state's scheduler step."""
        samples, timesteps, embeds = [], [], []
        for state in states:
            t = state.scheduler.timesteps[state.index]
            conditions = [state.image_embeds]
            if state.negative_image_embeds is not None:
                conditions.insert(0, state.negative_image_embeds)
            for condition in conditions:
                samples.append(state.latents)
                timesteps.append(t.reshape(1))
                embeds.append(condition)
        output = self.unet(
            sample=torch.cat(samples),
            timestep=torch.cat(timesteps),
            encoder_hidden_states=None,
            added_cond_kwargs={"image_embeds": torch.cat(embeds)},
            return_dict=False,
        )[0]
        channels, offset = self.latent_channels, 0
        for state in states:
            if state.negative_image_embeds is not None:
                uncond, cond = output[offset : offset + 1], output[offset + 1 : offset + 2]
                offset += 2
                noise_uncond, _ = uncond.split(channels, dim=1)
                noise_cond, variance_cond = cond.split(channels, dim=1)
                guided = noise_uncond + state.guidance_scale * (noise_cond - noise_uncond)
                prediction = torch.cat([guided, variance_cond], dim=1)
            else:
                prediction = output[offset : offset + 1]
                offset += 1
            if not self.learned_variance:
                prediction = prediction[:, :channels]
            t = state.scheduler.timesteps[state.index]
            state.latents = state.scheduler.step(prediction, t, state.latents, generator=state.generator)[0]
            state.index += 1

    def start_all(self, embeddings: ImageEmbeddings, params: DenoiseParams) -> list[DenoiseState]:
        rows = zip(embeddings.image_embeds, embeddings.negative_image_embeds, embeddings.seeds, strict=True)
        return [self.start(embed, negative, params, seed) for embed, negative, seed in rows]

    @staticmethod
    def finish_all(states: list[DenoiseState]) -> np.ndarray:
        """One request's final latents, (N, C, h, w)."""
        return torch.cat([state.latents for state in states]).float().cpu().numpy()

    def generate(self, jobs: list[tuple[ImageEmbeddings, DenoiseParams]], observer: StepObserver | None = None) -> list[np.ndarray]:
        """Request batching: denoise whole jobs to the end; one latent size per forward pass."""
        states = [self.start_all(embeddings, params) for embeddings, params in jobs]
        flat = [state for job in states for state in job]
        for _, group in group_by(flat, key=lambda state: state.bucket):
            run_until_done(group, self.step, observer)
        return [self.finish_all(job) for job in states]


@serve.deployment(name="Denoiser", max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
class Denoiser(LoopReplica):
    """The U-Net's denoising loop, shared by many requests (step or request batching)."""

    def __init__(self, decoder_path: str, device: str = "cpu", dtype: str = "float32") -> None:
        self.setup(STAGE, device, lambda: DenoiserModel.from_pretrained(decoder_path, device, dtype))

    async def generate(self, embeddings: ImageEmbeddings, params: DenoiseParams) -> Latents:
        return await self.run_request(embeddings, params)

    def make_output(self, embeddings: ImageEmbeddings, params: DenoiseParams, latents, timing: StageTiming) -> Latents:
        return Latents(latents, embeddings.seeds, {**embeddings.timings, STAGE: timing})
