"""HTTP request/response models and the spec the ingress hands to the graph.

The request models are declared below with the bounds that never change; the bounds an
operator configures (:class:`serve.settings.ApiLimits`) are marked :class:`Cap` and filled
in by :func:`bind_limits`, so the caps in force are the ones the OpenAPI schema documents
and the validator enforces. Images arrive as base64 strings and are decoded by
``to_spec``, which turns a valid body into the :class:`GenerationSpec` the graph runs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import annotated_types
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, field_validator, model_validator

from deployments.messages import SCHEDULERS
from serve.http.images import PixelBudget, TotalTooLarge, check_total, decode_image, fit_to_output, size_from_image
from serve.settings import ApiLimits

MAX_SEED = 2**63 - 1
OutputFormat = Literal["png", "jpeg", "webp"]
SCHEDULER_NAMES = tuple(SCHEDULERS)


@dataclass(frozen=True)
class QualityPreset:
    """What ``quality`` sets, for the fields a request leaves out."""

    steps: int
    scheduler: str
    prior_steps: int
    guidance_scale: float | None = None
    """The decoder's; None keeps the request's. 1.0 decodes without guidance (one U-Net row, not two)."""


# Chosen from `kandinsky-serve bench quality` on the embedded model's held-out captions
# (docs/benchmarks.md, "Steps and quality"): "best" is the service's defaults; "fast" keeps
# held-out colour accuracy within 5 points of them at under 0.3x their latency. Decoding
# without guidance would save half the U-Net rows but costs ~20 points of colour accuracy.
QUALITY_PRESETS: dict[str, QualityPreset] = {
    "fast": QualityPreset(steps=6, scheduler="dpmsolver++", prior_steps=5),
    "balanced": QualityPreset(steps=12, scheduler="dpmsolver++", prior_steps=10),
    "best": QualityPreset(steps=50, scheduler="ddpm", prior_steps=25),
}
Quality = Literal[tuple(QUALITY_PRESETS)]  # type: ignore[valid-type]


# -- what the graph runs ----------------------------------------------------------------


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
    model: str = ""
    """The model id the request asked for (or the default); empty: the default model."""
    family: str = "2.2"
    """Its family (``deployments.registry.FAMILIES``): which deployments serve it."""
    prior_model: str = ""
    """A fine-tuned prior's id (the Prior replica's multiplexed model); empty: the family's prior."""
    hires: Hires | None = None
    """Hires fix: a first pass at ``hires``'s size, then upscaled to ``width`` x ``height`` and denoised again."""
    caption_check: bool = False
    """After decoding, caption each image (Florence-2) and score it against the prompt (CLIP)."""


@dataclass(frozen=True)
class Hires:
    """The first pass of a hires-fix request, and its second pass's settings."""

    width: int
    height: int
    """The first pass's size (the request's ``width`` and ``height``)."""
    strength: float
    steps: int
    upscale: str = "pixel"


class SpecError(ValueError):
    """A request that passed field validation but cannot run, naming the field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# -- configured bounds --------------------------------------------------------------------


@dataclass(frozen=True)
class Cap:
    """A bound read from :class:`ApiLimits` when the models are bound (:func:`bind_limits`):
    ``Cap("le", "max_side")`` is ``le=limits.max_side``. A declared default above the cap
    is lowered to it (pydantic does not validate defaults)."""

    bound: Literal["le", "max_length"]
    limit: str


@dataclass(frozen=True)
class DefaultFrom:
    """The field's default is ``limits.<limit>`` when that is set."""

    limit: str


def bind_limits(model: type[BaseModel], limits: ApiLimits) -> type[BaseModel]:
    """A subclass of ``model`` whose :class:`Cap` fields (in nested models, unions and list
    items too) carry ``limits``; the subclass keeps the name, docs and methods."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if not _has_cap(info.annotation) and not any(isinstance(item, (Cap, DefaultFrom)) for item in info.metadata):
            continue
        default = info.default
        for item in info.metadata:
            if isinstance(item, DefaultFrom) and getattr(limits, item.limit) is not None:
                default = getattr(limits, item.limit)
            if isinstance(item, Cap) and item.bound == "le" and isinstance(default, (int, float)):
                default = min(default, getattr(limits, item.limit))
        metadata = [_bound(item, limits) for item in info.metadata if not isinstance(item, DefaultFrom)]
        extra = {"default": default} if info.default_factory is None else {"default_factory": info.default_factory}
        annotation = _bind_type(info.annotation, limits)
        fields[name] = (Annotated[(annotation, *metadata)] if metadata else annotation,
                        Field(description=info.description, **extra))
    bound = create_model(model.__name__, __base__=model, __doc__=model.__doc__, __module__=model.__module__, **fields)
    bound.limits = limits
    return bound


def _bound(item: Any, limits: ApiLimits) -> Any:
    if not isinstance(item, Cap):
        return item
    value = getattr(limits, item.limit)
    return annotated_types.Le(value) if item.bound == "le" else annotated_types.MaxLen(value)


def _has_cap(annotation: Any) -> bool:
    if isinstance(annotation, Cap):
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return any(_has_cap(info.annotation) or any(isinstance(m, Cap) for m in info.metadata)
                   for info in annotation.model_fields.values())
    return any(_has_cap(arg) for arg in get_args(annotation))


def _bind_type(annotation: Any, limits: ApiLimits) -> Any:
    """``annotation`` with its Caps filled in: through Annotated, unions, list items and nested models."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *metadata = get_args(annotation)
        return Annotated[(_bind_type(base, limits), *(_bound(item, limits) for item in metadata))]
    if origin is list:
        return list[_bind_type(get_args(annotation)[0], limits)]
    if origin in (Union, UnionType):
        return Union[tuple(_bind_type(arg, limits) for arg in get_args(annotation))]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and _has_cap(annotation):
        return bind_limits(annotation, limits)
    return annotation


# -- request bodies -------------------------------------------------------------------------

Side = Annotated[int, Field(ge=64, multiple_of=64, description="Pixels, a multiple of 64."), Cap("le", "max_side")]
OptionalSide = Annotated[
    int | None,
    Field(ge=64, multiple_of=64, description="Pixels, a multiple of 64; default: the input image's, rounded to a multiple of 64."),
    Cap("le", "max_side"),
]
Guidance = Annotated[float, Field(ge=0.0), Cap("le", "max_guidance_scale")]
Text = Annotated[str, Cap("max_length", "max_prompt_chars")]
Prompt = Annotated[str, Field(min_length=1, description="What to draw."), Cap("max_length", "max_prompt_chars")]
Strength = Annotated[float, Field(gt=0.0, le=1.0)]
"""(0, 1], and strength x steps must leave at least one denoising step (as in diffusers)."""
Base64Image = Annotated[str, Cap("max_length", "max_body_bytes")]
"""Base64 PNG, JPEG or WebP; decoded (at most ``max_image_pixels``) by ``to_spec``."""


def _seeds(seed: int | None, count: int) -> tuple[int, ...]:
    """``seed + i`` for image i, or fresh random ones."""
    first = seed if seed is not None else secrets.randbelow(MAX_SEED - count + 1)
    if first + count - 1 > MAX_SEED:
        raise SpecError("seed", f"seed + num_images - 1 must be at most {MAX_SEED}")
    return tuple(first + i for i in range(count))


def _check_total(images: list[tuple[str, str]], limits: ApiLimits) -> None:
    """Several images (field, base64): their headers' total against the request's pixel budget,
    before any is decoded; :class:`SpecError` naming the image that goes over."""
    try:
        check_total(images, PixelBudget(limits.max_request_pixels))
    except TotalTooLarge as error:
        raise SpecError(error.field, str(error)) from None


class GenerationRequest(BaseModel):
    """The fields every generation mode shares."""

    model_config = ConfigDict(extra="forbid", strict=True)
    mode: ClassVar[str]
    limits: ClassVar[ApiLimits] = ApiLimits()
    _pixels: PixelBudget | None = PrivateAttr(default=None)

    negative_prompt: Text | None = Field(default=None, description="What to steer away from.")
    num_images: Annotated[int, Field(ge=1), Cap("le", "max_num_images")] = 1
    # At least 2: the prior's UnCLIPScheduler divides by (steps - 1), in diffusers' pipeline too.
    prior_steps: Annotated[int, Field(ge=2), Cap("le", "max_prior_steps")] = 25
    prior_guidance_scale: Guidance = 4.0
    steps: Annotated[int, Field(ge=1), Cap("le", "max_steps")] = 50
    guidance_scale: Guidance = 4.0
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Seed of image 0; image i uses seed + i.")
    output_format: OutputFormat = "png"
    scheduler: Literal[SCHEDULER_NAMES] = Field(  # type: ignore[valid-type]
        default="ddpm", description="The decoder's scheduler: " + ", ".join(SCHEDULER_NAMES) + " (default ddpm).")
    model: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                              description="Which model (GET /v1/models); default: the service's default model.")
    quality: Quality | None = Field(  # type: ignore[valid-type]
        default=None, description="A measured preset of steps, scheduler, prior_steps and (fast) decoder guidance, "
        "for the fields the request leaves out: fast, balanced or best (the defaults).")
    caption_check: bool = Field(
        default=False, description="Check what each image shows: the response's checks carry Florence-2's caption "
        "of it and the CLIP cosine similarity of the image to the prompt (needs the Florence-2 stage).")

    @model_validator(mode="after")
    def _apply_quality(self) -> GenerationRequest:
        """The preset's values for the fields not given; steps within the configured caps."""
        if self.quality is None:
            return self
        preset, given = QUALITY_PRESETS[self.quality], set(self.model_fields_set)
        values = {"steps": min(preset.steps, self.limits.max_steps), "scheduler": preset.scheduler,
                  "prior_steps": min(preset.prior_steps, self.limits.max_prior_steps)}
        if preset.guidance_scale is not None:
            values["guidance_scale"] = preset.guidance_scale
        for name, value in values.items():
            if name not in given:
                setattr(self, name, value)
        self.__pydantic_fields_set__ = given  # the preset's values were not the client's
        return self

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if value and not value.strip():
            raise ValueError("prompt must contain at least one non-whitespace character")
        return value

    def to_spec(self) -> GenerationSpec:
        """The spec the graph runs; raises :class:`SpecError` naming the field at fault."""
        raise NotImplementedError

    def _decode(self, field: str, data: str, mode: str = "RGB", output: tuple[int | None, int | None] = (None, None)) -> np.ndarray:
        """``output``: the requested (width, height), when known before decoding (``jpeg_draft``)."""
        if self._pixels is None:
            self._pixels = PixelBudget(self.limits.max_request_pixels)
        draft_to = output if self.limits.jpeg_draft and None not in output else None
        try:
            return decode_image(data, self.limits.max_image_pixels, mode, self._pixels, draft_to)
        except ValueError as error:
            raise SpecError(field, str(error)) from None

    def _size(self, width: int | None, height: int | None, reference: np.ndarray | None = None) -> tuple[int, int]:
        """The requested size, else the reference image's rounded to multiples of 64; within the pixel cap."""
        if reference is not None:
            width = width or size_from_image(reference.shape[1], self.limits.max_side)
            height = height or size_from_image(reference.shape[0], self.limits.max_side)
        default = min(self.limits.default_side or 512, self.limits.max_side)
        width, height = width or default, height or default
        cap = self.limits.max_output_pixels
        if width * height > cap:
            raise SpecError(
                "width", f"width x height = {width}x{height} = {width * height} pixels exceeds the limit of "
                f"{cap} pixels (max_output_pixels)"
            )
        return width, height

    @staticmethod
    def _check_strength(strength: float, steps: int, field: str) -> None:
        if int(steps * strength) < 1:
            raise SpecError(
                "strength", f"strength {strength} x {field} {steps} leaves no denoising step; raise strength or {field}"
            )

    def _spec(self, prompt: str, size: tuple[int, int], **mode_fields: Any) -> GenerationSpec:
        return GenerationSpec(
            prompt=prompt,
            negative_prompt=self.negative_prompt,
            width=size[0],
            height=size[1],
            seeds=_seeds(self.seed, self.num_images),
            prior_steps=self.prior_steps,
            prior_guidance_scale=float(self.prior_guidance_scale),
            steps=self.steps,
            guidance_scale=float(self.guidance_scale),
            output_format=self.output_format,
            mode=self.mode,
            scheduler=self.scheduler,
            caption_check=self.caption_check,
            **mode_fields,
        )


class HiresOptions(BaseModel):
    """Hires fix: generate at width x height, upscale by ``scale``, denoise again at ``strength``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    scale: Annotated[float, Field(gt=1.0, description="Output size / first-pass size; each side rounded to a multiple of 64."),
                     Cap("le", "max_hires_scale")]
    strength: Strength = Field(default=0.5, description="How much the second pass repaints: near 0 keeps the upscaled image.")
    steps: Annotated[int | None, Field(ge=1, description="The second pass's schedule (it runs strength x steps); default: steps."),
                     Cap("le", "max_steps")] = None
    upscale: Literal["pixel", "latent"] = Field(
        default="pixel", description="pixel: decode, resize (bicubic) and re-encode; latent: resize the latents (bilinear).")


class Text2ImgRequest(GenerationRequest):
    """Text to image."""

    mode: ClassVar[str] = "text2img"
    prompt: Prompt
    width: Annotated[Side, DefaultFrom("default_side")] = 512
    height: Annotated[Side, DefaultFrom("default_side")] = 512
    hires: HiresOptions | None = Field(default=None, description="Hires fix: the output is width x height times scale.")

    def to_spec(self) -> GenerationSpec:
        size = self._size(self.width, self.height)
        if self.hires is None:
            return self._spec(self.prompt, size)
        hires = self.hires
        steps = hires.steps if hires.steps is not None else self.steps
        output = tuple(64 * max(1, round(side * hires.scale / 64)) for side in size)
        cap = self.limits.max_side
        if max(output) > cap:
            raise SpecError("hires.scale", f"{size[0]}x{size[1]} x {hires.scale:g} = {output[0]}x{output[1]}: a side "
                            f"exceeds the limit of {cap} (max_side); lower hires.scale or width and height")
        if output[0] * output[1] > self.limits.max_output_pixels:
            raise SpecError("hires.scale", f"{size[0]}x{size[1]} x {hires.scale:g} = {output[0]}x{output[1]} = "
                            f"{output[0] * output[1]} pixels exceeds the limit of {self.limits.max_output_pixels} "
                            "pixels (max_output_pixels)")
        if int(steps * hires.strength) < 1:
            raise SpecError("hires.strength", f"hires.strength {hires.strength} x {steps} steps leaves no denoising "
                            "step; raise hires.strength or hires.steps")
        return self._spec(self.prompt, output, hires=Hires(*size, float(hires.strength), steps, hires.upscale))


class Img2ImgRequest(GenerationRequest):
    """Image to image: the input image, re-noised by strength and denoised toward the prompt."""

    mode: ClassVar[str] = "img2img"
    image: Base64Image = Field(description="The input image (base64 PNG, JPEG or WebP).")
    prompt: Prompt
    strength: Strength = Field(default=0.3, description="Near 0 keeps the input, 1 ignores it; strength x steps must be at least 1.")
    width: OptionalSide = None
    height: OptionalSide = None

    def to_spec(self) -> GenerationSpec:
        image = self._decode("image", self.image, output=(self.width, self.height))
        size = self._size(self.width, self.height, image)
        self._check_strength(self.strength, self.steps, "steps")
        # The MOVQ stage's preprocessing resizes it so (diffusers' VaeImageProcessor: bicubic, reducing_gap 1).
        return self._spec(self.prompt, size, image=fit_to_output(image, *size, reducing_gap=1),
                          strength=float(self.strength))


class InpaintRequest(GenerationRequest):
    """Inpainting: repaint where the mask is white, keep where it is black (the diffusers >= 0.19 convention)."""

    mode: ClassVar[str] = "inpaint"
    image: Base64Image = Field(description="The image to edit (base64 PNG, JPEG or WebP).")
    mask: Base64Image = Field(description="Same size as image: white = repaint, black = keep.")
    prompt: Prompt
    invert_mask: bool = Field(default=False, description="For masks where black = repaint.")
    mask_blur: Annotated[float, Field(ge=0.0, le=64.0)] = Field(
        default=0.0, description="Feather the result into the original by this many pixels; 0 = exactly diffusers' result.")
    width: OptionalSide = None
    height: OptionalSide = None

    def to_spec(self) -> GenerationSpec:
        # No JPEG draft here: the image and its mask must keep the same size.
        image = self._decode("image", self.image)
        mask = self._decode("mask", self.mask, "L")
        if mask.shape != image.shape[:2]:
            raise SpecError(
                "mask", f"mask is {mask.shape[1]}x{mask.shape[0]} but image is {image.shape[1]}x{image.shape[0]}; "
                "they must be the same size"
            )
        size = self._size(self.width, self.height, image)
        return self._spec(self.prompt, size, image=image, mask=255 - mask if self.invert_mask else mask,
                          mask_blur=float(self.mask_blur))


class MixSource(BaseModel):
    """One item of a mix: exactly one of text or image."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: Text | None = None
    image: Base64Image | None = Field(default=None, description="An image to mix (base64 PNG, JPEG or WebP).")

    @model_validator(mode="after")
    def _one_source(self) -> MixSource:
        if (self.text is None) == (self.image is None):
            raise ValueError("each item needs exactly one of text or image")
        return self


class MixRequest(GenerationRequest):
    """Image mixing: the weighted sum of the items' CLIP image embeddings, decoded."""

    mode: ClassVar[str] = "mix"
    items: Annotated[list[MixSource], Field(min_length=1), Cap("max_length", "max_mix_items")]
    weights: Annotated[list[Annotated[float, Field(ge=-10.0, le=10.0)]], Field(min_length=1),
                       Cap("max_length", "max_mix_items")] = Field(description="One weight per item, in order.")
    width: Annotated[Side, DefaultFrom("default_side")] = 512
    height: Annotated[Side, DefaultFrom("default_side")] = 512

    def to_spec(self) -> GenerationSpec:
        if len(self.weights) != len(self.items):
            raise SpecError("weights", f"one weight per item: {len(self.items)} items but {len(self.weights)} weights")
        _check_total([(f"items.{i}.image", item.image) for i, item in enumerate(self.items) if item.image is not None],
                     self.limits)
        mix = tuple(
            MixItem(float(weight), item.text,
                    None if item.image is None else self._decode(f"items.{index}.image", item.image))
            for index, (item, weight) in enumerate(zip(self.items, self.weights))
        )
        return self._spec("", self._size(self.width, self.height), mix=mix)


class VariationsRequest(GenerationRequest):
    """New images near the input image's CLIP embedding (emb2emb prior)."""

    mode: ClassVar[str] = "variations"
    image: Base64Image = Field(description="The input image (base64 PNG, JPEG or WebP).")
    prompt: Text = Field(default="", description="Optional text to steer the variations.")
    strength: Strength = Field(default=0.3, description="How far from the image's embedding: near 0 keeps it, 1 ignores it; strength x prior_steps must be at least 1.")
    width: OptionalSide = None
    height: OptionalSide = None

    def to_spec(self) -> GenerationSpec:
        image = self._decode("image", self.image)
        size = self._size(self.width, self.height, image)
        self._check_strength(self.strength, self.prior_steps, "prior_steps")
        return self._spec(self.prompt, size, image=image, strength=float(self.strength))


class ControlnetRequest(GenerationRequest):
    """ControlNet depth: a depth-map hint, and optionally an input image."""

    mode: ClassVar[str] = "controlnet"
    hint: Base64Image = Field(description="The depth map (grayscale or RGB); resized to the output size.")
    prompt: Prompt
    image: Base64Image | None = Field(default=None, description="Optional input image for ControlNet image-to-image.")
    strength: Strength = Field(default=0.3, description="With an input image: near 0 keeps it, 1 ignores it; strength x steps must be at least 1.")
    width: OptionalSide = None
    height: OptionalSide = None

    def to_spec(self) -> GenerationSpec:
        output = (self.width, self.height)
        hint = self._decode("hint", self.hint, output=output)
        image = None if self.image is None else self._decode("image", self.image, output=output)
        size = self._size(self.width, self.height, hint)
        hint = fit_to_output(hint, *size)  # as the denoiser resizes it (bicubic)
        if image is None:
            return self._spec(self.prompt, size, hint=hint)
        self._check_strength(self.strength, self.steps, "steps")
        return self._spec(self.prompt, size, hint=hint, image=fit_to_output(image, *size, reducing_gap=1),
                          strength=float(self.strength))


REQUEST_MODELS: dict[str, type[GenerationRequest]] = {
    model.mode: model
    for model in (Text2ImgRequest, Img2ImgRequest, InpaintRequest, MixRequest, VariationsRequest, ControlnetRequest)
}


def request_models(limits: ApiLimits) -> dict[str, type[GenerationRequest]]:
    """Per mode, the request body model bound to ``limits``."""
    return {mode: bind_limits(model, limits) for mode, model in REQUEST_MODELS.items()}


class EmbeddingsRequest(BaseModel):
    """The ``POST /v1/embeddings`` body."""

    model_config = ConfigDict(extra="forbid", strict=True)
    limits: ClassVar[ApiLimits] = ApiLimits()
    texts: Annotated[list[Text], Cap("max_length", "max_embedding_items")] = []
    images: Annotated[list[Base64Image], Cap("max_length", "max_embedding_items")] = []

    @model_validator(mode="after")
    def _some_and_not_too_many(self) -> EmbeddingsRequest:
        if not self.texts and not self.images:
            raise ValueError("give at least one text or image")
        cap = self.limits.max_embedding_items
        if len(self.texts) + len(self.images) > cap:
            raise ValueError(f"at most {cap} texts and images together, got {len(self.texts) + len(self.images)}")
        return self

    def decoded_images(self) -> list[np.ndarray]:
        """The images, decoded; raises :class:`SpecError` naming the one at fault."""
        out = []
        _check_total([(f"images.{index}", data) for index, data in enumerate(self.images)], self.limits)
        budget = PixelBudget(self.limits.max_request_pixels)
        for index, data in enumerate(self.images):
            try:
                out.append(decode_image(data, self.limits.max_image_pixels, budget=budget))
            except ValueError as error:
                raise SpecError(f"images.{index}", str(error)) from None
        return out


class StageTimingOut(BaseModel):
    queue_ms: float
    compute_ms: float
    batch_size: int


class CaptionCheckOut(BaseModel):
    caption: str = Field(description="Florence-2's brief caption of the image.")
    clip_similarity: float | None = Field(
        description="Cosine similarity of the image's and the prompt's CLIP embeddings; null in mix mode (no single prompt).")


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
    checks: list[CaptionCheckOut] | None = Field(
        default=None, description="With caption_check: one per image, in image order.")


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
