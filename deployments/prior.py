"""Stage 2: the diffusion prior (``PriorTransformer`` + ``UnCLIPScheduler``).

Text embeddings -> CLIP image embeddings, with classifier-free guidance, exactly
as ``KandinskyV22PriorPipeline`` computes them for one image per seed. Every
image keeps its own scheduler and generator, so its result does not depend on
what else shares the forward pass.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ray import serve

from deployments.batching import StepObserver, run_until_done
from deployments.loading import PRIOR_LAYOUT, check_layout, load_pretrained, torch_dtype
from deployments.performance import ModelOptions, set_attention
from deployments.messages import ClipImageEmbeddings, ImageEmbeddings, PriorParams, StageTiming, TextEmbeddings
from deployments.runtime import LoopReplica

STAGE = "prior"
logger = logging.getLogger("ray.serve")


Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # embeds, hidden states, mask


@dataclass
class PriorState:
    """One prior run for one image: ``k`` latent rows (2 when a negative prompt is embedded too)."""

    cond: Rows  # k rows
    uncond: Rows | None  # same, only with guidance
    guidance_scale: float
    scheduler: object
    generator: torch.Generator
    latents: torch.Tensor  # (k, D)
    index: int = 0
    start_index: int = 0
    """Variations (emb2emb) start part-way through the schedule."""

    @property
    def total_steps(self) -> int:
        return len(self.scheduler.timesteps) - self.start_index

    @property
    def finished(self) -> bool:
        return self.index >= len(self.scheduler.timesteps)

    bucket = None  # every prior state has the same row shape: one bucket serves all

    @property
    def cost(self) -> int:
        """Rows this state adds to a forward pass."""
        return len(self.latents) * (2 if self.uncond is not None else 1)


@dataclass
class MixState:
    """One image of a mix: its text items' prior runs, then the negative prompt's, one after
    another on one generator — as ``KandinskyV22PriorPipeline.interpolate`` draws them.

    To the loop it is a single long state; :meth:`PriorModel.step` steps its current run and
    starts the next one when it ends.
    """

    text: TextEmbeddings
    params: PriorParams
    image_embeds: np.ndarray | None
    generator: torch.Generator
    runs: list[tuple[list[int], list[int]]]  # (cond rows, uncond rows), in order
    current: PriorState | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)  # each finished run's embedding, (1, D)

    @property
    def total_steps(self) -> int:
        return len(self.runs) * self.params.num_steps

    @property
    def finished(self) -> bool:
        return self.current is None

    bucket = None

    @property
    def cost(self) -> int:
        return 2 if self.params.guidance_scale > 1 else 1


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
    def from_pretrained(cls, prior_path: Path | str, device: str = "cpu", dtype: str = "float32",
                        options: ModelOptions = ModelOptions()) -> "PriorModel":
        from diffusers import PriorTransformer, UnCLIPScheduler
        from transformers import CLIPVisionModelWithProjection

        root = check_layout(prior_path, PRIOR_LAYOUT, "prior", parts=("prior", "scheduler", "image_encoder"))
        prior = load_pretrained(PriorTransformer, root, "prior", device, torch_dtype(dtype))
        set_attention(prior, options.attention)
        scheduler = load_pretrained(UnCLIPScheduler, root, "scheduler")
        # The vision encoder is needed only for the all-zero image's embedding, the
        # default negative; it is dropped once that is cached.
        image_encoder = load_pretrained(CLIPVisionModelWithProjection, root, "image_encoder", device, torch_dtype(dtype),
                                        attn_implementation=options.attention)
        size = image_encoder.config.image_size
        with torch.inference_mode():
            zeros = torch.zeros(1, 3, size, size, device=device, dtype=image_encoder.dtype)
            zero_embed = image_encoder(zeros).image_embeds
        del image_encoder
        return cls(prior, scheduler, zero_embed, device)

    def _rows(self, array: np.ndarray, index: list[int]) -> torch.Tensor:
        # A copy: arrays that come through Ray's object store are read-only.
        return torch.tensor(array[index]).to(self.device)

    def _pick(self, text: TextEmbeddings, rows: list[int]) -> Rows:
        return (
            self._rows(text.text_embeds, rows).to(self.dtype),
            self._rows(text.hidden_states, rows).to(self.dtype),
            self._rows(text.attention_mask, rows),
        )

    def _run(
        self,
        text: TextEmbeddings,
        cond_rows: list[int],
        uncond_rows: list[int],
        params: PriorParams,
        generator: torch.Generator,
        init_embed: torch.Tensor | None = None,
    ) -> PriorState:
        """One prior run, drawing its initial noise from ``generator`` (as the pipelines do)."""
        from diffusers.utils.torch_utils import randn_tensor

        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        scheduler.set_timesteps(params.num_steps, device=self.device)
        shape = (len(cond_rows), self.prior.config.embedding_dim)
        noise = randn_tensor(shape, generator=generator, device=torch.device(self.device), dtype=self.dtype)
        start_index = 0
        if init_embed is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            # Emb2emb: the image's embedding, re-noised to the first timestep the strength keeps.
            from deployments.denoiser import strength_start

            start_index = strength_start(params.num_steps, params.strength)
            first = scheduler.timesteps[start_index : start_index + 1].repeat(len(cond_rows))
            latents = scheduler.add_noise(torch.cat([init_embed] * len(cond_rows)), noise, first)
        return PriorState(
            cond=self._pick(text, cond_rows),
            uncond=self._pick(text, uncond_rows) if params.guidance_scale > 1 else None,
            guidance_scale=params.guidance_scale,
            scheduler=scheduler,
            generator=generator,
            latents=latents,
            index=start_index,
            start_index=start_index,
        )

    def start(self, text: TextEmbeddings, params: PriorParams, seed: int, images: ClipImageEmbeddings | None = None):
        """Set up one image: a :class:`PriorState`, or a :class:`MixState` for a mix."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        if params.mix:
            return self._start_mix(text, params, generator, images)
        # As in the reference, a negative prompt is itself denoised (guided against itself)
        # and becomes the negative image embedding; "" is only the unconditional text.
        rows = params.rows
        cond_rows = [rows.prompt] if rows.negative is None else [rows.prompt, rows.negative]
        uncond_rows = [rows.unconditional] * len(cond_rows)
        init = None
        if params.strength is not None:
            if images is None:
                raise ValueError("variations need the input image's embedding")
            init = torch.tensor(images.image_embeds[:1]).to(self.device, self.dtype)
        return self._run(text, cond_rows, uncond_rows, params, generator, init)

    def _start_mix(self, text: TextEmbeddings, params: PriorParams, generator, images) -> MixState:
        texts = [term.index for term in params.mix if term.source == "text"]
        uncond = params.rows.unconditional
        runs = [([row], [uncond]) for row in texts]
        if params.rows.negative is not None:
            runs.append(([params.rows.negative], [uncond]))
        state = MixState(text, params, None if images is None else images.image_embeds, generator, runs)
        self._advance(state)
        return state

    def _advance(self, mix: MixState) -> None:
        """Record the finished run (if any) and start the next one on the same generator."""
        if mix.current is not None:
            mix.outputs.append(self.prior.post_process_latents(mix.current.latents))
        done = len(mix.outputs)
        if done < len(mix.runs):
            cond, uncond = mix.runs[done]
            mix.current = self._run(mix.text, cond, uncond, mix.params, mix.generator)
        else:
            mix.current = None

    @torch.inference_mode()
    def step(self, states: list) -> None:
        """One prior forward over every state's rows, then each state's own scheduler step."""
        runs = [state.current if isinstance(state, MixState) else state for state in states]
        parts: list[tuple[torch.Tensor, ...]] = []
        for state in runs:
            t = state.scheduler.timesteps[state.index]
            for embeds, hidden, mask in ([state.uncond] if state.uncond is not None else []) + [state.cond]:
                parts.append((state.latents, t.expand(len(embeds)), embeds, hidden, mask))
        latents, timesteps, embeds, hidden, mask = (torch.cat(column) for column in zip(*parts))
        predicted = self.prior(
            latents, timestep=timesteps, proj_embedding=embeds, encoder_hidden_states=hidden, attention_mask=mask
        ).predicted_image_embedding
        offset = 0
        for state in runs:
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
        for state in states:
            if isinstance(state, MixState) and state.current.finished:
                self._advance(state)

    @torch.inference_mode()
    def finish(self, state) -> tuple[np.ndarray, np.ndarray]:
        """(image embedding, negative image embedding) of one finished image, each (D,)."""
        if isinstance(state, MixState):
            return self._finish_mix(state)
        embeds = self.prior.post_process_latents(state.latents)
        negative = embeds[1] if len(embeds) == 2 else self.zero_image_embed[0]
        return embeds[0].float().cpu().numpy(), negative.float().cpu().numpy()

    def _finish_mix(self, mix: MixState) -> tuple[np.ndarray, np.ndarray]:
        outputs = iter(mix.outputs)
        weighted = []
        for term in mix.params.mix:
            if term.source == "text":
                embed = next(outputs)
            else:
                embed = torch.tensor(mix.image_embeds[term.index : term.index + 1]).to(self.device, self.dtype)
            weighted.append(embed.unsqueeze(0) * term.weight)
        # The same reduction as the reference: stack, then sum over the items.
        embed = torch.cat(weighted).sum(dim=0)[0]
        negative = next(outputs)[0] if mix.params.has_negative else self.zero_image_embed[0]
        return embed.float().cpu().numpy(), negative.float().cpu().numpy()

    @torch.inference_mode()
    def health_probe(self) -> None:
        """One prior forward on a single zero row (check_health)."""
        config = self.prior.config
        dim, tokens = config.embedding_dim, config.num_embeddings
        zeros = torch.zeros(1, dim, device=self.device, dtype=self.dtype)
        self.prior(
            zeros, timestep=torch.zeros(1, device=self.device, dtype=torch.long), proj_embedding=zeros,
            encoder_hidden_states=torch.zeros(1, tokens, dim, device=self.device, dtype=self.dtype),
            attention_mask=torch.ones(1, tokens, device=self.device, dtype=torch.bool),
        )

    def start_all(self, text: TextEmbeddings, params: PriorParams, images: ClipImageEmbeddings | None = None) -> list:
        return [self.start(text, params, seed, images) for seed in params.seeds]

    def finish_all(self, states: list) -> tuple[np.ndarray, np.ndarray]:
        """(image_embeds, negative_image_embeds), each (N, D), of one request's finished states."""
        pairs = [self.finish(state) for state in states]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def generate(self, jobs: list[tuple], observer: StepObserver | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Request batching: run whole jobs ``(text, params, images)`` together to the end."""
        states = [self.start_all(*job) for job in jobs]
        run_until_done([s for job in states for s in job], self.step, observer)
        return [self.finish_all(job) for job in states]


PRIORS_PER_REPLICA = int(os.environ.get("KANDINSKY_PRIORS_PER_REPLICA", "3"))
"""Fine-tuned priors one Prior replica keeps loaded (least recently used goes first)."""


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
class Prior(LoopReplica):
    """The prior's denoising loop, shared by many requests (step or request batching).

    Fine-tuned priors of the family (``fine_tuned``: id -> directory) are Ray Serve
    multiplexed models: a request naming one (``multiplexed_model_id``) is routed to a replica
    that has it loaded when there is one; a replica loads it on first use and keeps the
    :data:`PRIORS_PER_REPLICA` most recently used. Their images share the step loop with
    everyone's, but a forward pass only with images of the same prior (one bucket each).
    """

    def __init__(self, prior_path: str, device: str = "cpu", dtype: str = "float32",
                 fine_tuned: dict[str, str] | None = None, options: ModelOptions = ModelOptions()) -> None:
        self.fine_tuned_paths = dict(fine_tuned or {})
        self.model_dtype, self.model_options = dtype, options
        self.setup(STAGE, device, lambda: PriorModel.from_pretrained(prior_path, device, dtype, options))

    @serve.multiplexed(max_num_models_per_replica=PRIORS_PER_REPLICA)
    async def fine_tuned_prior(self, model_id: str) -> PriorModel:
        path = self.fine_tuned_paths.get(model_id)
        if path is None:
            raise ValueError(f"no fine-tuned prior {model_id!r} is configured for this stage")
        started = time.perf_counter()
        model = await self.thread.run(PriorModel.from_pretrained, path, self.device, self.model_dtype, self.model_options)
        self.metrics.model_switched(model_id, time.perf_counter() - started)
        logger.info("stage %s: loaded fine-tuned prior %s in %.2f s", self.stage, model_id, time.perf_counter() - started)
        return model

    async def generate(self, text: TextEmbeddings, params: PriorParams, images: ClipImageEmbeddings | None = None) -> ImageEmbeddings:
        model_id = serve.get_multiplexed_model_id() or params.model
        if not model_id:
            return await self.run_request(text, params, images)
        return await self.serve_call(self._run_fine_tuned(model_id, (text, params, images)), params.request_id)

    async def _run_fine_tuned(self, model_id: str, inputs: tuple) -> ImageEmbeddings:
        model = await self.fine_tuned_prior(model_id)
        started = time.perf_counter()
        states = model.start_all(*inputs)
        for state in states:
            state.bucket = model_id  # a forward pass holds one prior's images only
            state.runner = model
        if self.uses_scheduler:
            timing = self._timing(await self._run_on_scheduler(states, key=inputs[1].request_id), started)
        else:  # request batching batches the family's own prior; a fine-tuned one runs alone
            await self.thread.run(run_until_done, states, model.step, self.observer)
            timing = StageTiming(0.0, (time.perf_counter() - started) * 1000.0, 1)
        return self.make_output(inputs, await self.thread.run(model.finish_all, states), timing)

    def _step(self, states: list) -> None:
        getattr(states[0], "runner", self.model).step(states)

    def make_output(self, inputs: tuple, output, timing: StageTiming) -> ImageEmbeddings:
        text, params, images = inputs
        embeds, negative = output
        return ImageEmbeddings(embeds, negative, list(params.seeds), {self.stage: timing})
