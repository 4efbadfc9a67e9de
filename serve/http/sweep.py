"""``POST /v1/sweep``: one base request run once per cell of up to three parameter axes, as
sdnext's XYZ grid.

:func:`expand` turns a body into cells, each validated exactly as ``POST /v1/{mode}`` would
validate it (an axis value at fault is named ``axes.<i>.values.<j>``, a base field
``base.<field>``), all before any model runs. :func:`run_cells` runs every cell at once
through the backend, so the loop stages batch them step by step; a failed cell fails the
sweep and cancels the rest. Cell ``i`` is at value ``i % n0`` of axis 0, ``(i // n0) % n1``
of axis 1, ``i // (n0 * n1)`` of axis 2. A sweep submitted as a job (``POST /v1/jobs`` mode
``sweep``) is a :class:`SweepPlan`, which the job runner runs through the same code.
"""

import asyncio
import base64
import io
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from itertools import product
from typing import Annotated, Any, ClassVar, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.messages import EncodedImages
from serve.http.auth import ApiKey
from serve.http.catalog import ModelCatalog
from serve.http.errors import ApiError, from_backend
from serve.http.grid import GridAxis, render_grid
from serve.http.guards import Guards
from serve.http.images import DecodePool
from serve.http.schemas import (
    REQUEST_MODELS, CaptionCheckOut, Cap, ErrorResponse, GenerationRequest, GenerationSpec, SpecError, bind_limits,
)
from serve.jobs.runner import JobFailed
from serve.settings import ApiLimits

SWEEP_PATH = "/v1/sweep"
SWEEP_JOB_MODE = "sweep"
"""``POST /v1/jobs`` with this mode takes the body of ``POST /v1/sweep`` as its params."""
SWEEP_MODES = ("text2img", "img2img")
SWEEP_FIELDS = ("seed", "steps", "guidance_scale", "scheduler", "strength", "prompt")
MAX_SWEEP_AXES = 3
"""x (columns), y (rows), z (one grid per value): what a grid can show."""
SWEEP_SEED_BOUND = 2**32
"""A sweep without a seed gets one seed below this, shared by every cell."""
MEDIA_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
COUPLED = {"strength": "steps"}
"""A field whose check also reads another (strength x steps >= 1): blamed on the other's axis when only it is swept."""

SWEEP_BASE_SCHEMAS = ("Text2ImgRequest", "Img2ImgRequest")
"""The OpenAPI components documenting ``base`` (the /v1/{mode} routes' own bodies)."""
AxisValue = int | float | str


class SweepAxis(BaseModel):
    """One axis: a field of the base request and the values it takes."""

    model_config = ConfigDict(extra="forbid", strict=True)
    field: Literal[SWEEP_FIELDS] = Field(  # type: ignore[valid-type]
        description="seed, steps, guidance_scale, scheduler, strength (img2img) or prompt (prompt variants).")
    values: Annotated[list[AxisValue], Field(min_length=1), Cap("max_length", "max_sweep_values")] = Field(
        description="Each is validated as that field of the mode's request.")


class SweepRequest(BaseModel):
    """A parameter sweep: the base request once per cell of its axes' cartesian product."""

    model_config = ConfigDict(extra="forbid", strict=True)
    limits: ClassVar[ApiLimits] = ApiLimits()
    mode: Literal[SWEEP_MODES] = "text2img"  # type: ignore[valid-type]
    base: dict[str, Any] = Field(
        description="Exactly the body of POST /v1/{mode}; each cell is it with the axes' values in place. Without "
                    "a seed (and no seed axis) every cell gets the same random seed.",
        json_schema_extra={"anyOf": [{"$ref": f"#/components/schemas/{name}"} for name in SWEEP_BASE_SCHEMAS]})
    axes: Annotated[list[SweepAxis], Field(min_length=1, max_length=MAX_SWEEP_AXES)] = Field(
        description="1 to 3 axes, each a different field: columns, rows, then one grid per value.")
    grid: bool = Field(default=True, description="Also return the labelled grid of each cell's first image.")


class SweepCellOut(BaseModel):
    index: list[int] = Field(description="The cell's value index on each axis.")
    values: dict[str, AxisValue] = Field(description="Per swept field, this cell's value.")
    images: list[str] = Field(description="Base64-encoded images, one per seed.")
    seeds: list[int]
    total_ms: float = Field(description="From the sweep's start to this cell's images.")
    warnings: list[str] = []
    checks: list[CaptionCheckOut] | None = Field(default=None, description="With caption_check: one per image.")


class SweepResponse(BaseModel):
    axes: list[SweepAxis]
    cells: list[SweepCellOut] = Field(description="Axis 0 varies fastest, then axis 1, then axis 2.")
    media_type: str
    width: int
    height: int
    grid: str | None = Field(default=None, description="Base64 grid image (the cells' output_format), axis labels in "
                                                       "its header row and column; null with grid: false.")
    grid_width: int | None = None
    grid_height: int | None = None
    total_ms: float
    request_id: str


@dataclass(frozen=True)
class Cell:
    """One validated cell: where it sits on each axis and the spec it runs."""

    index: tuple[int, ...]
    values: dict[str, AxisValue]
    spec: GenerationSpec


def _blame(field: str, cell: tuple[int, ...], swept: dict[str, int]) -> str:
    """The sweep's name for a cell's ``field`` (dotted path inside the cell's request)."""
    head, _, rest = field.partition(".")
    if head not in swept and COUPLED.get(head) in swept:
        head, rest = COUPLED[head], ""
    if head in swept:
        axis = swept[head]
        return ".".join(part for part in (f"axes.{axis}.values.{cell[axis]}", rest) if part)
    return f"base.{field}" if field != "body" else "base"


def _record(details: list[dict], field: str, message: str) -> None:
    if not any(d["field"] == field and d["message"] == message for d in details):
        details.append({"field": field, "message": message})


def check_axes(body: SweepRequest, model: type[GenerationRequest]) -> int:
    """The number of cells; :class:`SpecError` for an axis the mode lacks, a repeated field, or too many cells."""
    seen: dict[str, int] = {}
    for index, axis in enumerate(body.axes):
        if axis.field in seen:
            raise SpecError(f"axes.{index}.field", f"{axis.field} is swept by axes.{seen[axis.field]} already; "
                            "one axis per field")
        if axis.field not in model.model_fields:
            with_it = [mode for mode in SWEEP_MODES if axis.field in REQUEST_MODELS[mode].model_fields]
            raise SpecError(f"axes.{index}.field", f"{body.mode} has no {axis.field}; sweep it with mode "
                            f"{' or '.join(with_it)}")
        seen[axis.field] = index
    counts = [len(axis.values) for axis in body.axes]
    cells = math.prod(counts)
    cap = body.limits.max_sweep_cells
    if cells > cap:
        raise SpecError("axes", f"{' x '.join(map(str, counts))} = {cells} cells exceeds the limit of {cap} cells "
                        "(max_sweep_cells)")
    return cells


def expand(body: SweepRequest, model: type[GenerationRequest]) -> list[Cell]:
    """The sweep's cells, each validated as a request of ``model`` (the mode's bound model) and
    turned into its spec; :class:`ApiError` (422) naming every field at fault."""
    check_axes(body, model)
    swept = {axis.field: index for index, axis in enumerate(body.axes)}
    base = dict(body.base)
    if "seed" not in swept and base.get("seed") is None:
        base["seed"] = secrets.randbelow(SWEEP_SEED_BOUND)  # one seed for every cell: they differ only on the axes
    details: list[dict] = []
    requests = []
    # Axis 0 varies fastest: product() varies its last factor fastest, so the axes go in reversed.
    for reversed_index in product(*(range(len(axis.values)) for axis in reversed(body.axes))):
        cell = tuple(reversed(reversed_index))
        values = {axis.field: axis.values[cell[i]] for i, axis in enumerate(body.axes)}
        try:
            requests.append((cell, values, model.model_validate({**base, **values})))
        except ValidationError as error:
            for item in error.errors():
                _record(details, _blame(".".join(str(part) for part in item["loc"]) or "body", cell, swept), item["msg"])
    if details:
        raise ApiError.from_details(details)
    limits = body.limits
    num_images = requests[0][2].num_images  # the base's: no axis sets it
    if len(requests) * num_images > limits.max_sweep_images:
        raise SpecError("base.num_images", f"{len(requests)} cells x num_images {num_images} = "
                        f"{len(requests) * num_images} images exceeds the limit of {limits.max_sweep_images} "
                        "images per sweep (max_sweep_images)")
    cells = []
    for cell, values, request in requests:
        try:
            cells.append(Cell(cell, values, request.to_spec()))
        except SpecError as error:
            _record(details, _blame(error.field, cell, swept), error.message)
    if details:
        raise ApiError.from_details(details)
    return cells


async def sweep_cells(body: SweepRequest, models: dict[str, type[GenerationRequest]], catalog: ModelCatalog | None,
                      unavailable: dict[str, str], decode: DecodePool) -> list[Cell]:
    """:func:`expand` for the model ``base`` names (``catalog``; None: the default family); the
    404 or 422 that says why not."""
    if body.mode in unavailable:
        raise ApiError(404, "mode_not_configured", unavailable[body.mode], reason="mode_not_configured")
    cells = await decode.run(expand, body, models[body.mode])
    if catalog is None:
        return cells
    served = catalog.resolve(body.base.get("model"), body.mode, "base.model")
    return [replace(cell, spec=served.apply(cell.spec, "base.caption_check")) for cell in cells]


async def run_cells(cells: Sequence[Cell], generate: Callable[[int, GenerationSpec], Awaitable[EncodedImages]],
                    on_done: Callable[[Cell, float], None] = lambda cell, seconds: None) -> list[EncodedImages]:
    """Every cell at once, ``generate(number, spec)`` each. The first to fail fails the sweep,
    naming its cell; the others are cancelled (each stage drops their work), so nothing runs
    for an answer nobody gets."""
    started = time.perf_counter()

    async def one(number: int, cell: Cell) -> EncodedImages:
        result = await generate(number, cell.spec)
        on_done(cell, time.perf_counter() - started)
        return result

    tasks = [asyncio.ensure_future(one(number, cell)) for number, cell in enumerate(cells)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for number, task in enumerate(tasks):
            if task.done() and not task.cancelled() and task.exception() is not None:
                error = task.exception()
                if isinstance(error, ApiError) and error.status >= 500:
                    where = ", ".join(f"{field} {value!r}" for field, value in cells[number].values.items())
                    raise ApiError(error.status, error.kind, f"cell {number} ({where}): {error.message}",
                                   [{"field": f"cells.{number}", "message": error.message}], error.headers,
                                   error.reason) from error
                raise error
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def grid_image(results: Sequence[EncodedImages], body: SweepRequest, output_format: str) -> tuple[bytes, int, int]:
    """The labelled grid of each cell's first image, encoded as the cells are."""
    from PIL import Image

    tiles = [Image.open(io.BytesIO(result.images[0])) for result in results]
    axes = [GridAxis(axis.field, tuple(str(value) for value in axis.values)) for axis in body.axes]
    grid = render_grid(tiles, axes)
    buffer = io.BytesIO()
    grid.save(buffer, format=MEDIA_FORMATS[output_format])
    return buffer.getvalue(), grid.width, grid.height


@dataclass(frozen=True)
class SweepOutcome:
    """A sweep job's result as the job store keeps it."""

    images: list[bytes]
    """Every cell's images in cell order, then the grid's (if drawn)."""
    media_type: str
    seeds: list[int]
    """The cells' images' seeds, in the same order."""
    record: dict
    """:meth:`SweepPlan.record` with the results."""


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep submitted as a job; the job runner runs it (``serve.jobs.runner.SweepWork``)."""

    body: SweepRequest
    cells: list[Cell]

    @property
    def specs(self) -> list[GenerationSpec]:
        return [cell.spec for cell in self.cells]

    def record(self, results: Sequence[EncodedImages] = (), finished_ms: dict[tuple[int, ...], float] | None = None,
               grid: tuple[int, int] | None = None) -> dict:
        """What the job store keeps of it (JSON, ``serve.jobs.store.Job.sweep``): before it runs,
        the cells' values and seeds; after, also their times, warnings and the grid's size."""
        cells = []
        for number, cell in enumerate(self.cells):
            result = results[number] if results else None
            cells.append({
                "index": list(cell.index), "values": cell.values,
                "seeds": list(cell.spec.seeds if result is None else result.seeds),
                "total_ms": None if finished_ms is None else round(finished_ms[cell.index], 2),
                "warnings": [] if result is None else list(getattr(result, "notes", ())),
                "checks": None if result is None else result.checks_json(),
            })
        return {"mode": self.body.mode, "axes": [axis.model_dump() for axis in self.body.axes], "cells": cells,
                "grid": None if grid is None else {"width": grid[0], "height": grid[1]}}

    async def run(self, generate: Callable[[int, GenerationSpec], Awaitable[EncodedImages]]) -> SweepOutcome:
        """:func:`run_cells`, then the grid; a failed cell is a :class:`JobFailed` naming it."""
        finished: dict[tuple[int, ...], float] = {}

        async def cell(number: int, spec: GenerationSpec) -> EncodedImages:
            try:
                return await generate(number, spec)
            except Exception as error:  # named by run_cells; only its type reaches the client
                raise ApiError(500, "generation_failed", f"generation failed: {type(error).__name__}") from error

        def done(cell: Cell, seconds: float) -> None:
            finished[cell.index] = seconds * 1000.0

        try:
            results = await run_cells(self.cells, cell, done)
        except ApiError as error:
            raise JobFailed(error.kind, error.message) from error
        images = [image for result in results for image in result.images]
        grid = None
        if self.body.grid:
            data, width, height = await asyncio.to_thread(
                grid_image, results, self.body, self.cells[0].spec.output_format)
            images.append(data)
            grid = (width, height)
        return SweepOutcome(images, results[0].media_type, [seed for result in results for seed in result.seeds],
                            self.record(results, finished, grid))


def add_sweep_route(router: APIRouter, limits: ApiLimits, models: dict[str, type[GenerationRequest]],
                    generate: Callable[[GenerationSpec, str, float], Awaitable[EncodedImages]], guards: Guards,
                    decode: DecodePool, catalog: ModelCatalog, unavailable: dict[str, str], metrics: Any) -> None:
    """Register ``POST /v1/sweep`` on ``router``. ``generate(spec, request_id, timeout_s)``: one
    request through the graph (the caller draws each call's internal id)."""
    sweep_request = bind_limits(SweepRequest, limits)
    errors = {status: {"model": ErrorResponse} for status in (401, 403, 404, 413, 422, 429, 500, 503, 504)}

    @router.post(SWEEP_PATH, response_model=SweepResponse, responses=errors,
                 dependencies=[Depends(guards.generation_slot)],
                 summary="A parameter sweep (XYZ grid): the base request once per cell of up to 3 axes, all cells "
                         "batched together, with a labelled grid.")
    async def sweep(body: sweep_request, request: Request, response: Response,  # type: ignore[valid-type]
                    key: ApiKey | None = Depends(guards.api_key),
                    timeout_s: float = Depends(guards.deadline)) -> SweepResponse:
        request_id = request.state.request_id
        cells = await sweep_cells(body, models, catalog, unavailable, decode)
        for cell in cells:  # each cell costs what the same request would
            guards.admit_cost(key, cell.spec)
        started = time.perf_counter()
        finished: dict[tuple[int, ...], float] = {}

        def done(cell: Cell, seconds: float) -> None:
            finished[cell.index] = seconds * 1000.0
            metrics.generation(body.mode, cell.spec.width, cell.spec.height, seconds, cell.spec.model)

        results = await run_cells(
            cells, lambda number, spec: from_backend(generate(spec, request_id, timeout_s), request_id), done)
        spec = cells[0].spec
        grid = None
        if body.grid:
            grid = await decode.run(grid_image, results, body, spec.output_format)
        total_ms = (time.perf_counter() - started) * 1000.0
        response.headers["Server-Timing"] = f"total;dur={total_ms:.2f}"
        return SweepResponse(
            axes=body.axes,
            cells=[SweepCellOut(index=list(cell.index), values=cell.values,
                                images=[base64.b64encode(image).decode("ascii") for image in result.images],
                                seeds=list(result.seeds), total_ms=finished[cell.index],
                                warnings=list(getattr(result, "notes", ())), checks=result.checks_json())
                   for cell, result in zip(cells, results)],
            media_type=results[0].media_type, width=spec.width, height=spec.height,
            grid=None if grid is None else base64.b64encode(grid[0]).decode("ascii"),
            grid_width=None if grid is None else grid[1], grid_height=None if grid is None else grid[2],
            total_ms=total_ms, request_id=request_id,
        )
