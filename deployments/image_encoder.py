"""Stage 1b: the CLIP image encoder (``CLIPImageProcessor`` + ``CLIPVisionModelWithProjection``).

Input images -> CLIP image embeddings, as ``KandinskyV22PriorPipeline.interpolate``
and ``KandinskyV22PriorEmb2EmbPipeline`` compute them. Serves image mixing,
variations and ``/v1/embeddings``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ray import serve

from deployments.batching import Queued
from deployments.loading import PRIOR_LAYOUT, check_layout, load_pretrained, torch_dtype
from deployments.performance import ModelOptions
from deployments.messages import ClipImageEmbeddings, StageTiming
from deployments.runtime import StageReplica

STAGE = "image_encoder"


class ImageEncoderModel:
    """RGB images -> projected CLIP image embeddings."""

    def __init__(self, processor, encoder, device: str = "cpu") -> None:
        self.processor = processor
        self.encoder = encoder
        self.device = device

    @classmethod
    def from_pretrained(cls, prior_path: Path | str, device: str = "cpu", dtype: str = "float32",
                        options: ModelOptions = ModelOptions()) -> "ImageEncoderModel":
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        root = check_layout(prior_path, PRIOR_LAYOUT, "prior", parts=("image_encoder", "image_processor"))
        processor = load_pretrained(CLIPImageProcessor, root, "image_processor")
        encoder = load_pretrained(CLIPVisionModelWithProjection, root, "image_encoder", device, torch_dtype(dtype),
                                  attn_implementation=options.attention)
        return cls(processor, encoder, device)

    @torch.inference_mode()
    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """(H, W, 3) uint8 images of any sizes -> (n, D) embeddings, one forward pass."""
        pixel_values = self.processor([Image.fromarray(image) for image in images], return_tensors="pt").pixel_values
        output = self.encoder(pixel_values.to(self.device, self.encoder.dtype))
        return output.image_embeds.float().cpu().numpy()


    def health_probe(self) -> None:
        """A tiny forward pass (check_health)."""
        self.embed([np.zeros((16, 16, 3), np.uint8)])


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.25})
class ImageEncoder(StageReplica):
    """Batches input images from many requests into one encoder forward pass."""

    def __init__(self, prior_path: str, device: str = "cpu", dtype: str = "float32",
                 options: ModelOptions = ModelOptions()) -> None:
        self.setup(STAGE, device, lambda: ImageEncoderModel.from_pretrained(prior_path, device, dtype, options))

    async def embed(self, images: list[np.ndarray], request_id: str = "") -> ClipImageEmbeddings:
        return await self.serve_call(self._run_batch(Queued(list(images))), request_id)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run_batch(self, calls: list[Queued[list[np.ndarray]]]) -> list[ClipImageEmbeddings]:
        started = time.perf_counter()
        flat = [image for call in calls for image in call.payload]
        embeds = await self.thread.run(self.model.embed, flat)
        compute_ms = self.record_batch(calls, started)
        results, offset = [], 0
        for call in calls:
            rows = slice(offset, offset + len(call.payload))
            offset = rows.stop
            timing = StageTiming(call.queue_wait_ms(started), compute_ms, len(calls))
            results.append(ClipImageEmbeddings(embeds[rows], {self.stage: timing}))
        return results
