"""Generation parameters inside the images the service returns, where AUTOMATIC1111 tools
look for them: a PNG ``parameters`` text chunk, EXIF ``UserComment`` in JPEG and WebP.

They are written into the encoded bytes (a chunk or segment inserted), never by
re-encoding, so the pixels are exactly those generated. The text is A1111's "infotext"::

    a red circle
    Negative prompt: blue
    Steps: 50, Sampler: DDPM, CFG scale: 4, Seed: 42, Size: 512x512, Model: kandinsky-2-2, ...
"""

from __future__ import annotations

import functools
import io
import re
import struct
import zlib
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
USER_COMMENT, EXIF_IFD = 0x9286, 0x8769
_UNICODE = b"UNICODE\x00"
_ASCII = b"ASCII\x00\x00\x00"


def parameters_text(spec: Any, seed: int, model: str, version: str, sampler: str) -> str:
    """A1111's infotext for image ``seed`` of ``spec``."""
    fields = [("Steps", spec.steps), ("Sampler", sampler), ("CFG scale", f"{spec.guidance_scale:g}"), ("Seed", seed),
              ("Size", f"{spec.width}x{spec.height}"), ("Model", model)]
    if getattr(spec, "strength", None) is not None:
        fields.append(("Denoising strength", f"{spec.strength:g}"))
    fields += [("Prior steps", spec.prior_steps), ("Prior CFG scale", f"{spec.prior_guidance_scale:g}"),
               ("Mode", spec.mode), ("Version", f"kandinsky-serve {version}")]
    line = ", ".join(f"{name}: {_quoted(value)}" for name, value in fields)
    return f"{spec.prompt}\nNegative prompt: {spec.negative_prompt or ''}\n{line}"


def _quoted(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if any(c in text for c in ',:"\n') else text


def stamped(result: Any, spec: Any, model: str, sampler: str) -> Any:
    """``result`` (:class:`~deployments.messages.EncodedImages`) with each image carrying its
    parameters (its own seed)."""
    from dataclasses import replace

    version = package_version()
    images = [with_parameters(image, result.media_type, parameters_text(spec, seed, model, version, sampler))
              for image, seed in zip(result.images, result.seeds or spec.seeds)]
    return replace(result, images=images)


@functools.cache
def package_version() -> str:
    """This package's version (read once: every returned image is stamped with it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kandinsky-serve")
    except PackageNotFoundError:
        return "unknown"


def with_parameters(data: bytes, media_type: str, text: str) -> bytes:
    """``data`` (an encoded image) carrying ``text``; unchanged for a format it cannot hold."""
    if media_type == "image/png":
        return _png_with_text(data, "parameters", text)
    if media_type == "image/jpeg":
        return _jpeg_with_exif(data, _exif_user_comment(text))
    if media_type == "image/webp":
        return _webp_with_exif(data, _exif_user_comment(text))
    return data


def read_parameters(data: bytes) -> str | None:
    """The parameters an image carries (PNG text chunk, else EXIF UserComment), read from its
    headers only (nothing is decoded)."""
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP")) as image:
        text = image.info.get("parameters")
        if isinstance(text, str):
            return text
        comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, bytes):
        if comment.startswith(_UNICODE):
            return comment[len(_UNICODE):].decode("utf-16-be", errors="replace")
        return comment[8:].decode("utf-8", errors="replace")
    return comment if isinstance(comment, str) else None


_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, Any]:
    """A1111's infotext as fields: ``Prompt``, ``Negative prompt`` and each ``Key: value``."""
    lines = text.split("\n")
    settings = lines[-1] if len(lines) > 1 else ""
    body = lines[:-1] if settings else lines
    negative = next((i for i, line in enumerate(body) if line.startswith("Negative prompt:")), None)
    fields: dict[str, Any] = {"Prompt": "\n".join(body if negative is None else body[:negative]),
                              "Negative prompt": "" if negative is None else
                              "\n".join(body[negative:])[len("Negative prompt:"):].strip()}
    for key, value in _FIELD.findall(settings):
        fields[key.strip()] = value.strip().strip('"')
    return fields


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _png_with_text(data: bytes, keyword: str, text: str) -> bytes:
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return data
    # iTXt (UTF-8, uncompressed), as Pillow writes a text that is not Latin-1; after IHDR.
    payload = keyword.encode("latin-1") + b"\x00\x00\x00" + b"\x00" + b"\x00" + text.encode("utf-8")
    end_of_ihdr = 8 + 8 + struct.unpack(">I", data[8:12])[0] + 4
    return data[:end_of_ihdr] + _chunk(b"iTXt", payload) + data[end_of_ihdr:]


def _exif_user_comment(text: str) -> bytes:
    """A TIFF-structured EXIF block (no ``Exif\\0\\0`` header) with UserComment = ``text``."""
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = _UNICODE + text.encode("utf-16-be")
    data = exif.tobytes()
    return data.removeprefix(b"Exif\x00\x00")


def _jpeg_with_exif(data: bytes, tiff: bytes) -> bytes:
    if not data.startswith(b"\xff\xd8"):
        return data
    segment = b"Exif\x00\x00" + tiff
    if len(segment) + 2 > 0xFFFF:
        return data  # too long for one APP1 segment: leave the image as it is
    app1 = b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment
    at = 2
    if data[2:4] == b"\xff\xe0":  # after a JFIF APP0, where readers expect EXIF
        at = 4 + struct.unpack(">H", data[4:6])[0]
    return data[:at] + app1 + data[at:]


def _webp_with_exif(data: bytes, tiff: bytes) -> bytes:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return data
    chunks = data[12:]
    kind = chunks[:4]
    if kind == b"VP8X":
        flags = chunks[8] | 0x08  # EXIF present
        chunks = chunks[:8] + bytes([flags]) + chunks[9:]
    elif kind in (b"VP8 ", b"VP8L"):
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            (width, height), has_alpha = image.size, image.mode == "RGBA"
        alpha = 0x10 if kind == b"VP8L" and has_alpha else 0
        header = bytes([0x08 | alpha, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        chunks = b"VP8X" + struct.pack("<I", len(header)) + header + chunks
    else:
        return data
    exif = b"EXIF" + struct.pack("<I", len(tiff)) + tiff + (b"\x00" if len(tiff) % 2 else b"")
    body = b"WEBP" + chunks + exif
    return b"RIFF" + struct.pack("<I", len(body)) + body
