"""Stage 4: the MOVQ decoder (``VQModel.decode``) and image encoding."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from ray import serve

from deployments.batching import Queued, group_by
from deployments.loading import DECODER_LAYOUT, check_layout, load_pretrained, torch_dtype
from deployments.messages import (
    Composite, DecodeParams, EncodedImages, ImageLatents, InitImage, Latents, StageTiming, UpscaleParams,
)
from deployments.performance import ModelOptions, compiled, cuda_graphs, graph_step, prepare_convolutional, to_memory_format
from deployments.runtime import StageReplica
from deployments.tiling import tiled_with_shared_norms

STAGE = "movq"
STAGE_ENCODE = "movq_encode"
STAGE_UPSCALE = "movq_upscale"
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
JPEG_QUALITY = 95
WEBP_QUALITY = 95
PREVIEW_JPEG_QUALITY = 70


class MovqModel:
    """Latents -> uint8 RGB pixels, as the reference pipeline's ``output_type="pil"``; and input
    images -> latents, as the image-to-image and inpainting pipelines prepare them.

    With ``tile_size`` (pixels), an image with a side above it is decoded (encoded) in
    overlapping tiles of that size, blended across ``tile_overlap`` pixels or more
    (:mod:`deployments.tiling`): memory stays that of one tile. Up to ``tile_size`` the
    whole image goes through in one forward, exactly as diffusers' pipelines do. None or 0:
    never tile.
    """

    def __init__(self, movq, device: str = "cpu", tile_size: int | None = None, tile_overlap: int = 0,
                 channels_last: bool = False, decode_chunk: int = 0, graph_replays: bool = False) -> None:
        from diffusers.image_processor import VaeImageProcessor

        self.movq = movq
        self.channels_last = channels_last
        self.device = device
        if decode_chunk < 0:
            raise ValueError(f"decode_chunk={decode_chunk}: must be 0 (no limit) or a positive number of images")
        self.decode_chunk = decode_chunk
        self.graph_replays = graph_replays  # the decoder replays CUDA graphs (compile reduce-overhead)
        # Decodes run on a stream of their own: never queued behind (or holding up) other work on
        # the default stream of a process that shares the GPU, and never a host sync per chunk.
        self.stream = torch.cuda.Stream(device) if str(device).startswith("cuda") else None
        self.dtype = movq.dtype
        self.scale = 2 ** (len(movq.config.block_out_channels) - 1)
        for name, value in (("tile_size", tile_size or 0), ("tile_overlap", tile_overlap)):
            if value < 0 or value % self.scale:
                raise ValueError(f"{name}={value}: must be a non-negative multiple of the MOVQ's scale factor {self.scale}")
        if tile_size and 2 * tile_overlap > tile_size:
            raise ValueError(f"tile_overlap={tile_overlap} exceeds half of tile_size={tile_size}; lower the overlap or raise the tile")
        # In latent pixels; 0: never tile.
        self.tile, self.overlap = (tile_size or 0) // self.scale, tile_overlap // self.scale
        # The image-to-image pipelines' own preprocessor (bicubic, reducing_gap=1, to [-1, 1]).
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.scale,
            vae_latent_channels=movq.config.latent_channels,
            resample="bicubic",
            reducing_gap=1,
        )

    @classmethod
    def from_pretrained(
        cls, decoder_path: Path | str, device: str = "cpu", dtype: str = "float32", tile_size: int | None = None, tile_overlap: int = 0,
        options: ModelOptions = ModelOptions(),
    ) -> "MovqModel":
        """``options.compile`` compiles the decoder only (encoding is rarer): one graph per latent size."""
        from diffusers import VQModel

        root = check_layout(decoder_path, DECODER_LAYOUT, "decoder", parts=("movq",))
        movq = prepare_convolutional(load_pretrained(VQModel, root, "movq", device, torch_dtype(dtype)), options)
        compiled(movq.decoder, options)
        return cls(movq, device, tile_size, tile_overlap, options.channels_last, options.decode_chunk, cuda_graphs(options))

    def tiles(self, latent_size: tuple[int, int]) -> bool:
        """Whether latents of this (h, w) are decoded (their image encoded) in tiles."""
        return bool(self.tile) and max(latent_size) > self.tile

    def _decode_forward(self, sample: torch.Tensor) -> torch.Tensor:
        decode = graph_step(lambda latents: self.movq.decode(latents, force_not_quantize=True)["sample"], self.graph_replays)
        return decode(sample)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(N, C, h, w) float latents of one size -> (N, H, W, 3) uint8 images."""
        return np.concatenate(list(self.decode_chunks(latents)))

    @torch.inference_mode()
    def decode_chunks(self, latents: np.ndarray) -> Iterator[np.ndarray]:
        """(N, C, h, w) latents of one size -> their (n, H, W, 3) uint8 images, ``decode_chunk``
        images per forward (all N without it), in order. On CUDA the next chunk is already
        queued on the decode stream when a chunk is yielded: the caller's work on the yielded
        images (PNG encoding) overlaps the GPU's decode of the next."""
        rows = latents.shape[0]
        step = self.decode_chunk or rows
        pending = None
        for start in range(0, rows, step):
            queued = self._queue_decode(latents[start : start + step])
            if pending is not None:
                yield self._collect(pending)
            pending = queued
        if pending is not None:
            yield self._collect(pending)

    def _queue_decode(self, latents: np.ndarray) -> Any:
        """Start decoding one chunk: its images (CPU), or the CUDA event and pinned host buffer
        they arrive in."""
        if self.stream is None:
            # A copy: arrays that come through Ray's object store are read-only.
            return self._decode_pixels(torch.tensor(latents).to(self.device, self.dtype)).numpy()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # after the weights and earlier work
        with torch.cuda.stream(self.stream):
            sample = torch.from_numpy(np.array(latents)).pin_memory().to(self.device, self.dtype, non_blocking=True)
            pixels = self._decode_pixels(sample)
            host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        # ``pixels`` is freed here while the copy may still read it: safe, because the caching
        # allocator reuses a block only in stream order and it was allocated on this stream.
        return done, host

    def _collect(self, queued: Any) -> np.ndarray:
        if isinstance(queued, np.ndarray):
            return queued
        done, host = queued
        done.synchronize()
        return host.numpy()

    def _decode_pixels(self, sample: torch.Tensor) -> torch.Tensor:
        """Latents on the device -> (n, H, W, 3) uint8 pixels on the device: the reference
        pipeline's ``* 0.5 + 0.5``, clamp, float32 ``* 255`` and round, at a quarter of the bytes
        to copy back."""
        sample = to_memory_format(sample, self.channels_last)
        size = tuple(sample.shape[-2:])
        if self.tiles(size):
            image = tiled_with_shared_norms(self._decode_forward, self.movq.decoder, sample, size, self.tile, self.overlap,
                                            1, self.scale)
        else:
            image = self._decode_forward(sample)
        image = (image * 0.5 + 0.5).clamp(0, 1).float() * 255
        return image.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    @torch.inference_mode()
    def preview(self, latents: np.ndarray, max_side: int) -> np.ndarray:
        """A cheap look at in-progress latents: the first image's latents, averaged down so the
        decoded image's longer side is at most ``max_side``, then decoded. (H', W', 3) uint8."""
        sample = torch.tensor(latents[:1]).to(self.device, self.dtype)
        height, width = sample.shape[-2:]
        factor = max(1, -(-max(height, width) * self.scale // max_side))
        if factor > 1:
            size = (max(1, height // factor), max(1, width // factor))
            sample = torch.nn.functional.interpolate(sample, size=size, mode="area")
        return self._decode_pixels(sample)[0].cpu().numpy()

    def prepare(self, image: InitImage) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Resize and normalise one input image (and mask) exactly as the reference pipelines do.

        Returns the (1, 3, H, W) image in [-1, 1] and, for inpainting, the (1, 1, H, W) keep-mask.
        """
        pil = Image.fromarray(image.pixels)
        if image.mask is None:
            return self.image_processor.preprocess(pil, height=image.height, width=image.width), None
        from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import prepare_mask_and_masked_image

        keep, pixels = prepare_mask_and_masked_image(pil, Image.fromarray(image.mask), image.height, image.width)
        return pixels, keep

    @torch.inference_mode()
    def encode(self, images: list[InitImage]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Input images -> (latents (1, C, h, w), keep-mask in latent space or None), one
        encoder forward per image size."""
        from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import prepare_mask

        prepared = [self.prepare(image) for image in images]
        results: list[tuple[np.ndarray, np.ndarray | None]] = [None] * len(images)  # type: ignore[list-item]
        for _, group in group_by(range(len(images)), key=lambda i: tuple(prepared[i][0].shape)):
            pixels = torch.cat([prepared[i][0] for i in group]).to(self.device, self.dtype)
            latents = self._encode_pixels(pixels)
            for row, i in enumerate(group):
                keep = prepared[i][1]
                if keep is not None:
                    # As the inpainting pipeline: nearest-resize to the latents, then shrink the kept region.
                    keep = torch.nn.functional.interpolate(keep.to(self.device, self.dtype), latents.shape[-2:], mode="nearest")
                    keep = prepare_mask(keep).float().cpu().numpy()
                results[i] = (latents[row : row + 1].float().cpu().numpy(), keep)
        return results

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, C, H/8, W/8) latents, in tiles above the tile size."""
        height, width = pixels.shape[-2:]
        size = (height // self.scale, width // self.scale)
        # Sizes that are not a multiple of the scale factor (never from the API) go through whole.
        if self.tiles(size) and not (height % self.scale or width % self.scale):
            return tiled_with_shared_norms(lambda part: self.movq.encode(part)["latents"], self.movq.encoder, pixels, size,
                                           self.tile, self.overlap, self.scale, 1)
        return self.movq.encode(pixels)["latents"]

    def health_probe(self) -> None:
        """A tiny decode (check_health)."""
        self.decode(np.zeros((1, self.movq.config.latent_channels, 2, 2), np.float32))

    def decode_many(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Decode several requests' latents, one forward per latent size (and chunk)."""
        decoded: dict[int, list[np.ndarray]] = {index: [] for index in range(len(arrays))}
        for index, image in self.decode_rows(arrays):
            decoded[index].append(image)
        return [np.stack(decoded[index]) for index in range(len(arrays))]

    def decode_rows(self, arrays: list[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        """(request index, image) for each image of several requests' latents as its chunk
        arrives; one request's images in their order."""
        rows = [(index, row) for index, array in enumerate(arrays) for row in array]
        for _, group in group_by(rows, key=lambda item: item[1].shape):
            owners = iter(index for index, _ in group)
            for images in self.decode_chunks(np.stack([row for _, row in group])):
                for image in images:
                    yield next(owners), image

    @torch.inference_mode()
    def upscale(self, latents: np.ndarray, width: int, height: int, mode: str = "pixel") -> np.ndarray:
        """Hires fix: (N, C, h, w) latents -> (N, C, height/8, width/8) input latents.

        ``pixel``: each image decoded to the pixels the request would have got, then prepared
        and encoded as an image-to-image input of the output size (so the second pass is
        exactly diffusers' image-to-image pipeline on the upscaled first image); ``latent``:
        the latents resized (bilinear), cheaper but softer.
        """
        if mode == "latent":
            sample = torch.tensor(latents).to(self.device, self.dtype)
            size = (height // self.scale, width // self.scale)
            resized = torch.nn.functional.interpolate(sample, size=size, mode="bilinear")
            return resized.float().cpu().numpy()
        if mode != "pixel":
            raise ValueError(f"upscale mode must be pixel or latent, got {mode!r}")
        pixels = self.decode(latents)
        encoded = self.encode([InitImage(image, width, height) for image in pixels])
        return np.concatenate([image_latents for image_latents, _ in encoded])


def feather(generated: np.ndarray, composite: Composite) -> np.ndarray:
    """Blend ``generated`` into the original through the repaint mask, blurred by ``blur_radius`` pixels."""
    height, width = generated.shape[:2]
    original = Image.fromarray(composite.pixels).resize((width, height), resample=Image.BICUBIC, reducing_gap=1)
    mask = Image.fromarray(composite.mask).resize((width, height), resample=Image.LANCZOS).convert("L")
    binary = mask.point(lambda value: 255 if value >= 128 else 0)
    soft = np.asarray(binary.filter(ImageFilter.GaussianBlur(composite.blur_radius)), dtype=np.float32)[..., None] / 255.0
    blended = np.asarray(original, dtype=np.float32) * (1.0 - soft) + generated.astype(np.float32) * soft
    return blended.round().clip(0, 255).astype("uint8")


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


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
class MovqDecoder(StageReplica):
    """Batches requests' latents into shared MOVQ decode passes and encodes the images;
    batches input images into shared MOVQ encode passes."""

    batch_methods = ("_run_batch", "_run_encode_batch")

    def __init__(
        self, decoder_path: str, device: str = "cpu", dtype: str = "float32", tile_size: int | None = None, tile_overlap: int = 0,
        options: ModelOptions = ModelOptions(),
    ) -> None:
        self.setup(STAGE, device, lambda: MovqModel.from_pretrained(decoder_path, device, dtype, tile_size, tile_overlap, options))

    async def decode(self, latents: Latents, params: DecodeParams) -> EncodedImages:
        return await self.serve_call(self._run_batch(Queued((latents, params))), params.request_id)

    async def encode(self, image: InitImage) -> ImageLatents:
        """An input image (image-to-image, inpainting, ControlNet image-to-image) -> latents."""
        return await self.serve_call(self._run_encode_batch(Queued(image)), image.request_id, STAGE_ENCODE)

    async def upscale(self, latents: Latents, params: UpscaleParams) -> ImageLatents:
        """Hires fix: a request's first-pass latents at the output size (one row per image)."""

        async def work() -> ImageLatents:
            started = time.perf_counter()
            upscaled = await self.thread.run(self.model.upscale, latents.latents, params.width, params.height, params.mode)
            timing = StageTiming(0.0, (time.perf_counter() - started) * 1000, 1)
            return ImageLatents(upscaled, None, {STAGE_UPSCALE: timing})

        return await self.serve_call(work(), params.request_id, STAGE_UPSCALE)

    async def preview(self, latents: np.ndarray | None, max_side: int) -> tuple[bytes, str] | None:
        """A small JPEG of in-progress latents (a job's preview), or None without latents.

        Not batched and not counted as a request: previews are optional and best effort,
        small (a few latent pixels), and never on a denoising loop's path.
        """
        if latents is None:
            return None

        def work() -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(self.model.preview(latents, max_side)).save(buffer, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
            return buffer.getvalue()

        return await self.thread.run(work), "image/jpeg"

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run_encode_batch(self, calls: list[Queued[InitImage]]) -> list[ImageLatents]:
        started = time.perf_counter()
        encoded = await self.thread.run(self.model.encode, [call.payload for call in calls])
        compute_ms = self.record_batch(calls, started)
        return [
            ImageLatents(latents, keep, {STAGE_ENCODE: StageTiming(call.queue_wait_ms(started), compute_ms, len(calls))})
            for call, (latents, keep) in zip(calls, encoded)
        ]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run_batch(self, calls: list[Queued[tuple[Latents, DecodeParams]]]) -> list[EncodedImages]:
        started = time.perf_counter()

        def work() -> list[list[bytes]]:
            # Each image is encoded as its chunk arrives, while the GPU decodes the next chunk.
            encoded: list[list[bytes]] = [[] for _ in calls]
            for index, image in self.model.decode_rows([call.payload[0].latents for call in calls]):
                params = calls[index].payload[1]
                pixels = image if params.composite is None else feather(image, params.composite)
                encoded[index].append(encode_image(pixels, params.output_format))
            return encoded

        encoded = await self.thread.run(work)
        compute_ms = self.record_batch(calls, started)
        results = []
        for call, images in zip(calls, encoded):
            latents, params = call.payload
            timing = StageTiming(call.queue_wait_ms(started), compute_ms, len(calls))
            results.append(EncodedImages(images, MEDIA_TYPES[params.output_format], timings={self.stage: timing}))
        return results
