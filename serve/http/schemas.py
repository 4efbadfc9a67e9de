"""HTTP request/response models and the spec the ingress hands to the graph.

Request models are built from :class:`serve.settings.ApiLimits`, so the caps in
force are the ones the OpenAPI schema documents and the validator enforces.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from deployments.messages import SCHEDULERS
from serve.http.images import decode_image, size_from_image
from serve.settings import ApiLimits

MAX_SEED = 2**63 - 1
OutputFormat = Literal["png", "jpeg", "webp"]


SCHEDULER_NAMES = tuple(SCHEDULERS)


@dataclass(frozen=True, eq=False)
class MixItem:
    """One item of a mix: a text or a decoded image, with its weight."""

    weight: float
    text: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class GenerationSpec:
    """A validated request of any mode with its seeds fixed and its images decoded: what the graph executes."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    seeds: tuple[int, ...]
    prior_steps: int
    prior_guidance_scale: float
    steps: int
    guidance_scale: float
    output_format: str = "png"
    mode: str = "text2img"
    scheduler: str = "ddpm"
    image: np.ndarray | None = field(default=None, repr=False)
    """(H, W, 3) uint8: img2img, inpaint, variations and ControlNet img2img."""
    mask: np.ndarray | None = field(default=None, repr=False)
    """(H, W) uint8, white = repaint (already inverted when ``invert_mask`` was set)."""
    mask_blur: float = 0.0
    strength: float | None = None
    """img2img / ControlNet img2img: decoder strength; variations: prior strength."""
    hint: np.ndarray | None = field(default=None, repr=False)
    """(H, W, 3) uint8 depth hint: ControlNet."""
    mix: tuple[MixItem, ...] = ()


class SpecError(ValueError):
    """A request that passed field validation but cannot run, naming the field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _seeds(seed: int | None, count: int) -> tuple[int, ...]:
    """``seed + i`` for image i, or fresh random ones."""
    first = seed if seed is not None else secrets.randbelow(MAX_SEED - count + 1)
    if first + count - 1 > MAX_SEED:
        raise SpecError("seed", f"seed + num_images - 1 must be at most {MAX_SEED}")
    return tuple(first + i for i in range(count))


class _RequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    mode: ClassVar[str] = "text2img"
    max_side: ClassVar[int] = 1024
    max_output_pixels: ClassVar[int] = 1024 * 1024

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain at least one non-whitespace character")
        return value

    def _size(self, reference: np.ndarray | None) -> tuple[int, int]:
        """The requested size, or the reference image's rounded to multiples of 64."""
        width, height = getattr(self, "width", None), getattr(self, "height", None)
        if reference is not None:
            width = width or size_from_image(reference.shape[1], self.max_side)
            height = height or size_from_image(reference.shape[0], self.max_side)
        default = min(512, self.max_side)
        return width or default, height or default

    def _check_strength(self, steps: int, field: str = "steps") -> None:
        strength = getattr(self, "strength", None)
        if strength is not None and int(steps * strength) < 1:
            raise SpecError(
                "strength", f"strength {strength} x {field} {steps} leaves no denoising step; raise strength or {field}"
            )

    def to_spec(self) -> GenerationSpec:
        image = getattr(self, "image", None)
        hint = getattr(self, "hint", None)
        mask = getattr(self, "mask", None)
        width, height = self._size(hint if hint is not None else image)
        if width * height > self.max_output_pixels:
            raise SpecError(
                "width", f"width x height = {width}x{height} = {width * height} pixels exceeds the limit of "
                f"{self.max_output_pixels} pixels (max_output_pixels)"
            )
        if mask is not None:
            if mask.shape != image.shape[:2]:
                raise SpecError(
                    "mask", f"mask is {mask.shape[1]}x{mask.shape[0]} but image is {image.shape[1]}x{image.shape[0]}; "
                    "they must be the same size"
                )
            if getattr(self, "invert_mask", False):
                mask = 255 - mask
        if self.mode in ("img2img", "controlnet") and image is not None:
            self._check_strength(self.steps)
        if self.mode == "variations":
            self._check_strength(self.prior_steps, "prior_steps")
        mix: tuple[MixItem, ...] = ()
        if self.mode == "mix":
            if len(self.weights) != len(self.items):
                raise SpecError(
                    "weights", f"one weight per item: {len(self.items)} items but {len(self.weights)} weights"
                )
            mix = tuple(MixItem(float(w), item.text, item.image) for item, w in zip(self.items, self.weights))
        strength = getattr(self, "strength", None)
        return GenerationSpec(
            prompt=getattr(self, "prompt", None) or "",
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            seeds=_seeds(self.seed, self.num_images),
            prior_steps=self.prior_steps,
            prior_guidance_scale=float(self.prior_guidance_scale),
            steps=self.steps,
            guidance_scale=float(self.guidance_scale),
            output_format=self.output_format,
            mode=self.mode,
            scheduler=self.scheduler,
            image=image,
            mask=mask,
            mask_blur=float(getattr(self, "mask_blur", 0.0)),
            strength=None if strength is None or (self.mode == "controlnet" and image is None) else float(strength),
            hint=hint,
            mix=mix,
        )


def _image_field(limits: ApiLimits, description: str, mode: str = "RGB"):
    """A base64 image: validated and decoded (to a uint8 array) during request validation."""

    def decode(value: str) -> np.ndarray:
        return decode_image(value, limits.max_image_pixels, mode)

    return Annotated[
        str,
        Field(
            max_length=limits.max_body_bytes,
            description=f"{description} Base64 PNG, JPEG or WebP, at most {limits.max_image_pixels} pixels.",
        ),
        AfterValidator(decode),
    ]


def request_models(limits: ApiLimits) -> dict[str, type[_RequestBase]]:
    """Per mode, the request body model, with ``limits`` as its documented bounds."""
    side = Annotated[
        int,
        Field(ge=64, le=limits.max_side, multiple_of=64, description=f"Pixels: a multiple of 64, 64 to {limits.max_side}."),
    ]
    optional_side = Annotated[
        int | None,
        Field(
            ge=64, le=limits.max_side, multiple_of=64,
            description="Pixels, a multiple of 64; default: the input image's, rounded to a multiple of 64.",
        ),
    ]
    # Defaults must obey the caps too (pydantic does not validate defaults).
    default_side = min(limits.default_side or 512, limits.max_side)
    guidance = Annotated[float, Field(ge=0.0, le=limits.max_guidance_scale)]
    text = Annotated[str, Field(max_length=limits.max_prompt_chars)]
    prompt = Annotated[str, Field(min_length=1, max_length=limits.max_prompt_chars, description="What to draw.")]
    strength = Annotated[float, Field(ge=0.0, le=1.0)]
    common = dict(
        negative_prompt=(text | None, Field(default=None, description="What to steer away from.")),
        num_images=(Annotated[int, Field(ge=1, le=limits.max_num_images)], 1),
        # At least 2: the prior's UnCLIPScheduler divides by (steps - 1), in diffusers' pipeline too.
        prior_steps=(Annotated[int, Field(ge=2, le=limits.max_prior_steps)], min(25, limits.max_prior_steps)),
        prior_guidance_scale=(guidance, min(4.0, limits.max_guidance_scale)),
        steps=(Annotated[int, Field(ge=1, le=limits.max_steps)], min(50, limits.max_steps)),
        guidance_scale=(guidance, min(4.0, limits.max_guidance_scale)),
        seed=(
            Annotated[int | None, Field(ge=0, le=MAX_SEED, description="Seed of image 0; image i uses seed + i.")],
            None,
        ),
        output_format=(OutputFormat, "png"),
        scheduler=(
            Literal[SCHEDULER_NAMES],  # type: ignore[valid-type]
            Field(default="ddpm", description="The decoder's scheduler: ddpm (default), ddim, dpmsolver++ or unipc."),
        ),
    )

    def model(name: str, mode: str, doc: str, **fields):
        built = create_model(name, __base__=_RequestBase, __doc__=doc, **{**common, **fields})
        built.mode = mode
        built.max_side = limits.max_side
        built.max_output_pixels = limits.max_output_pixels
        return built

    mix_item = create_model(
        "MixItem",
        __config__=ConfigDict(extra="forbid", strict=True),
        __doc__="One item of a mix: exactly one of text or image.",
        text=(text | None, None),
        image=(_image_field(limits, "An image to mix.") | None, None),
        __validators__={"_one_of": model_validator(mode="after")(_exactly_one_source)},
    )
    return {
        "text2img": model(
            "Text2ImgRequest", "text2img", "Text to image.",
            prompt=(prompt, ...), width=(side, default_side), height=(side, default_side),
        ),
        "img2img": model(
            "Img2ImgRequest", "img2img", "Image to image: the input image, re-noised by strength and denoised toward the prompt.",
            image=(_image_field(limits, "The input image."), ...),
            prompt=(prompt, ...),
            strength=(strength, Field(default=0.3, description="0 keeps the input, 1 ignores it.")),
            width=(optional_side, None), height=(optional_side, None),
        ),
        "inpaint": model(
            "InpaintRequest", "inpaint",
            "Inpainting: repaint where the mask is white, keep where it is black (the diffusers >= 0.19 convention).",
            image=(_image_field(limits, "The image to edit."), ...),
            mask=(_image_field(limits, "Same size as image: white = repaint, black = keep.", "L"), ...),
            prompt=(prompt, ...),
            invert_mask=(bool, Field(default=False, description="For masks where black = repaint.")),
            mask_blur=(
                Annotated[float, Field(ge=0.0, le=64.0)],
                Field(default=0.0, description="Feather the result into the original by this many pixels; 0 = exactly diffusers' result."),
            ),
            width=(optional_side, None), height=(optional_side, None),
        ),
        "mix": model(
            "MixRequest", "mix", "Image mixing: the weighted sum of the items' CLIP image embeddings, decoded.",
            items=(Annotated[list[mix_item], Field(min_length=1, max_length=limits.max_mix_items)], ...),  # type: ignore[valid-type]
            weights=(
                Annotated[list[Annotated[float, Field(ge=-10.0, le=10.0)]], Field(min_length=1, max_length=limits.max_mix_items)],
                Field(..., description="One weight per item, in order."),
            ),
            width=(side, default_side), height=(side, default_side),
        ),
        "variations": model(
            "VariationsRequest", "variations", "New images near the input image's CLIP embedding (emb2emb prior).",
            image=(_image_field(limits, "The input image."), ...),
            prompt=(text, Field(default="", description="Optional text to steer the variations.")),
            strength=(strength, Field(default=0.3, description="How far from the image's embedding: 0 keeps it, 1 ignores it.")),
            width=(optional_side, None), height=(optional_side, None),
        ),
        "controlnet": model(
            "ControlnetRequest", "controlnet", "ControlNet depth: a depth-map hint, and optionally an input image.",
            hint=(_image_field(limits, "The depth map (grayscale or RGB); resized to the output size."), ...),
            prompt=(prompt, ...),
            image=(_image_field(limits, "Optional input image for ControlNet image-to-image.") | None, None),
            strength=(strength, Field(default=0.3, description="With an input image: 0 keeps it, 1 ignores it.")),
            width=(optional_side, None), height=(optional_side, None),
        ),
    }


def _exactly_one_source(item):
    if (item.text is None) == (item.image is None):
        raise ValueError("each item needs exactly one of text or image")
    return item


def embeddings_request_model(limits: ApiLimits) -> type[BaseModel]:
    """The ``POST /v1/embeddings`` body."""
    text = Annotated[str, Field(max_length=limits.max_prompt_chars)]
    cap = limits.max_embedding_items

    def check(body):
        if not body.texts and not body.images:
            raise ValueError("give at least one text or image")
        if len(body.texts) + len(body.images) > cap:
            raise ValueError(f"at most {cap} texts and images together, got {len(body.texts) + len(body.images)}")
        return body

    return create_model(
        "EmbeddingsRequest",
        __config__=ConfigDict(extra="forbid", strict=True),
        texts=(Annotated[list[text], Field(max_length=cap)], []),
        images=(Annotated[list[_image_field(limits, "An image.")], Field(max_length=cap)], []),  # type: ignore[misc]
        __validators__={"_check": model_validator(mode="after")(check)},
    )


def text2img_request_model(limits: ApiLimits) -> type[_RequestBase]:
    """The ``POST /v1/text2img`` body."""
    return request_models(limits)["text2img"]


class StageTimingOut(BaseModel):
    queue_ms: float
    compute_ms: float
    batch_size: int


class ImagesResponse(BaseModel):
    images: list[str] = Field(description="Base64-encoded images, one per seed.")
    media_type: str
    seeds: list[int] = Field(description="The seed of each image; resend one to reproduce that image.")
    width: int
    height: int
    timings: dict[str, StageTimingOut] = Field(description="Per stage: queue wait, compute time (ms), batch size.")
    total_ms: float
    request_id: str
    warnings: list[str] = Field(default=[], description="E.g. a prompt longer than the text encoder's 77-token window, which reads only its start.")


class EmbeddingsResponse(BaseModel):
    text_embeddings: list[list[float]] = Field(description="One projected CLIP text embedding per text.")
    image_embeddings: list[list[float]] = Field(description="One projected CLIP image embedding per image.")
    similarity: list[list[float]] | None = Field(
        default=None, description="Cosine similarity, texts x images, when both are given."
    )
    request_id: str


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    type: str
    message: str
    details: list[ErrorDetail] = []


class ErrorResponse(BaseModel):
    error: ErrorBody
    request_id: str | None = None
