"""HTTP request/response models and the spec the ingress hands to the graph.

Request models are built from :class:`serve.settings.ApiLimits`, so the caps in
force are the ones the OpenAPI schema documents and the validator enforces.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from serve.settings import ApiLimits

MAX_SEED = 2**63 - 1
OutputFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class Text2ImgSpec:
    """A validated text-to-image request with its seeds fixed: what the graph executes."""

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


class _Text2ImgBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain at least one non-whitespace character")
        return value

    def to_spec(self) -> Text2ImgSpec:
        """Fix the seeds: ``seed + i`` for image i, or fresh random ones."""
        count = self.num_images
        first = self.seed if self.seed is not None else secrets.randbelow(MAX_SEED - count + 1)
        if first + count - 1 > MAX_SEED:
            raise ValueError(f"seed + num_images - 1 must be at most {MAX_SEED}")
        return Text2ImgSpec(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            seeds=tuple(first + i for i in range(count)),
            prior_steps=self.prior_steps,
            prior_guidance_scale=float(self.prior_guidance_scale),
            steps=self.steps,
            guidance_scale=float(self.guidance_scale),
            output_format=self.output_format,
        )


def text2img_request_model(limits: ApiLimits) -> type[_Text2ImgBase]:
    """The ``POST /v1/text2img`` body, with ``limits`` as its documented bounds."""
    side = Annotated[
        int,
        Field(ge=64, le=limits.max_side, multiple_of=64, description=f"Pixels: a multiple of 64, 64 to {limits.max_side}."),
    ]
    guidance = Annotated[float, Field(ge=0.0, le=limits.max_guidance_scale)]
    text = Annotated[str, Field(max_length=limits.max_prompt_chars)]
    return create_model(
        "Text2ImgRequest",
        __base__=_Text2ImgBase,
        prompt=(Annotated[str, Field(min_length=1, max_length=limits.max_prompt_chars, description="What to draw.")], ...),
        negative_prompt=(text | None, Field(default=None, description="What to steer away from.")),
        width=(side, 512),
        height=(side, 512),
        num_images=(Annotated[int, Field(ge=1, le=limits.max_num_images)], 1),
        prior_steps=(Annotated[int, Field(ge=1, le=limits.max_prior_steps)], 25),
        prior_guidance_scale=(guidance, 4.0),
        steps=(Annotated[int, Field(ge=1, le=limits.max_steps)], 50),
        guidance_scale=(guidance, 4.0),
        seed=(
            Annotated[int | None, Field(ge=0, le=MAX_SEED, description="Seed of image 0; image i uses seed + i.")],
            None,
        ),
        output_format=(OutputFormat, "png"),
    )


class StageTimingOut(BaseModel):
    queue_ms: float
    compute_ms: float
    batch_size: int


class Text2ImgResponse(BaseModel):
    images: list[str] = Field(description="Base64-encoded images, one per seed.")
    media_type: str
    seeds: list[int] = Field(description="The seed of each image; resend one to reproduce that image.")
    width: int
    height: int
    timings: dict[str, StageTimingOut] = Field(description="Per stage: queue wait, compute time (ms), batch size.")
    total_ms: float
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
