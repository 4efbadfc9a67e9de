"""The oracle: diffusers' own Kandinsky 2.2 (and 2.1) pipelines, one call per seed."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from serve.http.schemas import GenerationSpec as Text2ImgSpec

MAX_PIXEL_DIFF = 1  # of 255


@lru_cache(maxsize=4)
def pipelines(prior_path: str, decoder_path: str):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    prior = KandinskyV22PriorPipeline.from_pretrained(prior_path, local_files_only=True, use_safetensors=True)
    decoder = KandinskyV22Pipeline.from_pretrained(decoder_path, local_files_only=True, use_safetensors=True)
    prior.set_progress_bar_config(disable=True)
    decoder.set_progress_bar_config(disable=True)
    return prior, decoder


@lru_cache(maxsize=8)
def _pipeline(class_name: str, path: str):
    import diffusers

    pipe = getattr(diffusers, class_name).from_pretrained(path, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dropping_generator(scheduler_class):
    """Kandinsky's pipelines pass ``generator=`` to ``scheduler.step``; UniPC's and DEIS's step
    take none (they add no noise), so the reference drops it — as our denoiser does."""

    class DropsGenerator(scheduler_class):
        def step(self, *args, generator=None, **kwargs):
            return super().step(*args, **kwargs)

    return DropsGenerator


def _scheduler(name: str, config):
    import inspect

    import diffusers

    class_name, overrides = {
        "ddpm": ("DDPMScheduler", {}),
        "ddim": ("DDIMScheduler", {}),
        "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
        "dpmsolver++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
        "dpmsolver++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        "unipc": ("UniPCMultistepScheduler", {}),
        "deis": ("DEISMultistepScheduler", {}),
    }[name]
    scheduler_class = getattr(diffusers, class_name)
    if "generator" not in inspect.signature(scheduler_class.step).parameters:
        scheduler_class = _dropping_generator(scheduler_class)
    return scheduler_class.from_config(config, **overrides)


def make_hint(pixels: np.ndarray) -> torch.Tensor:
    """diffusers' documented ``make_hint``: (H, W, 3) uint8 depth map -> (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


def _prior_embeddings(prior, s: Text2ImgSpec, seed: int):
    generator = torch.Generator().manual_seed(seed)
    if s.mode == "mix":
        items = [item.text if item.text is not None else Image.fromarray(item.image) for item in s.mix]
        out = prior.interpolate(
            items, [item.weight for item in s.mix], num_inference_steps=s.prior_steps, generator=generator,
            negative_prompt=s.negative_prompt or "", guidance_scale=s.prior_guidance_scale,
        )
        return out.image_embeds, out.negative_image_embeds
    if s.mode == "variations":
        from diffusers import KandinskyV22PriorEmb2EmbPipeline

        emb2emb = KandinskyV22PriorEmb2EmbPipeline(**prior.components)
        emb2emb.set_progress_bar_config(disable=True)
        return emb2emb(
            s.prompt, image=Image.fromarray(s.image), strength=s.strength, negative_prompt=s.negative_prompt,
            num_inference_steps=s.prior_steps, guidance_scale=s.prior_guidance_scale, generator=generator,
        ).to_tuple()
    return prior(
        s.prompt, negative_prompt=s.negative_prompt, num_inference_steps=s.prior_steps,
        guidance_scale=s.prior_guidance_scale, generator=generator,
    ).to_tuple()


def reference_images(checkpoint, s: Text2ImgSpec) -> list[np.ndarray]:
    """What diffusers' Kandinsky 2.2 pipelines draw for each seed of ``s``: the prior (or
    ``interpolate`` / emb2emb) with a fresh generator, then the mode's decoder pipeline
    with another fresh generator of the same seed."""
    prior, decoder = pipelines(str(checkpoint[0]), str(checkpoint[1]))
    common = dict(num_inference_steps=s.steps, guidance_scale=s.guidance_scale, output_type="pil")
    if s.mode == "inpaint":
        pipe = _pipeline("KandinskyV22InpaintPipeline", str(checkpoint[2]))
        extra = dict(image=Image.fromarray(s.image), mask_image=Image.fromarray(s.mask), height=s.height, width=s.width)
    elif s.mode == "controlnet" and s.image is None:
        pipe = _pipeline("KandinskyV22ControlnetPipeline", str(checkpoint[3]))
        extra = dict(hint=make_hint(s.hint), height=s.height, width=s.width)
    elif s.mode == "controlnet":
        pipe = _pipeline("KandinskyV22ControlnetImg2ImgPipeline", str(checkpoint[3]))
        # These pipelines call preprocess(image, width, height) into (image, height, width):
        # swapping the two makes them resize to width x height, as the service does.
        extra = dict(hint=make_hint(s.hint), image=Image.fromarray(s.image), strength=s.strength, height=s.width, width=s.height)
    elif s.mode == "img2img":
        pipe = _pipeline("KandinskyV22Img2ImgPipeline", str(checkpoint[1]))
        extra = dict(image=Image.fromarray(s.image), strength=s.strength, height=s.width, width=s.height)  # as above
    else:
        pipe = decoder
        extra = dict(height=s.height, width=s.width)
    original = pipe.scheduler
    pipe.scheduler = _scheduler(s.scheduler, original.config)
    images = []
    try:
        for seed in s.seeds:
            embeds, negative = _prior_embeddings(prior, s, seed)
            image = pipe(
                image_embeds=embeds, negative_image_embeds=negative, generator=torch.Generator().manual_seed(seed),
                **common, **extra,
            ).images[0]
            images.append(np.asarray(image))
    finally:
        pipe.scheduler = original
    return images


def reference_images_21(checkpoint, s) -> list[np.ndarray]:
    """What diffusers' Kandinsky 2.1 pipelines draw for each seed of ``s`` (one call per seed)."""
    prior_path, decoder_path, inpaint_path = (str(path) for path in checkpoint)
    prior = _pipeline("KandinskyPriorPipeline", prior_path)
    if s.mode == "inpaint":
        pipe = _pipeline("KandinskyInpaintPipeline", inpaint_path)
        extra = dict(image=Image.fromarray(s.image), mask_image=Image.fromarray(s.mask), height=s.height, width=s.width)
    elif s.mode == "img2img":
        pipe = _pipeline("KandinskyImg2ImgPipeline", decoder_path)
        # preprocess(image, width, height) is called as (image, height, width) there, as in 2.2's.
        extra = dict(image=Image.fromarray(s.image), strength=s.strength, height=s.width, width=s.height)
    else:
        pipe = _pipeline("KandinskyPipeline", decoder_path)
        extra = dict(height=s.height, width=s.width)
    original = pipe.scheduler
    pipe.scheduler = _scheduler(s.scheduler, original.config)
    prompt = s.prompt
    images = []
    try:
        for seed in s.seeds:
            generator = torch.Generator().manual_seed(seed)
            if s.mode == "mix":
                items = [item.text if item.text is not None else Image.fromarray(item.image) for item in s.mix]
                out = prior.interpolate(items, [item.weight for item in s.mix], num_inference_steps=s.prior_steps,
                                        generator=generator, negative_prompt=s.negative_prompt or "",
                                        guidance_scale=s.prior_guidance_scale)
            else:
                out = prior(s.prompt, negative_prompt=s.negative_prompt, num_inference_steps=s.prior_steps,
                            guidance_scale=s.prior_guidance_scale, generator=generator)
            image = pipe(
                prompt, image_embeds=out.image_embeds, negative_image_embeds=out.negative_image_embeds,
                negative_prompt=s.negative_prompt, num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                generator=torch.Generator().manual_seed(seed), output_type="pil", **extra,
            ).images[0]
            images.append(np.asarray(image))
    finally:
        pipe.scheduler = original
    return images


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data), formats=["PNG"]).convert("RGB"))


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def spec(**overrides) -> Text2ImgSpec:
    """A small, fast request; keyword arguments override any field."""
    fields = dict(
        prompt="a red circle",
        negative_prompt=None,
        width=64,
        height=64,
        seeds=(11,),
        prior_steps=4,
        prior_guidance_scale=4.0,
        steps=6,
        guidance_scale=4.0,
        output_format="png",
    )
    fields.update(overrides)
    return Text2ImgSpec(**fields)


def solid_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic test picture: smooth gradients plus a little noise, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) * 127 / max(width + height - 2, 1)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def box_mask(width: int, height: int) -> np.ndarray:
    """White (repaint) in the middle half, black (keep) around it, (H, W) uint8."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return mask
