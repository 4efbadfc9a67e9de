"""Baselines for ``kandinsky-serve bench compare``: the same HTTP request, served two
simpler ways, so the stage graph is measured against them with one harness.

* **in-process**: diffusers' ``KandinskyV22PriorPipeline`` + ``KandinskyV22Pipeline``
  called one request at a time behind a bare FastAPI app (the floor of overhead);
* **monolith**: one Ray Serve deployment wrapping diffusers' combined pipeline
  behind FastAPI, one request at a time per replica — the pattern of Ray's own
  Stable Diffusion example.
"""


import argparse
import asyncio
import base64
import io
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve


class BaselineRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    width: int = 64
    height: int = 64
    num_images: int = Field(default=1, ge=1, le=8)
    prior_steps: int = 25
    steps: int = 50
    prior_guidance_scale: float = 4.0
    guidance_scale: float = 4.0
    seed: int = 0


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class TwoPipelines:
    """Prior then decoder pipeline, exactly as diffusers documents them."""

    def __init__(self, prior_path: str, decoder_path: str, torch_threads: int = 1) -> None:
        import torch
        from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

        torch.set_num_threads(torch_threads)
        kwargs = {"local_files_only": True, "use_safetensors": True}
        self.prior = KandinskyV22PriorPipeline.from_pretrained(prior_path, **kwargs)
        self.decoder = KandinskyV22Pipeline.from_pretrained(decoder_path, **kwargs)
        self.prior.set_progress_bar_config(disable=True)
        self.decoder.set_progress_bar_config(disable=True)

    def __call__(self, r: BaselineRequest) -> list[str]:
        import torch

        images = []
        for i in range(r.num_images):
            embeds, negative = self.prior(
                r.prompt, negative_prompt=r.negative_prompt, num_inference_steps=r.prior_steps,
                guidance_scale=r.prior_guidance_scale, generator=torch.Generator().manual_seed(r.seed + i),
            ).to_tuple()
            image = self.decoder(
                image_embeds=embeds, negative_image_embeds=negative, height=r.height, width=r.width,
                num_inference_steps=r.steps, guidance_scale=r.guidance_scale,
                generator=torch.Generator().manual_seed(r.seed + i),
            ).images[0]
            images.append(_png(image))
        return images


def inprocess_app(prior_path: str, decoder_path: str, torch_threads: int = 1) -> FastAPI:
    pipelines = TwoPipelines(prior_path, decoder_path, torch_threads)
    lock = asyncio.Lock()
    app = FastAPI(title="in-process baseline")

    @app.post("/v1/text2img")
    async def text2img(request: BaselineRequest) -> dict:
        async with lock:  # one generation at a time, like a plain script
            return {"images": await asyncio.to_thread(pipelines, request)}

    return app


monolith_api = FastAPI(title="monolith baseline")


@serve.deployment(name="Monolith", max_ongoing_requests=64)
@serve.ingress(monolith_api)
class Monolith:
    """Ray's Stable Diffusion example pattern: one deployment, the whole pipeline inside."""

    def __init__(self, prior_path: str, decoder_path: str, torch_threads: int = 1) -> None:
        import torch
        from diffusers import KandinskyV22CombinedPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline

        torch.set_num_threads(torch_threads)
        kwargs = {"local_files_only": True, "use_safetensors": True}
        prior = KandinskyV22PriorPipeline.from_pretrained(prior_path, **kwargs)
        decoder = KandinskyV22Pipeline.from_pretrained(decoder_path, **kwargs)
        self.pipe = KandinskyV22CombinedPipeline(
            unet=decoder.unet, scheduler=decoder.scheduler, movq=decoder.movq,
            prior_prior=prior.prior, prior_image_encoder=prior.image_encoder, prior_text_encoder=prior.text_encoder,
            prior_tokenizer=prior.tokenizer, prior_scheduler=prior.scheduler, prior_image_processor=prior.image_processor,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.lock = asyncio.Lock()

    def _generate(self, r: BaselineRequest) -> list[str]:
        import torch

        result = self.pipe(
            r.prompt, negative_prompt=r.negative_prompt, num_images_per_prompt=r.num_images, height=r.height,
            width=r.width, num_inference_steps=r.steps, prior_num_inference_steps=r.prior_steps,
            guidance_scale=r.guidance_scale, prior_guidance_scale=r.prior_guidance_scale,
            generator=torch.Generator().manual_seed(r.seed),
        )
        return [_png(image) for image in result.images]

    @monolith_api.post("/v1/text2img")
    async def text2img(self, request: BaselineRequest) -> dict:
        async with self.lock:
            return {"images": await asyncio.to_thread(self._generate, request)}


def main() -> None:
    """``python -m serve.tools.baselines inprocess --port P --prior DIR --decoder DIR``"""
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["inprocess"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prior", type=Path, required=True)
    parser.add_argument("--decoder", type=Path, required=True)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    app = inprocess_app(str(args.prior), str(args.decoder), args.torch_threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
