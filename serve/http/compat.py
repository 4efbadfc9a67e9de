"""The APIs existing clients already speak, translated to ours — without Ray.

* **OpenAI Images**: ``POST /v1/images/generations``;
* **AUTOMATIC1111 / SD.Next** (``/sdapi/v1``): ``txt2img``, ``img2img``, ``progress``,
  ``interrupt``, ``skip``, ``samplers``, ``sd-models``, ``options``, ``scripts``.

The translations are pure functions from a foreign body to the body of one of our
request models (:func:`openai_to_native`, :func:`a1111_to_native`), so the same
validation, limits and seeds apply as on the native endpoints. Every generation runs
as a job (:class:`serve.jobs.JobRunner`): ``url`` results are the job's image URLs,
and A1111's progress and interrupt read and cancel this client's jobs. A client that
disconnects cancels its generation.
"""

import base64
import json
import re
import time
from collections import OrderedDict
from datetime import datetime, timezone
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from deployments.registry import DEFAULT_FAMILY, MODEL_IDS
from serve.http.catalog import ModelCatalog
from serve.http.errors import ApiError
from serve.http.auth import ApiKey
from serve.http.guards import Guards
from serve.http.images import DecodePool
from serve.http.metadata import package_version, parameters_text, parse_parameters, read_parameters
from serve.http.admission import AdmissionGate
from serve.http.job_routes import (
    SSE_KEEPALIVE_S,
    HeldStream,
    build_spec,
    enter_stream,
    from_store,
    job_limit_error,
    mode_not_configured,
)
from serve.http.schemas import QUALITY_PRESETS, SCHEDULER_NAMES, ErrorResponse
from serve.jobs.runner import JobRunner, Submission

MODEL_NAME = MODEL_IDS[DEFAULT_FAMILY]
"""The default family's model id (what a request naming no model gets, unless configured otherwise)."""
MAX_REMEMBERED_CLIENTS = 10_000
"""Clients whose A1111 sd_model_checkpoint option an ingress replica keeps (the oldest goes first)."""

# -- OpenAI Images ----------------------------------------------------------------------

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
OPENAI_NO_EFFECT = ("style", "background", "moderation", "output_compression", "input_fidelity")
"""Accepted for compatibility and reported as unsupported: there is no such knob here (``user``
and ``safety_identifier`` are accepted too: they identify, they change nothing anywhere)."""


class CompatError(ValueError):
    """A foreign body that cannot be translated, naming the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx).")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str = Field(description="This service's error type (validation_error, rate_limited, ...).")


class OpenAIError(BaseModel):
    """OpenAI's error shape, on the OpenAI routes (400 for invalid input)."""

    error: OpenAIErrorBody


class OpenAIExtensions(BaseModel):
    """Our fields a client may pass through on the OpenAI routes (openai-python: ``extra_body={...}``)."""

    model_config = ConfigDict(extra="forbid")
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    prior_steps: int | None = None
    guidance_scale: float | None = None
    prior_guidance_scale: float | None = None
    scheduler: str | None = None


OPENAI_EXTENSIONS = tuple(OpenAIExtensions.model_fields)


def extension_fields(body: OpenAIExtensions) -> dict[str, Any]:
    """The extensions ``body`` sets, as native fields (same names)."""
    return {name: value for name in OPENAI_EXTENSIONS if (value := getattr(body, name)) is not None}


class OpenAIImageRequest(OpenAIExtensions):
    """``POST /v1/images/generations`` (the OpenAI Images API)."""

    prompt: str
    model: str | None = Field(default=None, max_length=64,
                              description="A model of GET /v1/models; OpenAI's own names (dall-e-*, gpt-image-*) "
                                          "and none: the default model.")
    n: int | None = Field(default=1, description="Images to generate (up to the service's max_num_images).")
    size: str | None = Field(default=None, description="'WxH', multiples of 64; default (or 'auto'): the model's own size.")
    response_format: Literal["url", "b64_json"] | None = Field(
        default="url", description="url: the job's image URL (valid for the job TTL); b64_json: inline.")
    output_format: Literal["png", "jpeg", "webp"] | None = None
    stream: bool = Field(default=False, description="Server-Sent Events: partial images, then the images.")
    partial_images: int | None = Field(default=None, ge=0, le=3,
                                       description="With stream: previews sent before the images (0-3).")
    quality: str | None = Field(default=None, max_length=32,
                                description="low, medium, high (or hd): the fast, balanced and best presets; "
                                            "standard or auto: the defaults.")
    # The SDK's other fields: accepted, and listed in the response's unsupported_fields
    # where they change nothing here.
    style: str | None = Field(default=None, max_length=32)
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    input_fidelity: Literal["high", "low"] | None = None
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)


class OpenAIEditRequest(OpenAIImageRequest):
    """``POST /v1/images/edits`` (multipart): the form's fields; ``image`` (one) and ``mask``
    are its files. With a mask, inpainting; without, image-to-image."""

    strength: float | None = Field(default=None, description="Extension: without a mask, how far from the image "
                                                             "(0 keeps it, 1 ignores it; default 0.75).")


class OpenAIVariationRequest(OpenAIExtensions):
    """``POST /v1/images/variations`` (multipart): the form's fields; ``image`` is its file."""

    model: str | None = Field(default=None, max_length=64, description="As for generations.")
    n: int | None = 1
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = "url"
    user: str | None = Field(default=None, max_length=256)
    strength: float | None = Field(default=None, description="Extension: how far from the image's embedding.")


OPENAI_EDIT_DEFAULT_STRENGTH = 0.75


def openai_mask(data: bytes, max_pixels: int) -> str:
    """OpenAI's edit mask (transparent = edit there) as ours (white = repaint): base64 PNG."""
    import io

    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(data), formats=("PNG", "WEBP"))
    width, height = image.size
    if width * height > max_pixels:
        raise CompatError("mask", f"mask is {width}x{height}; the limit is {max_pixels} pixels")
    if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
        raise CompatError("mask", "needs an alpha channel: fully transparent pixels mark where to edit (as OpenAI's)")
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    buffer = io.BytesIO()
    Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_size(size: str | None, field: str = "size") -> tuple[int, int] | None:
    """``"WxH"`` -> (width, height); None for the native default ("auto" or none). Range and
    multiple-of-64 checks are the native model's."""
    if size is None or size == "auto":
        return None
    match = _SIZE.match(size)
    if not match:
        raise CompatError(field, f"must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {size!r}")
    return int(match.group(1)), int(match.group(2))


OPENAI_MODEL_NAMES = re.compile(r"^(dall-e-\d|gpt-image-[\w.-]+)$")
"""OpenAI's own image models: clients send them by default; they get the default model here."""


def openai_model(name: str | None) -> dict:
    """The native ``model`` field for OpenAI's ``model`` (empty: the default model)."""
    return {} if name is None or OPENAI_MODEL_NAMES.match(name) else {"model": name}


OPENAI_QUALITY: dict[str, str | None] = {"low": "fast", "medium": "balanced", "high": "best", "hd": "best",
                                         "standard": None, "auto": None, **{name: name for name in QUALITY_PRESETS}}
"""OpenAI's ``quality`` (gpt-image-*, dall-e-3) -> our preset; None: the service's defaults."""


def openai_quality(value: str | None) -> dict:
    """The native ``quality`` field for OpenAI's."""
    if value is None:
        return {}
    if value.lower() not in OPENAI_QUALITY:
        raise CompatError("quality", f"must be one of {', '.join(OPENAI_QUALITY)}, got {value!r}")
    preset = OPENAI_QUALITY[value.lower()]
    return {} if preset is None else {"quality": preset}


def openai_to_native(body: OpenAIImageRequest) -> dict:
    """The ``/v1/text2img`` body for an OpenAI request."""
    native: dict[str, Any] = {"prompt": body.prompt, "num_images": body.n or 1, **openai_model(body.model),
                              **openai_quality(body.quality)}
    size = parse_size(body.size)
    if size is not None:
        native["width"], native["height"] = size
    if body.output_format is not None:
        native["output_format"] = body.output_format
    return {**native, **extension_fields(body)}


def openai_field(native_field: str) -> str:
    """The OpenAI name of a native field, for error messages."""
    return {"num_images": "n", "width": "size", "height": "size"}.get(native_field, native_field)


# -- AUTOMATIC1111 ------------------------------------------------------------------------

# A1111 sampler names for our decoder schedulers. "DPM++ 2M" is multistep DPM-Solver++
# of order 2, which is what the dpmsolver++ schedulers run ("SDE": its stochastic form).
SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ddpm": ("DDPM", ("ddpm",)),
    "ddim": ("DDIM", ("ddim",)),
    "dpmsolver++": ("DPM++ 2M", ("dpmsolver++", "k_dpmpp_2m")),
    "dpmsolver++-karras": ("DPM++ 2M Karras", ("dpmsolver++-karras", "k_dpmpp_2m_ka")),
    "dpmsolver++-sde": ("DPM++ 2M SDE", ("dpmsolver++-sde", "k_dpmpp_2m_sde")),
    "unipc": ("UniPC", ("unipc",)),
    "deis": ("DEIS", ("deis",)),
}
assert set(SAMPLERS) == set(SCHEDULER_NAMES)

A1111_COMMON = {"prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "seed", "batch_size",
                "n_iter", "sampler_name", "sampler_index", "prior_steps", "prior_guidance_scale", "override_settings"}
A1111_IMG2IMG = {"init_images", "denoising_strength", "mask", "inpainting_mask_invert", "mask_blur"}
A1111_HIRES = {"enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "denoising_strength"}
"""txt2img's hires fix: read when enable_hr is on (off, they change nothing, as in A1111)."""
A1111_DEFAULT_STRENGTH = 0.75
A1111_DEFAULT_HIRES_SCALE = 2.0
A1111_DEFAULT_HIRES_STRENGTH = 0.7
A1111_DEFAULT_MASK_BLUR = 4
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,")


# Request models of the /sdapi/v1 routes, for the OpenAPI document only: the routes read the
# raw body themselves (admission after the body, errors in our shape, and any key accepted:
# what is not translated is listed in info's unsupported_fields). A field marked
# ``x-unsupported`` is one of A1111's that changes nothing here, documented so that clients
# see it is accepted; the others are exactly what :func:`a1111_to_native` reads (checked below
# and in tests/unit/test_compat.py). Keep them flat (no nested models): their JSON schema goes
# inline into the route's requestBody, where a ``$defs`` reference would dangle.

_UNSUPPORTED = "Accepted and listed in info's unsupported_fields: no effect here."


def _unsupported(description: str = "") -> Any:
    """An A1111 field accepted (any value) that changes nothing here."""
    return Field(default=None, description=f"{description} {_UNSUPPORTED}".strip(),
                 json_schema_extra={"x-unsupported": True})


def _no_schema_default(schema: dict) -> None:
    schema.pop("default", None)  # optional, but null is refused: no default to show


class A1111GenerationRequest(BaseModel):
    """The fields ``txt2img`` and ``img2img`` share. Unknown keys are accepted and listed in the
    response's ``info.unsupported_fields``. Limits (sizes, steps, images) are those of the
    native endpoints; errors name these fields."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(default="", description="The prompt.")
    negative_prompt: str | None = Field(default=None, description="What to steer away from (empty: none).")
    steps: int | None = Field(default=None, description="Decoder denoising steps (default: the model's). "
                                                         "A whole float (9.0) is read as an integer.")
    cfg_scale: float | None = Field(default=None, description="Decoder guidance scale (native guidance_scale).")
    width: int | None = Field(default=None, description="Image width in pixels, a multiple of 64 here "
                                                         "(default: the model's size).")
    height: int | None = Field(default=None, description="Image height in pixels, a multiple of 64 here.")
    seed: int | None = Field(default=-1, description="-1 (or null): a random seed. Image i of the request "
                                                     "uses seed + i, as A1111.")
    batch_size: int = Field(default=1, ge=1, description="Images per batch; batch_size x n_iter images are made "
                                                         "together (up to the service's max_num_images).")
    n_iter: int = Field(default=1, ge=1, description="Batches; multiplies batch_size.")
    sampler_name: str | None = Field(default=None, description="An A1111 sampler (GET /sdapi/v1/samplers), "
                                                                "case-insensitive; any other A1111 sampler runs as "
                                                                "the nearest served, reported in info.substitutions.")
    sampler_index: str | None = Field(default=None, description="A1111's older name for sampler_name, used when "
                                                                 "sampler_name is not given (else listed as unsupported).")
    prior_steps: int | None = Field(default=None, description="Extension: the prior's denoising steps.")
    prior_guidance_scale: float | None = Field(default=None, description="Extension: the prior's guidance scale.")
    # A1111's other fields: accepted, no effect.
    scheduler: str | None = _unsupported("A1111's noise schedule ('automatic', 'Karras', ...): each sampler "
                                         "runs with its own here.")
    styles: list[str] | None = _unsupported("Saved prompt styles.")
    subseed: int | None = _unsupported("Variation seed.")
    subseed_strength: float | None = _unsupported("Variation strength.")
    seed_resize_from_w: int | None = _unsupported()
    seed_resize_from_h: int | None = _unsupported()
    restore_faces: bool | None = _unsupported("Face restoration.")
    tiling: bool | None = _unsupported("Tileable images.")
    eta: float | None = _unsupported("Sampler eta.")
    override_settings: dict[str, Any] | None = Field(
        default=None, description="Per-request options: sd_model_checkpoint (a model of GET /sdapi/v1/sd-models) "
                                  "picks this request's model; other keys are listed in info's unsupported_fields "
                                  "as override_settings.<key>.")
    override_settings_restore_afterwards: bool | None = _unsupported()
    send_images: bool | None = _unsupported("The images are always returned.")
    save_images: bool | None = _unsupported("Nothing is saved on the server beyond the job's TTL.")
    do_not_save_samples: bool | None = _unsupported()
    do_not_save_grid: bool | None = _unsupported()
    script_name: str | None = _unsupported("No scripts (GET /sdapi/v1/scripts lists none).")
    script_args: list[Any] | None = _unsupported()
    alwayson_scripts: dict[str, Any] | None = _unsupported()


class A1111Txt2ImgRequest(A1111GenerationRequest):
    """``POST /sdapi/v1/txt2img``: AUTOMATIC1111's text-to-image body. Unknown keys are accepted
    and listed in the response's ``info.unsupported_fields``; limits are the native
    ``/v1/text2img``'s, and errors name these fields."""

    enable_hr: bool | None = Field(default=None, description="Hires. fix: a second pass at width x height x hr_scale "
                                                             "(native: hires).")
    hr_scale: float | None = Field(default=None, description=f"With enable_hr (default {A1111_DEFAULT_HIRES_SCALE:g}).")
    hr_upscaler: str | None = Field(default=None, description="With enable_hr: 'Latent…' resizes the latents "
                                    "(bilinear); any other upscaler runs as a bicubic pixel resize (info.substitutions).")
    hr_second_pass_steps: int | None = Field(default=None, description="With enable_hr: the second pass's steps "
                                                                       "(0: steps).")
    hr_resize_x: int | None = _unsupported("A target width for hires (hr_scale is used).")
    hr_resize_y: int | None = _unsupported("A target height for hires (hr_scale is used).")
    denoising_strength: float | None = Field(default=None, description="With enable_hr: the second pass's strength "
                                             f"(default {A1111_DEFAULT_HIRES_STRENGTH:g}).")


class A1111Img2ImgRequest(A1111GenerationRequest):
    """``POST /sdapi/v1/img2img``: AUTOMATIC1111's image-to-image body; with a ``mask``,
    inpainting. Unknown keys are accepted and listed in the response's
    ``info.unsupported_fields``; limits are the native ``/v1/img2img``'s and ``/v1/inpaint``'s."""

    init_images: list[str] = Field(min_length=1, max_length=1,
                                   description="Exactly one base64 image (a data: URL is accepted).")
    denoising_strength: float = Field(default=A1111_DEFAULT_STRENGTH,
                                      description="Without a mask: how far from the image (0 keeps it, 1 ignores "
                                                  "it). With a mask it is listed as unsupported (the inpainting "
                                                  "decoder repaints the masked area fully).")
    mask: str | None = Field(default=None, description="Base64 mask (a data: URL is accepted); white: repaint. "
                                                        "Given: inpainting.")
    inpainting_mask_invert: bool | Literal[0, 1] = Field(default=False, description="With a mask: repaint where "
                                                                                    "it is black instead. Without "
                                                                                    "one: listed as unsupported.")
    mask_blur: float = Field(default=A1111_DEFAULT_MASK_BLUR, description="With a mask: blur radius of its edge, "
                                                                          "in pixels. Without one: listed as "
                                                                          "unsupported.")
    resize_mode: int | None = _unsupported("The image is resized to width x height.")
    inpainting_fill: int | None = _unsupported("The inpainting decoder starts from noise in the masked area.")
    inpaint_full_res: bool | int | None = _unsupported("The whole image is inpainted at width x height.")
    inpaint_full_res_padding: int | None = _unsupported()
    image_cfg_scale: float | None = _unsupported()
    initial_noise_multiplier: float | None = _unsupported()
    include_init_images: bool | None = _unsupported()


class A1111OptionsRequest(BaseModel):
    """``POST /sdapi/v1/options``: option names and values (Open WebUI posts back the whole
    object of ``GET /sdapi/v1/options``, changed). A key whose value equals the current one
    (``GET /sdapi/v1/options``) is listed in ``applied``; any other key is accepted and listed in
    ``unsupported``."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str = Field(default=None, json_schema_extra=_no_schema_default,
                                     description="A model of GET /sdapi/v1/sd-models (its title or model_name); "
                                                 "an unknown one is refused (422). Each request's decoder "
                                                 "variant follows its mode.")


class A1111PngInfoRequest(BaseModel):
    """``POST /sdapi/v1/png-info``: the image whose generation parameters to read. Other keys
    are ignored."""

    model_config = ConfigDict(extra="allow")

    image: str = Field(min_length=1, description="Base64 PNG, JPEG or WebP (a data: URL is accepted); nothing "
                                                 "is decoded, its metadata is read.")


def a1111_translated_fields(model: type[BaseModel]) -> set[str]:
    """The fields of an A1111 request model that are translated (not marked unsupported)."""
    return {name for name, field in model.model_fields.items()
            if not (isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("x-unsupported"))}


assert a1111_translated_fields(A1111Txt2ImgRequest) == A1111_COMMON | A1111_HIRES
assert a1111_translated_fields(A1111Img2ImgRequest) == A1111_COMMON | A1111_IMG2IMG


def json_request_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` documenting ``model`` as a route's JSON body, for a route that reads its
    body itself (so the document has the schema and the runtime is unchanged)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    if "$defs" in schema:  # inline in the operation: nothing would register these components
        raise TypeError(f"{model.__name__}: keep request body models flat (nested: {sorted(schema['$defs'])})")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# A1111's other samplers, run as the nearest scheduler served (the substitution is reported
# in ``info``): ancestral samplers add fresh noise at every step, as DDPM does; SDE ones are
# nearest to SDE-DPM-Solver++; the deterministic ODE solvers are nearest to DPM-Solver++
# (multistep, order 2); PLMS is a
# linear multistep method, as UniPC's predictor is; LCM and DDIM CFG++ are DDIM-like.
A1111_NEAREST: dict[str, str] = {
    **dict.fromkeys(("euler a", "dpm2 a", "dpm++ 2s a", "restart"), "ddpm"),
    **dict.fromkeys(("dpm++ sde", "dpm++ 2m sde heun", "dpm++ 3m sde"), "dpmsolver++-sde"),
    **dict.fromkeys(("euler", "lms", "heun", "dpm2", "dpm fast", "dpm adaptive"), "dpmsolver++"),
    "plms": "unipc",
    **dict.fromkeys(("lcm", "ddim cfg++"), "ddim"),
}
_NOISE_SCHEDULE_SUFFIX = re.compile(r"\s+(karras|exponential|sgm uniform|polyexponential|uniform|automatic)$")


def scheduler_for_sampler(name: str) -> tuple[str, bool]:
    """(our scheduler, whether it stands in for another) for an A1111 sampler name or alias,
    case-insensitive; a noise-schedule suffix (" Karras", ...) we do not serve is ignored."""
    asked = name.strip().lower()
    for wanted in (asked, _NOISE_SCHEDULE_SUFFIX.sub("", asked)):
        for scheduler, (title, aliases) in SAMPLERS.items():
            if wanted == title.lower() or wanted in aliases:
                return scheduler, wanted != asked
    if wanted in A1111_NEAREST:
        return A1111_NEAREST[wanted], True
    names = ", ".join(title for title, _ in SAMPLERS.values())
    raise CompatError("sampler_name", f"unknown sampler {name!r}; available: {names} (GET /sdapi/v1/samplers), "
                                      "or any AUTOMATIC1111 sampler, run as the nearest of those")


def a1111_hires(body: dict) -> tuple[dict, dict | None]:
    """(the native ``hires`` field, the upscaler's substitution or None) for an A1111 txt2img
    body with enable_hr: "Latent" resizes the latents (bilinear) as A1111's does; its other
    latent modes run as it, and every other upscaler as a bicubic resize of the pixels."""
    hires: dict[str, Any] = {"scale": _number(body, "hr_scale", float, A1111_DEFAULT_HIRES_SCALE),
                             "strength": _number(body, "denoising_strength", float, A1111_DEFAULT_HIRES_STRENGTH)}
    steps = body.get("hr_second_pass_steps")
    if steps not in (None, 0):
        hires["steps"] = _number(body, "hr_second_pass_steps", int)
    upscaler = body.get("hr_upscaler")
    if upscaler is not None and not (isinstance(upscaler, str) and len(upscaler) <= 64):
        raise CompatError("hr_upscaler", f"must be an upscaler's name of at most 64 characters, got {upscaler!r:.40}")
    latent = upscaler is None or upscaler.lower().startswith("latent")  # A1111's default is "Latent"
    hires["upscale"] = "latent" if latent else "pixel"
    if upscaler is None or upscaler.lower() == "latent":
        return hires, None
    return hires, {"asked": upscaler, "used": "Latent" if latent else "Bicubic"}


def _strip_data_url(value: Any) -> Any:
    return _DATA_URL.sub("", value, count=1) if isinstance(value, str) else value


def _number(body: dict, name: str, kind: type, default: Any = None) -> Any:
    """``body[name]`` as ``kind``: whole floats pass as int, ints as float; anything else is
    left for the native model to refuse (naming the field), except where ``default`` is given:
    then a non-number is refused here."""
    value = body.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if default is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise CompatError(name, f"must be a number, got {value!r:.40}")
    return value


def _flag(body: dict, name: str) -> bool:
    """A1111 flags are booleans or 0/1; a string like "false" is refused, never read as true."""
    value = body.get(name, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise CompatError(name, f"must be true, false, 0 or 1, got {value!r:.40}")


def a1111_checkpoint(value: Any, field: str = "sd_model_checkpoint") -> str:
    """The model id an A1111 checkpoint names: the id itself, or an A1111-style title
    ``"<id> [<hash>]"``; the 2.2 decoder titles this service listed before models were
    named stand for ``kandinsky-2-2``."""
    if not isinstance(value, str) or not value.strip():
        raise CompatError(field, "must name a model of GET /sdapi/v1/sd-models")
    name = value.split(" [", 1)[0].strip()
    return MODEL_NAME if name.startswith("kandinsky-2-2-") else name


def a1111_to_native(body: dict, img2img: bool) -> tuple[str, dict, list[str], dict[str, dict]]:
    """(mode, native body, unsupported fields, substitutions) for an A1111
    ``txt2img``/``img2img`` body.

    Every field of ``body`` that is not translated is listed in the third item (and so
    in the response's ``info``), whatever its value: nothing is dropped silently. A value
    run as the nearest one served (a sampler) is in the fourth: field -> {asked, used}.
    """
    substitutions: dict[str, dict] = {}
    if not isinstance(body, dict):
        raise CompatError("body", "must be a JSON object")
    known = A1111_COMMON | (A1111_IMG2IMG if img2img else A1111_HIRES)
    unsupported = sorted(name for name in body if name not in known)
    native: dict[str, Any] = {"prompt": body.get("prompt", "")}
    overrides = body.get("override_settings")
    if overrides is not None:
        if not isinstance(overrides, dict):
            raise CompatError("override_settings", "must be an object of option names and values")
        if "sd_model_checkpoint" in overrides:
            native["model"] = a1111_checkpoint(overrides["sd_model_checkpoint"], "override_settings.sd_model_checkpoint")
        unsupported.extend(f"override_settings.{name}" for name in overrides if name != "sd_model_checkpoint")
    if body.get("negative_prompt"):
        native["negative_prompt"] = body["negative_prompt"]
    for ours, theirs, kind in (("steps", "steps", int), ("guidance_scale", "cfg_scale", float),
                               ("width", "width", int), ("height", "height", int),
                               ("prior_steps", "prior_steps", int), ("prior_guidance_scale", "prior_guidance_scale", float)):
        if body.get(theirs) is not None:
            native[ours] = _number(body, theirs, kind)
    seed = body.get("seed", -1)
    if seed is not None and seed != -1:
        native["seed"] = _number(body, "seed", int)
    batch_size, n_iter = body.get("batch_size", 1), body.get("n_iter", 1)
    for name, value in (("batch_size", batch_size), ("n_iter", n_iter)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CompatError(name, f"must be a whole number of at least 1, got {value!r}")
    native["num_images"] = batch_size * n_iter
    sampler = body.get("sampler_name") or body.get("sampler_index")
    if sampler:
        native["scheduler"], substituted = scheduler_for_sampler(str(sampler))
        if substituted:
            substitutions["sampler_name"] = {"asked": str(sampler), "used": SAMPLERS[native["scheduler"]][0]}
    if body.get("sampler_name") and body.get("sampler_index") and "sampler_index" not in unsupported:
        unsupported.append("sampler_index")  # sampler_name wins, as in A1111
    mode = "text2img"
    if not img2img and _flag(body, "enable_hr"):
        native["hires"], upscaler = a1111_hires(body)
        if upscaler is not None:
            substitutions["hr_upscaler"] = upscaler
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or len(images) != 1:
            raise CompatError("init_images", "give exactly one base64 image (several init images are not supported)")
        native["image"] = _strip_data_url(images[0])
        if body.get("mask"):
            mode = "inpaint"
            native["mask"] = _strip_data_url(body["mask"])
            native["invert_mask"] = _flag(body, "inpainting_mask_invert")
            native["mask_blur"] = _number(body, "mask_blur", float, A1111_DEFAULT_MASK_BLUR)
            if "denoising_strength" in body:  # the inpainting decoder repaints fully
                unsupported.append("denoising_strength")
        else:
            mode = "img2img"
            native["strength"] = _number(body, "denoising_strength", float, A1111_DEFAULT_STRENGTH)
            unsupported.extend(name for name in ("inpainting_mask_invert", "mask_blur") if name in body)
    return mode, native, sorted(set(unsupported)), substitutions


def translated(translate, *args):
    """``translate(*args)``, with a :class:`CompatError` as the 422 naming the foreign field."""
    try:
        return translate(*args)
    except CompatError as error:
        raise ApiError.invalid(error.field, error.message) from None


def a1111_native_field(field: str) -> str:
    """The A1111 name of a native field, for error messages."""
    return {"guidance_scale": "cfg_scale", "num_images": "batch_size", "scheduler": "sampler_name",
            "image": "init_images", "strength": "denoising_strength", "invert_mask": "inpainting_mask_invert",
            "model": "sd_model_checkpoint", "hires.scale": "hr_scale", "hires.strength": "denoising_strength",
            "hires.steps": "hr_second_pass_steps", "hires.upscale": "hr_upscaler"}.get(field, field)


def a1111_info(spec: Any, body: dict, unsupported: list[str], job_id: str, interrupted: bool,
               substitutions: dict[str, dict] | None = None) -> str:
    """A1111's ``info``: a JSON string describing what was generated."""
    sampler = SAMPLERS[spec.scheduler][0]
    seeds = list(spec.seeds)
    negative = spec.negative_prompt or ""
    substitutions = substitutions or {}
    extra = ""
    if "sampler_name" in substitutions:
        extra = f", Sampler substitution: {substitutions['sampler_name']['asked']} -> {sampler}"
    version = package_version()
    model = spec.model or MODEL_NAME
    infotexts = [parameters_text(spec, seed, model, version, sampler) + extra for seed in seeds]
    return json.dumps({
        "prompt": spec.prompt,
        "all_prompts": [spec.prompt] * len(seeds),
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "width": spec.width,
        "height": spec.height,
        "sampler_name": sampler,
        "cfg_scale": spec.guidance_scale,
        "steps": spec.steps,
        "batch_size": body.get("batch_size", 1),
        "n_iter": body.get("n_iter", 1),
        "denoising_strength": spec.strength if spec.mode == "img2img" else None,
        "sd_model_name": model,
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "job_timestamp": datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S"),
        "substitutions": substitutions,
        "interrupted": interrupted,
        "unsupported_fields": unsupported,
        "job_id": job_id,
    })


# -- routes ----------------------------------------------------------------------------------


OPENAI_GENERATIONS_PATH = "/v1/images/generations"
OPENAI_EDITS_PATH = "/v1/images/edits"
OPENAI_VARIATIONS_PATH = "/v1/images/variations"
A1111_TXT2IMG_PATH = "/sdapi/v1/txt2img"
A1111_IMG2IMG_PATH = "/sdapi/v1/img2img"


def add_compat_routes(router: APIRouter, models: dict, jobs: JobRunner, unavailable: dict[str, str],
                      guards: Guards, metrics: Any, decode: DecodePool, streams: AdmissionGate,
                      catalog: ModelCatalog | None = None) -> None:
    """Register the OpenAI and A1111 routes on ``router``; OpenAI streams take their place in
    ``streams`` (the job event streams' gate); ``catalog``: the models requests may name."""
    models_served = catalog or ModelCatalog.serving((DEFAULT_FAMILY,))
    errors = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
              429: {"model": ErrorResponse}, 500: {"model": ErrorResponse}}
    # Synchronous for the client: each holds a place in the gate like /v1/{mode}, as well as a job.
    submits = [Depends(guards.generation_slot)]

    async def native_spec(mode: str, native: dict, rename_field, key: ApiKey | None) -> Any:
        try:
            spec = await decode.run(build_spec, models, mode, native, "", catalog)
        except ApiError as error:
            raise error.renamed(rename_field) from None
        guards.admit_cost(key, spec)
        return spec

    async def run(mode: str, spec: Any, client: str, origin: str) -> dict:
        """Run a job to its end: its final view (succeeded or cancelled)."""
        mode_not_configured(mode, unavailable)
        preview_every = jobs.settings.a1111_preview_every if origin == "sdapi" else 0
        view = await from_store(jobs.submit(Submission(spec, mode, client, origin, preview_every)))
        if "limit" in view:
            raise job_limit_error(view)
        started = time.perf_counter()
        final = await jobs.wait(view["id"])  # a client that goes away cancels the job
        if final is None:
            raise ApiError(500, "generation_failed", "the job expired before it could be read")
        if final["state"] == "failed":
            raise ApiError(500, "generation_failed", (final["error"] or {}).get("message", "generation failed"))
        if final["state"] == "succeeded":
            metrics.generation(mode, spec.width, spec.height, time.perf_counter() - started, spec.model)
        return final

    async def images_of(view: dict) -> list[bytes]:
        out = []
        for image in view["images"]:
            found = await jobs.store.image(view["id"], image["index"])
            if found is not None:
                out.append(found[0])
        return out

    openai_errors = {status: {"model": OpenAIError} for status in (400, 401, 403, 404, 409, 429, 500, 503)}

    @router.post(OPENAI_GENERATIONS_PATH, responses=openai_errors, dependencies=submits,
                 summary="OpenAI Images API: text to image. Extensions: seed, negative_prompt, steps, prior_steps, "
                         "guidance_scale, prior_guidance_scale, scheduler.")
    async def openai_generations(body: OpenAIImageRequest, client: str = Depends(guards.caller),
                                 key: ApiKey | None = Depends(guards.api_key)):
        spec = await native_spec("text2img", translated(openai_to_native, body), openai_field, key)
        return await openai_answer("text2img", spec, body, client, "image_generation")

    # The multipart routes read their form themselves, so they take their place in the gate
    # after it, as FastAPI does for a JSON body: a slow form must not hold one.
    @router.post(OPENAI_EDITS_PATH, responses=openai_errors, dependencies=[Depends(guards.accepting_work)],
                 summary="OpenAI Images API: edits (multipart). One image; with a mask (transparent = edit), "
                         "inpainting, else image-to-image (extension: strength, default 0.75).")
    async def openai_edits(request: Request, client: str = Depends(guards.caller),
                           key: ApiKey | None = Depends(guards.api_key)):
        fields, files = await openai_form(request, ("image", "image[]", "mask"))
        body = validated(OpenAIEditRequest, fields)
        images = files.get("image", []) + files.get("image[]", [])
        if len(images) != 1:
            raise ApiError.invalid("image", f"give exactly one image (got {len(images)}); several are not supported")
        native = translated(openai_to_native, body)
        native["image"] = base64.b64encode(images[0]).decode("ascii")
        mode = "img2img"
        if files.get("mask"):
            mode = "inpaint"
            native["mask"] = await decode.run(translated, openai_mask, files["mask"][0], models[mode].limits.max_image_pixels)
        else:
            native["strength"] = body.strength if body.strength is not None else OPENAI_EDIT_DEFAULT_STRENGTH
        spec = await native_spec(mode, native, openai_field, key)
        async with guards.holding_slot(client):
            return await openai_answer(mode, spec, body, client, "image_edit")

    @router.post(OPENAI_VARIATIONS_PATH, responses=openai_errors, dependencies=[Depends(guards.accepting_work)],
                 summary="OpenAI Images API: variations of one image (multipart; Kandinsky's image-embedding prior).")
    async def openai_variations(request: Request, client: str = Depends(guards.caller),
                                key: ApiKey | None = Depends(guards.api_key)):
        fields, files = await openai_form(request, ("image",))
        body = validated(OpenAIVariationRequest, fields)
        if len(files.get("image", [])) != 1:
            raise ApiError.invalid("image", "give exactly one image")
        native: dict[str, Any] = {"image": base64.b64encode(files["image"][0]).decode("ascii"), "num_images": body.n or 1}
        size = translated(parse_size, body.size)
        if size is not None:
            native["width"], native["height"] = size
        native.update(extension_fields(body))
        if body.strength is not None:
            native["strength"] = body.strength
        spec = await native_spec("variations", native, openai_field, key)
        async with guards.holding_slot(client):
            return await openai_answer("variations", spec, body, client, "image_variation")

    async def openai_form(request: Request, file_fields: tuple[str, ...]) -> tuple[dict, dict[str, list[bytes]]]:
        """A multipart form's plain fields and its files (bytes) by field name."""
        try:
            form = await request.form(max_files=4, max_fields=64)
        except Exception as error:  # not multipart, or over the form's limits
            raise ApiError.invalid("body", f"must be multipart/form-data, as the OpenAI SDK sends it ({error})") from None
        fields: dict[str, Any] = {}
        files: dict[str, list[bytes]] = {}
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
            elif name in file_fields:
                files.setdefault(name, []).append(await value.read())
            else:
                raise ApiError.invalid(name, "unexpected file")
        return fields, files

    def validated(model: type[BaseModel], fields: dict) -> Any:
        from pydantic import ValidationError

        try:
            return model.model_validate(fields)
        except ValidationError as error:
            raise ApiError.from_validation(error) from None

    async def openai_answer(mode: str, spec: Any, body: Any, client: str, event_prefix: str):
        """The OpenAI response for ``spec``: a stream when asked, else the images or their URLs."""
        if getattr(body, "stream", False):
            return await openai_stream(mode, spec, body, client, event_prefix)
        final = await run(mode, spec, client, "openai")
        if final["state"] == "cancelled":
            raise ApiError(409, "job_cancelled", f"job {final['id']} was cancelled")
        if body.response_format == "b64_json":
            data = [{"b64_json": base64.b64encode(image).decode("ascii")} for image in await images_of(final)]
        else:
            base = (jobs.settings.public_base_url or "").rstrip("/")
            data = [{"url": base + image["url"]} for image in final["images"]]
        unsupported = [name for name in OPENAI_NO_EFFECT if getattr(body, name, None) is not None]
        return {"created": int(final["created_at"]), "data": data, "output_format": spec.output_format,
                "size": f"{spec.width}x{spec.height}", "unsupported_fields": unsupported}

    async def openai_stream(mode: str, spec: Any, body: Any, client: str, event_prefix: str) -> StreamingResponse:
        """The generation as OpenAI's image stream: up to ``partial_images`` partial images (the
        job's previews, spread over the denoising steps), then one completed event per image."""
        mode_not_configured(mode, unavailable)
        partial = getattr(body, "partial_images", None) or 0
        every = max(1, spec.steps // (partial + 1)) if partial else 0
        enter_stream(streams, client)
        try:
            view = await from_store(jobs.submit(Submission(spec, mode, client, "openai", every)))
            if "limit" in view:
                raise job_limit_error(view)
        except BaseException:
            streams.leave(client=client)
            raise
        common = {"background": getattr(body, "background", None) or "auto", "quality": getattr(body, "quality", None) or "auto",
                  "size": f"{spec.width}x{spec.height}"}

        def error_event(message: str, code: str) -> str:
            error = {"message": message, "type": "server_error", "param": None, "code": code}
            return f"data: {json.dumps({'error': error})}\n\n"

        def event(payload: dict) -> str:
            return f"event: {payload['type']}\ndata: {json.dumps({**common, **payload})}\n\n"

        async def events() -> AsyncIterator[str]:
            job_id, after, sent, finished = view["id"], 0, 0, False
            try:
                while not finished:
                    found = await jobs.store.wait_events(job_id, after, SSE_KEEPALIVE_S, client)
                    if found is None:
                        yield error_event("the job expired", "gone")
                        return
                    found_events, finished = found
                    for item in found_events:
                        after = item["seq"]
                        image = item["data"].get("image") if item["event"] == "preview" else None
                        if image and sent < partial:
                            yield event({"type": f"{event_prefix}.partial_image", "b64_json": image,
                                         "partial_image_index": sent, "created_at": int(time.time()),
                                         "output_format": item["data"]["media_type"].split("/")[-1]})
                            sent += 1
                    if not found_events and not finished:
                        yield ": keep-alive\n\n"
                final = await jobs.store.view(job_id, client)
                if final is None or final["state"] != "succeeded":
                    message = ((final or {}).get("error") or {}).get("message") or f"the job {final and final['state']}"
                    yield error_event(message, "generation_failed")
                    return
                for image in await images_of(final):
                    yield event({"type": f"{event_prefix}.completed", "b64_json": base64.b64encode(image).decode("ascii"),
                                 "created_at": int(final["created_at"]), "output_format": spec.output_format,
                                 "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                           "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}})
            finally:
                if not finished:  # the client went away: nobody waits for this job any more
                    await jobs.cancel(job_id)

        return HeldStream(events(), lambda: streams.leave(client=client), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def a1111(request: Request, client: str, key: ApiKey | None, img2img: bool):
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            raise ApiError.invalid("body", "not valid JSON (or nested too deeply)") from None
        mode, native, unsupported, substitutions = translated(a1111_to_native, body, img2img)
        native.setdefault("model", checkpoint_of(client))  # override_settings, else this client's option
        spec = await native_spec(mode, native, a1111_native_field, key)
        final = await run(mode, spec, client, "sdapi")
        interrupted = final["state"] == "cancelled"
        images = [] if interrupted else await images_of(final)
        parameters = dict(body)
        if img2img:  # as A1111: the input images are not echoed back
            parameters["init_images"] = None
            parameters["mask"] = None
        return {
            "images": [base64.b64encode(image).decode("ascii") for image in images],
            "parameters": parameters,
            "info": a1111_info(spec, body, unsupported, final["id"], interrupted, substitutions),
        }

    # The A1111 routes read their body themselves (see a1111); openapi_extra documents it.
    @router.post(A1111_TXT2IMG_PATH, responses=errors, dependencies=submits, summary="AUTOMATIC1111-style text to image.",
                 openapi_extra=json_request_body(A1111Txt2ImgRequest))
    async def sdapi_txt2img(request: Request, client: str = Depends(guards.caller),
                            key: ApiKey | None = Depends(guards.api_key)):
        return await a1111(request, client, key, img2img=False)

    @router.post(A1111_IMG2IMG_PATH, responses=errors, dependencies=submits,
                 summary="AUTOMATIC1111-style image to image; with a mask, inpainting.",
                 openapi_extra=json_request_body(A1111Img2ImgRequest))
    async def sdapi_img2img(request: Request, client: str = Depends(guards.caller),
                            key: ApiKey | None = Depends(guards.api_key)):
        return await a1111(request, client, key, img2img=True)

    @router.get("/sdapi/v1/progress", summary="AUTOMATIC1111-style progress of this client's current generation.")
    async def sdapi_progress(client: str = Depends(guards.caller)):
        active = await jobs.store.active(client, "sdapi")
        running = [view for view in active if view["state"] == "running"] or active
        if not running:
            return {"progress": 0.0, "eta_relative": 0.0, "textinfo": None, "current_image": None,
                    "state": {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
                              "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}
        view = running[0]
        stamp = datetime.fromtimestamp(view["created_at"], timezone.utc).strftime("%Y%m%d%H%M%S")
        preview = await jobs.store.preview(view["id"], client)
        return {
            "progress": view["progress"],
            "eta_relative": view["eta_s"] or 0.0,
            "textinfo": view["stage"],
            "current_image": preview["image"] if preview else None,
            "state": {"skipped": False, "interrupted": view["cancel_requested"], "job": view["id"],
                      "job_count": len(active), "job_timestamp": stamp, "job_no": 0,
                      "sampling_step": view["step"], "sampling_steps": view["steps"]},
        }

    @router.post("/sdapi/v1/interrupt", summary="AUTOMATIC1111-style interrupt: cancel this client's generations.")
    async def sdapi_interrupt(client: str = Depends(guards.caller)):
        active = await jobs.store.active(client, "sdapi")
        for view in active:
            await jobs.cancel(view["id"])
        return {"interrupted": [view["id"] for view in active]}

    @router.post("/sdapi/v1/skip", summary="AUTOMATIC1111-style skip. A request's images are made together "
                                           "(one batch), so skipping ends the generation, as interrupt does.")
    async def sdapi_skip(client: str = Depends(guards.caller)):
        return await sdapi_interrupt(client)

    @router.post("/sdapi/v1/png-info", responses=errors,
                 summary="AUTOMATIC1111-style png-info: the generation parameters an image carries "
                         "(PNG 'parameters' chunk, or EXIF UserComment in JPEG/WebP); nothing is decoded.",
                 openapi_extra=json_request_body(A1111PngInfoRequest))
    async def sdapi_png_info(request: Request):
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            raise ApiError.invalid("body", "not valid JSON (or nested too deeply)") from None
        image = body.get("image") if isinstance(body, dict) else None
        if not isinstance(image, str) or not image:
            raise ApiError.invalid("image", "give the image as base64 (a data: URL is accepted)")
        try:
            text = read_parameters(base64.b64decode(_strip_data_url(image), validate=True))
        except Exception:
            raise ApiError.invalid("image", "not a readable base64 PNG, JPEG or WebP image") from None
        return {"info": text or "", "items": {"parameters": text} if text else {},
                "parameters": parse_parameters(text) if text else {}}

    @router.get("/sdapi/v1/scripts", summary="AUTOMATIC1111-style script list: none (clients probe it for extensions).")
    async def sdapi_scripts():
        return {"txt2img": [], "img2img": []}

    # A1111's options are server-wide; here sd_model_checkpoint is each client's own (its key,
    # else its address), kept in this ingress replica (a bounded table: the oldest choice goes first).
    chosen_models: OrderedDict[str, str] = OrderedDict()

    def checkpoint_of(client: str) -> str:
        return chosen_models.get(client, models_served.default_id)

    @router.get("/sdapi/v1/options", summary="AUTOMATIC1111-style options: this client's model and the defaults.")
    async def sdapi_options(client: str = Depends(guards.caller)):
        return {"sd_model_checkpoint": checkpoint_of(client), "sd_checkpoint_hash": None,
                "samples_format": "png", "sampler_name": SAMPLERS["ddpm"][0],
                "show_progress_every_n_steps": jobs.settings.a1111_preview_every}

    @router.post("/sdapi/v1/options", responses=errors,
                 summary="AUTOMATIC1111-style options: sd_model_checkpoint (a model of /sdapi/v1/sd-models) "
                         "sets this client's model for its later A1111 requests; other keys are listed as "
                         "unsupported.",
                 openapi_extra=json_request_body(A1111OptionsRequest))
    async def sdapi_set_options(request: Request, client: str = Depends(guards.caller)):
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            raise ApiError.invalid("body", "not valid JSON (or nested too deeply)") from None
        if not isinstance(body, dict):
            raise ApiError.invalid("body", "must be a JSON object of option names and values")
        if "sd_model_checkpoint" in body:
            model = translated(a1111_checkpoint, body["sd_model_checkpoint"])
            if model not in models_served.models:
                raise ApiError.invalid("sd_model_checkpoint", f"unknown model {str(body['sd_model_checkpoint'])[:80]!r}; "
                                                              f"served: {', '.join(models_served.ids)} (GET /sdapi/v1/sd-models)")
            chosen_models[client] = model
            chosen_models.move_to_end(client)
            while len(chosen_models) > MAX_REMEMBERED_CLIENTS:
                chosen_models.popitem(last=False)
        current = await sdapi_options(client)
        unchanged = {"sd_model_checkpoint", *(key for key, value in body.items() if current.get(key) == value)}
        return {"applied": sorted(key for key in body if key in unchanged),
                "unsupported": sorted(key for key in body if key not in unchanged)}

    @router.get("/sdapi/v1/samplers", summary="AUTOMATIC1111-style sampler list (our decoder schedulers).")
    async def sdapi_samplers():
        return [{"name": title, "aliases": list(aliases), "options": {}} for title, aliases in SAMPLERS.values()]

    @router.get("/sdapi/v1/sd-models", summary="AUTOMATIC1111-style model list: the models served (GET /v1/models).")
    async def sdapi_models():
        return [{"title": model_id, "model_name": model_id, "hash": None, "sha256": None,
                 "filename": model_id, "config": None} for model_id in models_served.ids]


