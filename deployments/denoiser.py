"""Stage 3: the decoder U-Net (``UNet2DConditionModel`` + the decoder's scheduler).

Image embeddings -> MOVQ latents with classifier-free guidance, exactly as
``KandinskyV22Pipeline`` computes them for one image per seed — or, for a Kandinsky 2.1
U-Net (conditioned on the decoder's own text encoding too), as ``KandinskyPipeline``,
``KandinskyImg2ImgPipeline`` and ``KandinskyInpaintPipeline`` do. Each image keeps
its own scheduler, timestep index and generator; the U-Net takes one timestep
per row, so images at different steps (or with different step counts) can share
a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2 import downscale_height_and_width
from ray import serve

from deployments.batching import StepObserver, group_by, run_until_done
from deployments.loading import DECODER_LAYOUT, CheckpointError, check_layout, load_pretrained, torch_dtype
from deployments.messages import (
    SCHEDULERS,
    DenoiseParams,
    ImageEmbeddings,
    ImageLatents,
    Latents,
    StageTiming,
    TextEmbeddings,
)
from deployments.performance import (
    ModelOptions, compiled, cuda_graphs, graph_step, pad_rows, padded_size, prepare_convolutional, to_memory_format,
)
from deployments.runtime import LoopReplica

STAGE = "denoiser"
LEARNED_VARIANCE = ("learned", "learned_range")


def strength_start(num_steps: int, strength: float) -> int:
    """Index of the first timestep an image-to-image run executes, by the pipelines' rule."""
    return max(num_steps - min(int(num_steps * strength), num_steps), 0)


def add_noise_21(latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
    """``KandinskyImg2ImgPipeline.add_noise``: 2.1 noises the input image with a beta schedule
    of its own (linear 1e-4 to 0.02 over 1000 steps), whatever the sampling scheduler is, at
    ``int(num_train_timesteps * strength) - 2``."""
    betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float32)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(device=latents.device, dtype=latents.dtype)
    alpha = alphas_cumprod[timestep]
    return alpha**0.5 * latents + (1 - alpha) ** 0.5 * noise


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
    start_index: int = 0
    """Image-to-image starts part-way through the schedule."""
    step_takes_generator: bool = True
    conditioning: torch.Tensor | None = None
    """Inpainting: masked-image latents and keep-mask, (1, C + 1, h, w), appended to every U-Net input."""
    hint: torch.Tensor | None = None
    """ControlNet: the (1, 3, H, W) hint in [0, 1]."""
    image_latents: torch.Tensor | None = None
    keep_mask: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    """Inpainting (2.2): the kept region is re-imposed from these after every step."""
    text: tuple[torch.Tensor, torch.Tensor] | None = None
    """2.1: the decoder's text encoding of the prompt, pooled (1, D) and hidden states (1, L, H)."""
    negative_text: tuple[torch.Tensor, torch.Tensor] | None = None
    """2.1, with guidance: the same for the negative prompt (or ``""``)."""

    @property
    def total_steps(self) -> int:
        return len(self.scheduler.timesteps) - self.start_index

    @property
    def finished(self) -> bool:
        return self.index >= len(self.scheduler.timesteps)

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
    """The decoder U-Net's math, without Ray: text-to-image and image-to-image, inpainting
    or ControlNet, by the checkpoint's U-Net."""

    def __init__(self, unet, scheduler, movq_scale_factor: int, latent_channels: int = 4, device: str = "cpu",
                 options: ModelOptions = ModelOptions()) -> None:
        self.unet = unet
        self.channels_last = options.channels_last
        self.buckets = options.batch_buckets if options.compile else None
        """Step batches are padded to these row counts, so a compiled U-Net reuses its graphs."""
        self.graph_replays = cuda_graphs(options)
        self.scheduler_config = scheduler.config
        self.movq_scale_factor = movq_scale_factor
        self.device = device
        self.dtype = unet.dtype
        self.latent_channels = latent_channels
        self.text_conditioned = unet.config.encoder_hid_dim_type == "text_image_proj"
        """A Kandinsky 2.1 U-Net: every start needs the decoder's text encoding."""
        if unet.config.addition_embed_type == "image_hint":
            self.variant = "controlnet"
        elif unet.config.in_channels == 2 * latent_channels + 1:
            self.variant = "inpaint"
        else:
            self.variant = "text2img"
        self._schedulers: dict[str, tuple[type, dict, bool]] = {}

    @classmethod
    def from_pretrained(cls, decoder_path: Path | str, device: str = "cpu", dtype: str = "float32",
                        options: ModelOptions = ModelOptions()) -> "DenoiserModel":
        import json

        import diffusers

        root = check_layout(decoder_path, DECODER_LAYOUT, "decoder")
        unet = load_pretrained(diffusers.UNet2DConditionModel, root, "unet", device, torch_dtype(dtype))
        unet = compiled(prepare_convolutional(unet, options), options)
        scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        scheduler_class = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
            raise CheckpointError(
                f"{root}/scheduler/scheduler_config.json names {scheduler_config.get('_class_name')!r}, "
                "which is not a diffusers scheduler"
            )
        scheduler = load_pretrained(scheduler_class, root, "scheduler")
        # Only the MOVQ's config is needed here (scale factor, latent channels), not its weights.
        movq_config = json.loads((root / "movq" / "config.json").read_text())
        scale = 2 ** (len(movq_config["block_out_channels"]) - 1)
        return cls(unet, scheduler, scale, int(movq_config.get("latent_channels", 4)), device, options)

    def make_scheduler(self, name: str):
        """A fresh scheduler of the named kind, from the checkpoint's scheduler config."""
        if name not in self._schedulers:
            import inspect

            import diffusers

            if name not in SCHEDULERS:
                raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
            class_name, overrides = SCHEDULERS[name]
            scheduler_class = getattr(diffusers, class_name)
            takes_generator = "generator" in inspect.signature(scheduler_class.step).parameters
            self._schedulers[name] = (scheduler_class, overrides, takes_generator)
        scheduler_class, overrides, takes_generator = self._schedulers[name]
        return scheduler_class.from_config(self.scheduler_config, **overrides), takes_generator

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        # A copy: arrays that come through Ray's object store are read-only.
        return torch.tensor(array).to(self.device, self.dtype)

    def _check_inputs(self, params: DenoiseParams, init: ImageLatents | None, hint: np.ndarray | None) -> None:
        if self.variant == "inpaint" and (init is None or init.keep_mask is None):
            raise ValueError("the inpainting decoder needs an image and a mask")
        if self.variant == "controlnet" and hint is None:
            raise ValueError("the ControlNet decoder needs a hint")
        if self.variant != "controlnet" and hint is not None:
            raise ValueError("a hint needs the ControlNet decoder")
        if self.variant != "inpaint" and init is not None and params.strength is None:
            raise ValueError("an input image needs a strength")

    def _check_text(self, text: TextEmbeddings | None) -> None:
        if self.text_conditioned and (text is None or len(text.text_embeds) != 2):
            raise ValueError("a Kandinsky 2.1 decoder needs its text encoding of [prompt, negative prompt or \"\"]")
        if not self.text_conditioned and text is not None:
            raise ValueError("a Kandinsky 2.2 decoder takes no text encoding")

    def start(
        self,
        image_embed: np.ndarray,
        negative_embed: np.ndarray,
        params: DenoiseParams,
        seed: int,
        init: ImageLatents | None = None,
        hint: np.ndarray | None = None,
        text: TextEmbeddings | None = None,
    ) -> DenoiseState:
        """Set up one image, drawing from its generator in the reference pipeline's order.
        ``text`` (2.1 only): the decoder's text encoding, rows [prompt, negative prompt or ""]."""
        from diffusers.utils.torch_utils import randn_tensor

        self._check_inputs(params, init, hint)
        self._check_text(text)
        scheduler, takes_generator = self.make_scheduler(params.scheduler)
        scheduler.set_timesteps(params.num_steps, device=self.device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        device = torch.device(self.device)
        guided = params.guidance_scale > 1
        state = DenoiseState(
            image_embeds=self._tensor(image_embed[None]),
            negative_image_embeds=self._tensor(negative_embed[None]) if guided else None,
            guidance_scale=params.guidance_scale,
            scheduler=scheduler,
            generator=generator,
            latents=None,  # type: ignore[arg-type]
            step_takes_generator=takes_generator,
        )
        if text is not None:
            def row(i: int) -> tuple[torch.Tensor, torch.Tensor]:
                return self._tensor(text.text_embeds[i][None]), self._tensor(text.hidden_states[i][None])

            state.text = row(0)
            state.negative_text = row(1) if guided else None
        if init is not None and self.variant != "inpaint" and self.text_conditioned:
            # 2.1 image-to-image: noise drawn once, added by the pipeline's own schedule (add_noise_21).
            image_latents = self._tensor(init.latents)
            state.start_index = state.index = strength_start(params.num_steps, params.strength)
            noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=self.dtype)
            timestep = int(scheduler.config.num_train_timesteps * params.strength) - 2
            state.latents = add_noise_21(image_latents * scheduler.init_noise_sigma, noise, timestep)
        elif init is not None and self.variant != "inpaint":
            # Image-to-image: the input's latents, noised to the first timestep the strength keeps.
            image_latents = self._tensor(init.latents)
            state.start_index = state.index = strength_start(params.num_steps, params.strength)
            noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=self.dtype)
            first = scheduler.timesteps[state.start_index : state.start_index + 1]
            state.latents = scheduler.add_noise(image_latents, noise, first)
        else:
            height, width = downscale_height_and_width(params.height, params.width, self.movq_scale_factor)
            shape = (1, self.latent_channels, height, width)
            state.latents = randn_tensor(shape, generator=generator, device=device, dtype=self.dtype) * scheduler.init_noise_sigma
        if self.variant == "inpaint":
            image_latents, keep_mask = self._tensor(init.latents), self._tensor(init.keep_mask)
            state.conditioning = torch.cat([image_latents * keep_mask, keep_mask], dim=1)
            if not self.text_conditioned:
                # 2.2 re-imposes the kept region after every step and at the end; 2.1 does neither.
                state.image_latents, state.keep_mask, state.noise = image_latents, keep_mask, state.latents.clone()
        if hint is not None:
            state.hint = self._hint(hint, params)
        return state

    def _hint(self, hint: np.ndarray, params: DenoiseParams) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, H, W) in [0, 1], as diffusers' ``make_hint``, at the output size."""
        if hint.shape[:2] != (params.height, params.width):
            from PIL import Image

            hint = np.asarray(Image.fromarray(hint).resize((params.width, params.height), resample=Image.BICUBIC))
        return self._tensor(hint.astype(np.float32)[None] / 255.0).permute(0, 3, 1, 2)

    @torch.inference_mode()
    def step(self, states: list[DenoiseState]) -> None:
        """One U-Net forward over every state (all must share a latent size), then each state's scheduler step."""
        samples, timesteps, embeds, hints, text_embeds, text_hidden = [], [], [], [], [], []
        for state in states:
            t = state.scheduler.timesteps[state.index]
            sample = state.latents if state.conditioning is None else torch.cat([state.latents, state.conditioning], dim=1)
            conditions = [(state.image_embeds, state.text)]
            if state.negative_image_embeds is not None:
                conditions.insert(0, (state.negative_image_embeds, state.negative_text))
            for condition, text in conditions:
                samples.append(sample)
                timesteps.append(t.reshape(1))
                embeds.append(condition)
                if state.hint is not None:
                    hints.append(state.hint)
                if text is not None:
                    text_embeds.append(text[0])
                    text_hidden.append(text[1])
        # Padding rows (copies of the first) are dropped with ``output``'s tail: rows are
        # independent (up to float rounding that depends on the batch's shape, padded or not).
        size = padded_size(len(samples), self.buckets)

        def batch(rows: list[torch.Tensor]) -> torch.Tensor:
            return pad_rows(torch.cat(rows), size)

        added = {"image_embeds": batch(embeds)}
        if hints:
            added["hint"] = to_memory_format(batch(hints), self.channels_last)
        if text_embeds:
            added["text_embeds"] = batch(text_embeds)
        output = graph_step(self.unet, self.graph_replays)(
            sample=to_memory_format(batch(samples), self.channels_last),
            timestep=batch(timesteps),
            encoder_hidden_states=batch(text_hidden) if text_hidden else None,
            added_cond_kwargs=added,
            return_dict=False,
        )[0][: len(samples)]
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
            if getattr(state.scheduler.config, "variance_type", None) not in LEARNED_VARIANCE:
                prediction = prediction[:, :channels]
            timesteps_all = state.scheduler.timesteps
            t = timesteps_all[state.index]
            kwargs = {"generator": state.generator} if state.step_takes_generator else {}
            state.latents = state.scheduler.step(prediction, t, state.latents, **kwargs)[0]
            if state.keep_mask is not None:
                # As the inpainting pipeline: re-impose the kept region, noised to the next timestep.
                proper = state.image_latents
                if state.index < len(timesteps_all) - 1:
                    proper = state.scheduler.add_noise(proper, state.noise, timesteps_all[state.index + 1].reshape(1))
                state.latents = state.keep_mask * proper + (1 - state.keep_mask) * state.latents
            state.index += 1

    @torch.inference_mode()
    def health_probe(self) -> None:
        """One U-Net forward at the smallest latent size (check_health)."""
        config = self.unet.config
        side = max(8, 2 ** len(config.block_out_channels))  # the smallest size every level can halve
        sample = torch.zeros(1, config.in_channels - (4 if self.variant == "controlnet" else 0), side, side)
        hidden = None
        if self.text_conditioned:  # 2.1: image and text embeddings of the cross-attention size, text hidden states
            added = {"image_embeds": torch.zeros(1, config.cross_attention_dim),
                     "text_embeds": torch.zeros(1, config.cross_attention_dim)}
            hidden = torch.zeros(1, 1, config.encoder_hid_dim).to(self.device, self.dtype)
        else:
            added = {"image_embeds": torch.zeros(1, config.encoder_hid_dim)}
        if self.variant == "controlnet":
            added["hint"] = torch.zeros(1, 3, side * self.movq_scale_factor, side * self.movq_scale_factor)
        self.unet(
            sample=sample.to(self.device, self.dtype), timestep=torch.zeros(1, dtype=torch.long, device=self.device),
            encoder_hidden_states=hidden, added_cond_kwargs={k: v.to(self.device, self.dtype) for k, v in added.items()},
            return_dict=False,
        )

    def start_all(
        self, embeddings: ImageEmbeddings, params: DenoiseParams, init: ImageLatents | None = None,
        hint: np.ndarray | None = None, text: TextEmbeddings | None = None,
    ) -> list[DenoiseState]:
        rows = zip(embeddings.image_embeds, embeddings.negative_image_embeds, embeddings.seeds, strict=True)
        if init is not None and len(init.latents) > 1:  # hires fix: each image starts from its own first pass
            if len(init.latents) != embeddings.count:
                raise ValueError(f"{len(init.latents)} input latents for {embeddings.count} images")
            return [self.start(embed, negative, params, seed, ImageLatents(init.latents[i : i + 1]), hint, text)
                    for i, (embed, negative, seed) in enumerate(rows)]
        return [self.start(embed, negative, params, seed, init, hint, text) for embed, negative, seed in rows]

    @staticmethod
    def finish_all(states: list[DenoiseState]) -> np.ndarray:
        """One request's final latents, (N, C, h, w)."""
        finals = []
        for state in states:
            latents = state.latents
            if state.keep_mask is not None:
                latents = state.keep_mask * state.image_latents + (1 - state.keep_mask) * latents
            finals.append(latents)
        return torch.cat(finals).float().cpu().numpy()

    def generate(self, jobs: list[tuple], observer: StepObserver | None = None) -> list[np.ndarray]:
        """Request batching: denoise whole jobs ``(embeddings, params, init, hint)`` to the end;
        one latent size per forward pass."""
        states = [self.start_all(*job) for job in jobs]
        flat = [state for job in states for state in job]
        for _, group in group_by(flat, key=lambda state: state.bucket):
            run_until_done(group, self.step, observer)
        return [self.finish_all(job) for job in states]


class DenoiserReplica(LoopReplica):
    """The U-Net's denoising loop, shared by many requests (step or request batching).

    One deployment per decoder variant: each variant's requests batch only with each other.
    """

    stage = STAGE

    def __init__(self, decoder_path: str, device: str = "cpu", dtype: str = "float32",
                 options: ModelOptions = ModelOptions()) -> None:
        self.setup(self.stage, device, lambda: DenoiserModel.from_pretrained(decoder_path, device, dtype, options))

    async def generate(
        self, embeddings: ImageEmbeddings, params: DenoiseParams, init: ImageLatents | None = None,
        hint: np.ndarray | None = None, text: TextEmbeddings | None = None,
    ) -> Latents:
        """``text``: a 2.1 decoder's own text encoding of [prompt, negative or ""]; None for 2.2."""
        return await self.run_request(embeddings, params, init, hint, text)

    def make_output(self, inputs: tuple, latents, timing: StageTiming) -> Latents:
        return Latents(latents, {self.stage: timing})


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
class Denoiser(DenoiserReplica):
    """Text-to-image and image-to-image (``kandinsky-2-2-decoder``)."""

    stage = "denoiser"


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
class InpaintDenoiser(DenoiserReplica):
    """Inpainting (``kandinsky-2-2-decoder-inpaint``)."""

    stage = "denoiser_inpaint"


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
class ControlnetDenoiser(DenoiserReplica):
    """ControlNet depth, with or without an input image (``kandinsky-2-2-controlnet-depth``)."""

    stage = "denoiser_controlnet"
