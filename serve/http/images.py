"""Safe decoding of input images: explicit formats, a pixel cap checked before decoding,
Pillow's decompression-bomb guard, truncated files refused."""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
_KNOWN_OTHER = {b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"\x00\x00\x01\x00": "ICO"}


class PixelBudget:
    """What one request may decode in all (``max_request_pixels``): each image takes its share
    before it is decoded, so a request of many large images is refused before the one that
    would go over is read."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.left = total

    def take(self, pixels: int) -> None:
        if pixels > self.left:
            raise ValueError(f"this request's images come to more than {self.total} pixels in all "
                             f"(max_request_pixels); this one has {pixels}, {self.left} were left")
        self.left -= pixels


HEADER_PREFIX_CHARS = 256 * 1024
"""How much of an image's base64 :func:`header_pixels` reads: enough for a PNG's IHDR or a
JPEG's SOF after EXIF and ICC segments in all but odd files."""


def header_pixels(data: str) -> int | None:
    """An image's width x height from its header alone (None when that cannot be read from
    the first :data:`HEADER_PREFIX_CHARS` characters; the full decode checks it then)."""
    prefix = data[: HEADER_PREFIX_CHARS - HEADER_PREFIX_CHARS % 4]
    try:
        raw = base64.b64decode(prefix, validate=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            width, height = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS).size
    except Exception:
        return None
    return width * height


def check_total(images: list[tuple[str, str]], budget: PixelBudget) -> None:
    """Refuse a request whose images' headers already add up to more than ``budget``, before
    any of them is decoded; raises ``(field, message)`` as :class:`TotalTooLarge`."""
    total = 0
    for field, data in images:
        total += header_pixels(data) or 0
        if total > budget.total:
            raise TotalTooLarge(field, f"this request's images come to more than {budget.total} pixels in all "
                                       f"(max_request_pixels), by their headers; nothing was decoded")


class TotalTooLarge(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def release_freed_memory() -> None:
    """Hand the heap that freed decodes leave behind back to the system: glibc keeps it in
    its per-thread arenas otherwise, and a burst of large images would stay resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class DecodePool:
    """Image decoding off the event loop, at most ``threads`` at once per ingress replica: a
    burst of large images queues here instead of stalling every other request's I/O, and the
    memory decoding takes is bounded by ``threads`` x the per-request budget. Once no image
    has been decoded for ``trim_after_s`` (the requests that used them are done by then, as
    a rule), the freed memory is handed back (:func:`release_freed_memory`)."""

    def __init__(self, threads: int, trim_after_s: float = 2.0, trim=release_freed_memory) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.trim_after_s = trim_after_s
        self._trim = trim
        self._active = 0
        self._last_done = 0.0
        self._trim_pending = False

    async def run(self, fn, *args):
        loop = asyncio.get_running_loop()
        self._active += 1
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        finally:
            self._active -= 1
            self._last_done = loop.time()
            if not self._trim_pending:
                self._trim_pending = True
                loop.call_later(self.trim_after_s, self._trim_when_idle, loop)

    def _trim_when_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        idle_for = loop.time() - self._last_done
        if self._active or idle_for < self.trim_after_s:  # still busy: look again later
            loop.call_later(self.trim_after_s, self._trim_when_idle, loop)
            return
        self._trim_pending = False
        loop.run_in_executor(self._executor, self._trim)


def decode_image(data: str, max_pixels: int, mode: str = "RGB", budget: PixelBudget | None = None,
                 draft_to: tuple[int, int] | None = None) -> np.ndarray:
    """Base64 PNG/JPEG/WebP -> (H, W, 3) uint8 (mode ``RGB``) or (H, W) uint8 (mode ``L``).

    Raises ``ValueError`` with a message for the client; nothing is decoded past the
    header when the image is too large for ``max_pixels`` or for what is left of ``budget``.
    ``draft_to`` (width, height): a JPEG is decoded at the smallest of libjpeg's scales that
    is still at least that large (``limits.jpeg_draft``).
    """
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    for magic, name in _KNOWN_OTHER.items():
        if raw.startswith(magic):
            raise ValueError(f"{name} images are not accepted; send PNG, JPEG or WebP")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels")
            if budget is not None:
                budget.take(width * height)
            if draft_to is not None and image.format == "JPEG":
                image.draft(mode, draft_to)
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        if isinstance(error, UnidentifiedImageError):
            raise ValueError("not a PNG, JPEG or WebP image") from None
        raise ValueError(f"refused as a decompression bomb: {error}") from None
    except (OSError, SyntaxError, EOFError) as error:
        raise ValueError(f"could not decode the image (truncated or corrupt): {error}") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Flatten transparency onto white rather than keeping whatever colour hides under alpha 0.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.asarray(image.convert(mode)).copy()


def fit_to_output(pixels: np.ndarray, width: int, height: int, reducing_gap: float | None = None) -> np.ndarray:
    """``pixels`` resized to the output size at once, as the stage would (bicubic; the
    reference pipelines' ``reducing_gap``), so that the full decode is not kept or shipped:
    the stage's own resize is then to the same size, which Pillow makes a copy, so the
    result is the same to the bit."""
    if pixels.shape[:2] == (height, width):
        return pixels
    resized = Image.fromarray(pixels).resize((width, height), resample=Image.BICUBIC, reducing_gap=reducing_gap)
    return np.asarray(resized).copy()


def size_from_image(side: int, max_side: int) -> int:
    """An input image's side rounded to a multiple of 64 within [64, max_side]."""
    return min(max(64, round(side / 64) * 64), max_side)
