"""Image understanding routes: ``/v1/caption``, ``/v1/detect``, ``/v1/ground``, ``/v1/ocr``
(Florence-2) and ``/v1/grounded-caption`` (Kosmos-2).

Each body is validated and its image decoded (the same caps as img2img) before any model
runs; a route whose stage is not deployed answers 404 ``mode_not_configured``.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, ClassVar, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from deployments.messages import CAPTION_TASK, UnderstandingAnswer
from serve.http.errors import ApiError, from_backend
from serve.http.images import PixelBudget, decode_image
from serve.http.schemas import Base64Image, ErrorResponse, SpecError, StageTimingOut, Text, bind_limits
from serve.http.timing import server_timing
from serve.settings import ApiLimits

Understand = Callable[[str, np.ndarray, str, "str | None", str], Awaitable[UnderstandingAnswer]]
"""``(route, image, task, text, request_id) -> answer and timings``: the backend's ``understand``."""

DETAIL_TASKS = {"brief": CAPTION_TASK, "detailed": "<DETAILED_CAPTION>", "more_detailed": "<MORE_DETAILED_CAPTION>"}
Box = list[float]


class _ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    limits: ClassVar[ApiLimits] = ApiLimits()
    image: Base64Image = Field(description="Base64 PNG, JPEG or WebP.")

    def decoded_image(self) -> np.ndarray:
        """The image as (H, W, 3) uint8; :class:`SpecError` naming ``image`` when refused."""
        try:
            return decode_image(self.image, self.limits.max_image_pixels, budget=PixelBudget(self.limits.max_request_pixels))
        except ValueError as error:
            raise SpecError("image", str(error)) from None


class CaptionRequest(_ImageRequest):
    """Describe an image (Florence-2)."""

    detail: Literal["brief", "detailed", "more_detailed"] = "brief"


class DetectRequest(_ImageRequest):
    """Find objects: labels and boxes in the image's pixels (Florence-2)."""


class GroundRequest(_ImageRequest):
    """Boxes of the regions a phrase describes (Florence-2)."""

    phrase: Text = Field(min_length=1)


class OcrRequest(_ImageRequest):
    """Read the text in an image; with ``regions``, each line with its quadrilateral (Florence-2)."""

    regions: bool = False


class GroundedCaptionRequest(_ImageRequest):
    """A caption whose phrases are linked to boxes (Kosmos-2)."""

    prompt: Text | None = Field(default=None, min_length=1, description="The text the caption continues "
                                "(default ``<grounding>An image of``).")


class Detection(BaseModel):
    label: str
    box: Box = Field(description="[x1, y1, x2, y2] in the input image's pixels.")


class TextRegion(BaseModel):
    text: str
    quad: list[float] = Field(description="[x1, y1, ..., x4, y4] in the input image's pixels.")


class Entity(BaseModel):
    phrase: str
    span: list[int] = Field(description="[start, end) of the phrase in ``text``.")
    boxes: list[Box]


class _Answer(BaseModel):
    request_id: str | None = None
    timings: dict[str, StageTimingOut] = Field(
        default_factory=dict, description="Per stage: queue wait, compute time (ms), batch size.")


class CaptionResponse(_Answer):
    text: str


class DetectResponse(_Answer):
    objects: list[Detection]


class GroundResponse(_Answer):
    boxes: list[Box]


class OcrResponse(_Answer):
    text: str
    regions: list[TextRegion] | None = None


class GroundedCaptionResponse(_Answer):
    text: str
    entities: list[Entity]


def _detections(answer: dict) -> list[Detection]:
    return [Detection(label=label, box=box) for label, box in zip(answer.get("labels", []), answer.get("bboxes", []))]


# route -> (request model, (body -> (task, text, field the text came from)), (answer -> response fields), response)
# The stage serving a route is the registry's (deployments.registry.understanding_stage).
ROUTES: dict[str, tuple[type[_ImageRequest], Callable[[Any], tuple[str, str | None, str]], Callable[[dict], dict], type[BaseModel]]] = {
    "caption": (CaptionRequest, lambda b: (DETAIL_TASKS[b.detail], None, "detail"),
                lambda a: {"text": a.get("text", "")}, CaptionResponse),
    "detect": (DetectRequest, lambda b: ("<OD>", None, "image"),
               lambda a: {"objects": _detections(a)}, DetectResponse),
    "ground": (GroundRequest, lambda b: ("<CAPTION_TO_PHRASE_GROUNDING>", b.phrase, "phrase"),
               lambda a: {"boxes": a.get("bboxes", [])}, GroundResponse),
    "ocr": (OcrRequest, lambda b: ("<OCR_WITH_REGION>" if b.regions else "<OCR>", None, "image"),
            lambda a: {"text": a["text"]} if "text" in a else {
                "text": "\n".join(a.get("labels", [])),
                "regions": [TextRegion(text=t, quad=q) for t, q in zip(a.get("labels", []), a.get("quad_boxes", []))]},
            OcrResponse),
    "grounded-caption": (GroundedCaptionRequest, lambda b: ("", b.prompt, "prompt"),
                         lambda a: {"text": a["text"], "entities": a["entities"]}, GroundedCaptionResponse),
}


def add_understanding_routes(router: APIRouter, limits: ApiLimits, understand: Understand, unavailable: dict[str, str],
                             decode: Any, slot: Any) -> None:
    """One route per entry of :data:`ROUTES`; 404 ``mode_not_configured`` for those in ``unavailable``."""
    errors = {status: {"model": ErrorResponse} for status in (401, 403, 413, 422, 429, 500, 503, 504)}
    for mode, (model, task_of, shape, response_model) in ROUTES.items():
        if mode in unavailable:
            _add_not_configured(router, mode, unavailable[mode], model.__doc__)
            continue
        _add_route(router, mode, bind_limits(model, limits), task_of, shape, response_model, understand,
                   decode, slot, errors)


def _add_not_configured(router: APIRouter, mode: str, reason: str, summary: str | None) -> None:
    @router.post(f"/v1/{mode}", status_code=404, responses={404: {"model": ErrorResponse}}, summary=summary)
    async def not_configured() -> None:
        raise ApiError(404, "mode_not_configured", reason, reason="mode_not_configured")


def _add_route(router, mode, model, task_of, shape, response_model, understand, decode, slot, errors) -> None:
    async def route(body: model, request: Request, response: Response):  # type: ignore[valid-type]
        request_id = request.state.request_id
        image = await decode.run(body.decoded_image)
        task, text, field = task_of(body)
        started = time.perf_counter()
        try:
            result = await from_backend(_refusals(understand(mode, image, task, text, request_id)),
                                        request_id)
        except _Refused as error:
            raise SpecError(field, str(error)) from None
        response.headers["Server-Timing"] = server_timing(result, (time.perf_counter() - started) * 1000.0)
        timings = {stage: vars(timing) for stage, timing in result.timings.items()}
        return response_model(**shape(result.answer), request_id=request_id, timings=timings)

    # The body model is made here (bound to the limits): give FastAPI the class, not a name to resolve.
    route.__annotations__ = {"body": model, "request": Request, "response": Response}
    router.post(f"/v1/{mode}", response_model=response_model, responses=errors, summary=model.__doc__,
                dependencies=[Depends(slot)])(route)


class _Refused(ApiError):
    """A model's refusal of one request's input (e.g. a phrase too long for its positions): a 422."""

    def __init__(self, message: str) -> None:
        super().__init__(422, "invalid_request", message)


async def _refusals(call: Awaitable[UnderstandingAnswer]) -> UnderstandingAnswer:
    try:
        return await call
    except ValueError as error:  # through Ray: a RayTaskError that is also its cause's type
        raise _Refused(str(getattr(error, "cause", None) or error)) from None
