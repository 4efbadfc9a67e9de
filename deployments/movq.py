"""Stage 4: the MOVQ decoder (``VQModel.decode``) and image encoding."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ray import serve

from deployments.batching import Queued, group_by
from deployments.loading import DECODER_LAYOUT, check_layout, load_pretrained, torch_dtype
from deployments.messages import DecodeParams, EncodedImages, Latents, StageTiming
from deployments.runtime import StageReplica

STAGE = "movq"
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
JPEG_QUALITY = 95
WEBP_QUALITY = 95


class MovqModel:
    """Latents -> uint8 RGB pixels, as the reference pipeline's ``output_type="pil"``."""

    def __init__(self, movq, device: str = "cpu") -> None:
        self.movq = movq
        self.device = device
        self.dtype = movq.dtype

    @classmethod
    def from_pretrained(cls, decoder_path: Path | str, device: str = "cpu", dtype: str = "float32") -> "MovqModel":
        from diffusers import VQModel

        root = check_layout(decoder_path, DECODER_LAYOUT, "decoder", parts=("movq",))
        return cls(load_pretrained(VQModel, root, "movq", device, torch_dtype(dtype)), device)

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(N, C, h, w) float latents of one size -> (N, H, W, 3) uint8 images."""
        # A copy: arrays that come through Ray's object store are read-only.
        sample = torch.tensor(latents).to(self.device, self.dtype)
        image = self.movq.decode(sample, force_not_quantize=True)["sample"]
        image = (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return (image * 255).round().astype("uint8")

    def decode_many(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Decode several requests' latents, one forward per latent size."""
        rows = [(index, row) for index, array in enumerate(arrays) for row in array]
        decoded: dict[int, list[np.ndarray]] = {index: [] for index in range(len(arrays))}
        for _, group in group_by(rows, key=lambda item: item[1].shape):
            images = self.decode(np.stack([row for _, row in group]))
            for (index, _), image in zip(group, images):
                decoded[index].append(image)
        return [np.stack(decoded[index]) for index in range(len(arrays))]


def encode_image(pixels: np.ndarray, output_format: str) -> bytes:
    """One (H, W, 3) uint8 image -> PNG, JPEG or WebP bytes."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=WEBP_QUALITY)
    else:
        raise ValueError(f"output_format must be one of {sorted(MEDIA_TYPES)}, got {output_format!r}")
    return buffer.getvalue()


@serve.deployment(name="MovqDecoder", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
class MovqDecoder(StageReplica):
    """Batches requests' latents into shared MOVQ decode passes and encodes the images."""

    def __init__(self, decoder_path: str, device: str = "cpu", dtype: str = "float32") -> None:
        self.setup(STAGE, device, lambda: MovqModel.from_pretrained(decoder_path, device, dtype))

    async def decode(self, latents: Latents, params: DecodeParams) -> EncodedImages:
        return await self.serve_call(self._run_batch(Queued((latents, params))), params.request_id)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run_batch(self, calls: list[Queued[tuple[Latents, DecodeParams]]]) -> list[EncodedImages]:
        started = time.perf_counter()

        def work() -> list[list[bytes]]:
            pixels = self.model.decode_many([latents.latents for latents, _ in (c.payload for c in calls)])
            return [
                [encode_image(image, params.output_format) for image in images]
                for images, (_, params) in zip(pixels, (c.payload for c in calls))
            ]

        encoded = await self.thread.run(work)
        compute_ms = self.record_batch(calls, started)
        results = []
        for call, images in zip(calls, encoded):
            latents, params = call.payload
            timing = StageTiming(call.queue_wait_ms(started), compute_ms, len(calls))
            results.append(
                EncodedImages(images, MEDIA_TYPES[params.output_format], latents.seeds, {**latents.timings, STAGE: timing})
            )
        return results
