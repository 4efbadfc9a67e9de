"""Stage 2: the diffusion prior (``PriorTransformer`` + ``UnCLIPScheduler``).

Text embeddings -> CLIP image embeddings, with classifier-free guidance, exactly
as ``KandinskyV22PriorPipeline`` computes them for one image per seed. Every
image keeps its own scheduler and generator, so its result does not depend on
what else shares the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ray import serve

from deployments.batching import StepObserver, run_until_done
from deployments.loading import PRIOR_LAYOUT, check_layout, load_pretrained, torch_dtype
from deployments.messages import ImageEmbeddings, PriorParams, StageTiming, TextEmbeddings
from deployments.runtime import LoopReplica

STAGE = "prior"


@dataclass
class PriorState:
    """One image's prior denoising: ``k`` latent rows (2 when a negative prompt is embedded too)."""

    cond: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # embeds, hidden states, mask; k rows
    uncond: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # same, only with guidance
    guidance_scale: float
    scheduler: object
    generator: torch.Generator
    latents: torch.Tensor  # (k, D)
    index: int = 0

    @property
    def total_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def finished(self) -> bool:
        return self.index >= self.total_steps

    bucket = None  # every prior state has the same row shape: one bucket serves all

    @property
    def cost(self) -> int:
        """Rows this state adds to a forward pass."""
        return len(self.latents) * (2 if self.uncond is not None else 1)


class PriorModel:
    """The prior's math, without Ray."""

    def __init__(self, prior, scheduler, zero_image_embed: torch.Tensor, device: str = "cpu") -> None:
        self.prior = prior
        self.scheduler_class = type(scheduler)
        self.scheduler_config = scheduler.config
        self.zero_image_embed = zero_image_embed  # (1, D), computed once: it never changes
        self.device = device
        self.dtype = prior.dtype

    @classmethod
    def from_pretrained(cls, prior_path: Path | str, device: str = "cpu", dtype: str = "float32") -> "PriorModel":
        from diffusers import PriorTransformer, UnCLIPScheduler
        from transformers import CLIPVisionModelWithProjection

        root = check_layout(prior_path, PRIOR_LAYOUT, "prior", parts=("prior", "scheduler", "image_encoder"))
        prior = load_pretrained(PriorTransformer, root, "prior", device, torch_dtype(dtype))
        scheduler = load_pretrained(UnCLIPScheduler, root, "scheduler")
        # The vision encoder is needed only for the all-zero image's embedding, the
        # default negative; it is dropped once that is cached.
        image_encoder = load_pretrained(CLIPVisionModelWithProjection, root, "image_encoder", device, torch_dtype(dtype))
        size = image_encoder.config.image_size
        with torch.inference_mode():
            zeros = torch.zeros(1, 3, size, size, device=device, dtype=image_encoder.dtype)
            zero_embed = image_encoder(zeros).image_embeds
        del image_encoder
        return cls(prior, scheduler, zero_embed, device)

    def _rows(self, array: np.ndarray, index: list[int]) -> torch.Tensor:
        # A copy: arrays that come through Ray's object store are read-only.
        return torch.tensor(array[index]).to(self.device)

    def start(self, text: TextEmbeddings, params: PriorParams, seed: int) -> PriorState:
        """Set up one image. Row 0 of ``text`` is the prompt, row 1 the negative prompt or ""."""
        from diffusers.utils.torch_utils import randn_tensor

        # As in the reference: a negative prompt is itself denoised (guided against
        # itself) and becomes the negative image embedding; "" is only the unconditional text.
        cond_rows = [0, 1] if params.has_negative else [0]
        uncond_rows = [1, 1] if params.has_negative else [1]
        def pick(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return (
                self._rows(text.text_embeds, rows).to(self.dtype),
                self._rows(text.hidden_states, rows).to(self.dtype),
                self._rows(text.attention_mask, rows),
            )

        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        scheduler.set_timesteps(params.num_steps, device=self.device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        shape = (len(cond_rows), self.prior.config.embedding_dim)
        latents = randn_tensor(shape, generator=generator, device=torch.device(self.device), dtype=self.dtype)
        return PriorState(
            cond=pick(cond_rows),
            uncond=pick(uncond_rows) if params.guidance_scale > 1 else None,
            guidance_scale=params.guidance_scale,
            scheduler=scheduler,
            generator=generator,
            latents=latents * scheduler.init_noise_sigma,
        )

    @torch.inference_mode()
    def step(self, states: list[PriorState]) -> None:
        """One prior forward over every state's rows, then each state's own scheduler step."""
        parts: list[tuple[torch.Tensor, ...]] = []
        for state in states:
            t = state.scheduler.timesteps[state.index]
            for embeds, hidden, mask in ([state.uncond] if state.uncond is not None else []) + [state.cond]:
                parts.append((state.latents, t.expand(len(embeds)), embeds, hidden, mask))
        latents, timesteps, embeds, hidden, mask = (torch.cat(column) for column in zip(*parts))
        predicted = self.prior(
            latents, timestep=timesteps, proj_embedding=embeds, encoder_hidden_states=hidden, attention_mask=mask
        ).predicted_image_embedding
        offset = 0
        for state in states:
            k = len(state.latents)
            if state.uncond is not None:
                uncond, cond = predicted[offset : offset + k], predicted[offset + k : offset + 2 * k]
                prediction = uncond + state.guidance_scale * (cond - uncond)
                offset += 2 * k
            else:
                prediction = predicted[offset : offset + k]
                offset += k
            timesteps = state.scheduler.timesteps
            t = timesteps[state.index]
            prev_t = None if state.index + 1 == len(timesteps) else timesteps[state.index + 1]
            state.latents = state.scheduler.step(
                prediction, timestep=t, sample=state.latents, generator=state.generator, prev_timestep=prev_t
            ).prev_sample
            state.index += 1

    @torch.inference_mode()
    def finish(self, state: PriorState) -> tuple[np.ndarray, np.ndarray]:
        """(image embedding, negative image embedding) of one finished image, each (D,)."""
        embeds = self.prior.post_process_latents(state.latents)
        negative = embeds[1] if len(embeds) == 2 else self.zero_image_embed[0]
        return embeds[0].float().cpu().numpy(), negative.float().cpu().numpy()

    def start_all(self, text: TextEmbeddings, params: PriorParams) -> list[PriorState]:
        return [self.start(text, params, seed) for seed in params.seeds]

    def finish_all(self, states: list[PriorState]) -> tuple[np.ndarray, np.ndarray]:
        """(image_embeds, negative_image_embeds), each (N, D), of one request's finished states."""
        pairs = [self.finish(state) for state in states]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def generate(self, jobs: list[tuple[TextEmbeddings, PriorParams]], observer: StepObserver | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Request batching: run whole jobs together to the end; one embeddings pair per job."""
        states = [self.start_all(text, params) for text, params in jobs]
        run_until_done([s for job in states for s in job], self.step, observer)
        return [self.finish_all(job) for job in states]


@serve.deployment(name="Prior", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
class Prior(LoopReplica):
    """The prior's denoising loop, shared by many requests (step or request batching)."""

    def __init__(self, prior_path: str, device: str = "cpu", dtype: str = "float32") -> None:
        self.setup(STAGE, device, lambda: PriorModel.from_pretrained(prior_path, device, dtype))

    async def generate(self, text: TextEmbeddings, params: PriorParams) -> ImageEmbeddings:
        return await self.run_request(text, params)

    def make_output(self, text: TextEmbeddings, params: PriorParams, output, timing: StageTiming) -> ImageEmbeddings:
        embeds, negative = output
        return ImageEmbeddings(embeds, negative, list(params.seeds), {**text.timings, STAGE: timing})
