"""``/v1/jobs``: asynchronous generation over HTTP, without Ray.

:func:`add_job_routes` adds the routes to the app :func:`serve.http.app.create_app` builds;
they validate with the same request models as the synchronous endpoints and hand
jobs to a :class:`serve.jobs.JobRunner`.

* ``POST /v1/jobs`` ``{"mode", "params", "preview_every", "priority", "webhook_url"}`` -> 202, the job
  and its URLs (with ``Idempotency-Key``: a retry returns the same job); mode ``sweep`` takes the
  body of ``POST /v1/sweep`` and runs its cells as one job;
* ``GET /v1/jobs/{id}`` -> state, stage, step i of n, progress, ETA, timings, image URLs;
* ``GET /v1/jobs/{id}/images/{i}`` -> the raw image;
* ``GET /v1/jobs/{id}/events`` -> Server-Sent Events, ending with the terminal event;
* ``DELETE /v1/jobs/{id}`` -> cancel (409 once finished).
"""

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.registry import MODES
from serve.http.admission import AdmissionGate
from serve.http.errors import ApiError
from serve.http.auth import ApiKey
from serve.http.catalog import ModelCatalog
from serve.http.guards import Guards
from serve.http.images import DecodePool
from serve.http.schemas import CaptionCheckOut, Cap, ErrorResponse, GenerationSpec, SpecError, bind_limits
from serve.http.sweep import SWEEP_JOB_MODE, AxisValue, SweepAxis, SweepPlan, SweepRequest, sweep_cells
from serve.jobs.runner import JobRunner, Submission
from serve.jobs.webhooks import WebhookRefused
from serve.settings import MAX_JOB_PRIORITY, ApiLimits

logger = logging.getLogger("kandinsky_serve.api")

SSE_KEEPALIVE_S = 15.0
"""A comment line goes out this often on an idle event stream, so proxies keep it open."""
STORE_UNAVAILABLE = "the job store is unavailable; retry shortly"
T = TypeVar("T")


JOB_SUBMIT_PATH = "/v1/jobs"


def job_limit_error(found: dict) -> ApiError:
    """429 for a job cap, with Retry-After."""
    return ApiError(429, "too_many_jobs", found["limit"], headers={"Retry-After": str(int(found["retry_after_s"]))},
                    reason="too_many_jobs")


def build_spec(models: dict, mode: str, params: Any, prefix: str, catalog: ModelCatalog | None = None) -> GenerationSpec:
    """The spec for a mode's params, for the model they name (``catalog``; None: the default
    family); raises the 4xx :class:`ApiError` that says why not (fields named under ``prefix``)."""
    def under(field: str) -> str:
        return ".".join(part for part in (prefix, field) if part) or "body"

    try:
        request = models[mode].model_validate(params)
        served = None if catalog is None else catalog.resolve(request.model, mode, under("model"))
        spec = request.to_spec()
    except ValidationError as error:
        raise ApiError.from_validation(error, under) from None
    except SpecError as error:
        raise ApiError.invalid(under(error.field), error.message) from None
    return spec if served is None else served.apply(spec, under("caption_check"))


async def from_store(call: Awaitable[T]) -> T:
    """A job-store call; a store that cannot answer is a 503 the client may retry."""
    try:
        return await call
    except ApiError:
        raise
    except Exception as error:
        logger.exception("job store call failed")
        raise ApiError(503, "job_store_unavailable", STORE_UNAVAILABLE, headers={"Retry-After": "1"}) from error


class HeldStream(StreamingResponse):
    """A streaming response that gives its place back however it ends (finished, client gone,
    cancelled): the release runs once, when the response itself is done."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release: Callable[[], None] | None = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


def unknown_job(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job {job_id} (unknown, expired after its TTL, or submitted by another client)")


def mode_not_configured(mode: str, unavailable: dict[str, str]) -> None:
    if mode in unavailable:
        raise ApiError(404, "mode_not_configured", unavailable[mode], reason="mode_not_configured")


class JobRequest(BaseModel):
    """A job: a mode and the body its synchronous endpoint takes."""

    model_config = ConfigDict(extra="forbid", strict=True)
    mode: Literal[(*MODES, SWEEP_JOB_MODE)]  # type: ignore[valid-type]
    params: dict[str, Any] = Field(description="Exactly the body of POST /v1/{mode} (sweep: of POST /v1/sweep).")
    preview_every: Annotated[int, Field(ge=0), Cap("le", "max_steps")] = Field(
        default=0,
        description="Send a low-resolution preview of image 0 every this many denoising steps "
                    "(an SSE 'preview' event); 0: none.",
    )
    priority: int = Field(
        default=0, ge=-MAX_JOB_PRIORITY, le=MAX_JOB_PRIORITY,
        description="Higher starts sooner among queued jobs (equal: first come, first served). Above 0 needs an "
                    "API key allowed it (its max_priority; args.jobs.max_priority for others).",
    )
    webhook_url: str | None = Field(
        default=None, max_length=8192,
        description="POSTed the job's final view when it ends (succeeded, failed or cancelled), signed with "
                    "HMAC-SHA256 (X-Kandinsky-Signature over '<X-Kandinsky-Timestamp>.<body>') and retried with "
                    "backoff. Only public addresses, unless allow-listed in args.webhooks.allowed_hosts.",
    )


IDEMPOTENCY_KEY_MAX = 255


def idempotency_key(header: str | None) -> str | None:
    """The ``Idempotency-Key`` header: absent, or 1 to 255 printable ASCII characters."""
    if header is None:
        return None
    if not (0 < len(header) <= IDEMPOTENCY_KEY_MAX and header.isascii() and header.isprintable()):
        raise ApiError.invalid("Idempotency-Key", f"1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters "
                               "(a UUID is a good key)")
    return header


def request_fingerprint(body: BaseModel) -> str:
    """What a retry under the same Idempotency-Key must repeat."""
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def allowed_priority(key: ApiKey | None, default: int) -> int:
    if key is not None and key.admin:
        return MAX_JOB_PRIORITY
    return key.max_priority if key is not None and key.max_priority is not None else default


class JobImageOut(BaseModel):
    index: int
    url: str
    media_type: str | None
    seed: int
    check: CaptionCheckOut | None = Field(default=None, description="With caption_check: its caption and CLIP similarity.")


class JobGridOut(BaseModel):
    index: int
    url: str
    media_type: str | None
    width: int
    height: int


class JobSweepCellOut(BaseModel):
    index: list[int] = Field(description="The cell's value index on each axis.")
    values: dict[str, AxisValue] = Field(description="Per swept field, this cell's value.")
    seeds: list[int]
    images: list[JobImageOut] = Field(description="Once the job has succeeded.")
    total_ms: float | None = Field(description="From the cells' start to this cell's images.")
    warnings: list[str]
    checks: list[CaptionCheckOut] | None = Field(default=None, description="With caption_check: one per image.")


class JobSweepOut(BaseModel):
    """A sweep job's cells (as ``POST /v1/sweep`` answers them, images as URLs) and grid."""

    mode: str = Field(description="The mode of its cells.")
    axes: list[SweepAxis]
    cells: list[JobSweepCellOut] = Field(description="Axis 0 varies fastest, then axis 1, then axis 2.")
    grid: JobGridOut | None = Field(description="The labelled grid, once drawn (null with grid: false).")


class JobTimingsOut(BaseModel):
    queue_s: float | None
    run_s: float | None
    stages: dict[str, dict[str, float]]


class JobOut(BaseModel):
    """A job's state (``GET /v1/jobs/{id}``; also the data of every state and progress event)."""

    id: str
    mode: str
    origin: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str | None = Field(description="encode, prior, denoise or decode while running.")
    step: int = Field(description="Step i of the current loop stage (prior or denoise).")
    steps: int = Field(description="n, the current loop stage's steps.")
    progress: float = Field(description="0 to 1; never decreases.")
    eta_s: float | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    timings: JobTimingsOut
    width: int
    height: int
    seeds: list[int]
    images: list[JobImageOut]
    error: dict[str, str] | None
    urls: dict[str, str]
    position: int | None = Field(default=None, description="While queued: how many jobs are ahead of it (0: next).")
    priority: int = Field(default=0, description="Its priority (higher starts sooner).")
    model: str | None = Field(default=None, description="The model it runs (GET /v1/models).")
    sweep: JobSweepOut | None = Field(default=None, description="Mode sweep: its axes, cells and grid; the top-level "
                                                               "seeds and images are its cells' in cell order.")


MAX_PAGE = 100


class JobPage(BaseModel):
    """``GET /v1/jobs``: a page of the caller's jobs, newest first."""

    jobs: list[JobOut]
    next: str | None = Field(description="Pass as ?before= for the next (older) page; null on the last.")


MAX_EVENT_ID_DIGITS = 18
"""Event ids are this stream's sequence numbers; no job sends 10^18 events."""


def last_event_id(header: str | None) -> int:
    """The ``Last-Event-ID`` a reconnecting client sends back: 0 when absent, else one of our ids."""
    if header is None or header == "":
        return 0
    if not (header.isascii() and header.isdigit() and len(header) <= MAX_EVENT_ID_DIGITS):
        raise ApiError.invalid("Last-Event-ID", f"an event id this stream sent: ASCII digits, at most {MAX_EVENT_ID_DIGITS}")
    return int(header)


def sse_event(event: dict) -> str:
    return f"id: {event['seq']}\nevent: {event['event']}\ndata: {json.dumps(event['data'], separators=(',', ':'))}\n\n"


def add_job_routes(router: APIRouter, limits: ApiLimits, models: dict, jobs: JobRunner,
                   unavailable: dict[str, str], guards: Guards, decode: DecodePool,
                   catalog: ModelCatalog | None = None) -> AdmissionGate:
    """Register ``/v1/jobs`` on ``router``; returns the event streams' gate (the OpenAI
    streams count in it too)."""
    job_request = bind_limits(JobRequest, limits)
    sweep_request = bind_limits(SweepRequest, limits)
    store = jobs.store
    # Streams hold an ingress place for as long as they last: their own budget, so that
    # they cannot crowd out generations, probes, reads and cancels.
    streams = AdmissionGate(jobs.settings.max_streams, per_client=jobs.settings.max_streams_per_client)
    errors = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
              429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}

    @router.post(JOB_SUBMIT_PATH, status_code=202, response_model=JobOut, responses=errors,
                 dependencies=[Depends(guards.accepting_work)],
                 summary="Submit a generation job; poll it, stream its events, or cancel it.")
    async def submit_job(body: job_request, request: Request,  # type: ignore[valid-type]
                         client: str = Depends(guards.caller), key: ApiKey | None = Depends(guards.api_key)):
        retry_key = idempotency_key(request.headers.get("idempotency-key"))
        mode_not_configured(body.mode, unavailable)
        ceiling = allowed_priority(key, jobs.settings.max_priority)
        if body.priority > ceiling:
            raise ApiError.invalid("priority", f"at most {ceiling} for this caller (an API key's max_priority, "
                                   "else args.jobs.max_priority)")
        sweep = None
        if body.mode == SWEEP_JOB_MODE:
            sweep = await sweep_plan(body.params)
            specs = sweep.specs
        else:
            specs = [await decode.run(build_spec, models, body.mode, body.params, "params", catalog)]
        if body.webhook_url is not None:
            await check_webhook(body.webhook_url)
        for spec in specs:  # a retry is a request too: it is charged like one (a sweep, like each of its cells)
            guards.admit_cost(key, spec)
        submission = Submission(specs[0], body.mode, client, "jobs", body.preview_every, body.priority,
                                body.webhook_url, retry_key, None if retry_key is None else request_fingerprint(body),
                                sweep)
        view = await from_store(jobs.submit(submission))
        if "limit" in view:
            raise job_limit_error(view)
        if "conflict" in view:
            raise ApiError(409, "idempotency_key_reused", view["conflict"],
                           [{"field": "Idempotency-Key", "message": "used before for a different request"}])
        headers = {}
        if "replayed" in view:  # the job this key made before: nothing new was started
            view, headers = view["replayed"], {"Idempotent-Replayed": "true"}
        return JSONResponse(view, status_code=202, headers={"Location": view["urls"]["self"], **headers})

    async def sweep_plan(params: dict[str, Any]) -> SweepPlan:
        """``params`` validated exactly as ``POST /v1/sweep`` validates its body; errors name ``params.<field>``."""
        def under(field: str) -> str:
            return f"params.{field}" if field else "params"

        try:
            body = sweep_request.model_validate(params)
            return SweepPlan(body, await sweep_cells(body, models, catalog, unavailable, decode))
        except ValidationError as error:
            raise ApiError.from_validation(error, under) from None
        except SpecError as error:
            raise ApiError.invalid(under(error.field), error.message) from None
        except ApiError as error:
            raise error.renamed(under) from None

    async def check_webhook(url: str) -> None:
        if jobs.webhooks is None:
            raise ApiError.invalid("webhook_url", "this service sends no webhooks (no sender configured)")
        try:
            await jobs.webhooks.check(url)
        except WebhookRefused as refused:
            raise ApiError.invalid("webhook_url", refused.message) from None

    @router.get(JOB_SUBMIT_PATH, response_model=JobPage, responses=errors,
                summary="The caller's jobs, newest first (an admin key: everyone's); page with ?before=<next>.")
    async def list_jobs(scope: str | None = Depends(guards.job_scope),
                        state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
                        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
                        before: Annotated[str | None, Query(max_length=64, description="The previous page's next.")] = None):
        page = await from_store(store.list_jobs(scope, state, limit, before))
        if page is None:
            raise ApiError(404, "cursor_not_found", f"before: no job {before!r} of yours (it may have expired); "
                           "start again without it", [{"field": "before", "message": "a job id from a page's next"}])
        return JSONResponse(page)

    @router.get("/v1/jobs/{job_id}", response_model=JobOut, responses=errors, summary="A job's state and progress.")
    async def get_job(job_id: str, scope: str | None = Depends(guards.job_scope)):
        view = await from_store(store.view(job_id, scope))
        if view is None:
            raise unknown_job(job_id)
        return JSONResponse(view)

    @router.get("/v1/jobs/{job_id}/images/{index}", responses={**errors, 200: {"content": {"image/png": {}}}},
                response_class=Response, summary="One result image of a finished job, raw.")
    async def job_image(job_id: str, index: int, scope: str | None = Depends(guards.job_scope)):
        found = await from_store(store.image(job_id, index, scope))
        if found is None:
            view = await from_store(store.view(job_id, scope))
            if view is None:
                raise unknown_job(job_id)
            raise ApiError(404, "image_not_found",
                           f"job {job_id} has {len(view['images'])} image(s) (state {view['state']}); no image {index}")
        data, media_type = found
        return Response(content=data, media_type=media_type)

    @router.get("/v1/jobs/{job_id}/events", responses={**errors, 200: {"content": {"text/event-stream": {}}}},
                response_class=StreamingResponse,
                summary="Server-Sent Events: state changes, per-step progress and previews, ending with the terminal event.")
    async def job_events(job_id: str, request: Request, scope: str | None = Depends(guards.job_scope),
                         client: str = Depends(guards.caller)):
        after = last_event_id(request.headers.get("last-event-id"))
        # The cap first: refusing a flood of streams must cost no store round trip.
        enter_stream(streams, client)
        try:
            if await from_store(store.wait_events(job_id, after, 0.0, scope)) is None:
                raise unknown_job(job_id)
        except BaseException:
            streams.leave(client=client)
            raise
        return HeldStream(_stream(job_id, after, scope), lambda: streams.leave(client=client),
                          media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(job_id: str, after: int, scope: str | None) -> AsyncIterator[str]:
        while True:
            found = await store.wait_events(job_id, after, SSE_KEEPALIVE_S, scope)
            if found is None:  # expired while streaming
                yield f"event: gone\ndata: {json.dumps({'id': job_id})}\n\n"
                return
            events, finished = found
            for event in events:
                yield sse_event(event)
                after = event["seq"]
            if finished:
                return
            if not events:
                yield ": keep-alive\n\n"

    @router.delete("/v1/jobs/{job_id}", response_model=JobOut, responses={**errors, 202: {"model": JobOut}},
                   summary="Cancel a job: a queued one never starts, a running one leaves its batch at the next step.")
    async def cancel_job(job_id: str, scope: str | None = Depends(guards.job_scope)):
        outcome, view = await from_store(jobs.cancel(job_id, client=scope))
        if outcome == "unknown":
            raise unknown_job(job_id)
        if outcome == "finished":
            raise ApiError(409, "job_finished", f"job {job_id} has already {view['state']}; nothing to cancel")
        # Stopped here: final. Running in another replica: it stops at that replica's next report.
        return JSONResponse(view, status_code=200 if view["state"] == "cancelled" else 202)

    return streams


def enter_stream(streams: AdmissionGate, client: str) -> None:
    """A place for one more event stream of ``client``, or the 429/503 that says why not."""
    refused = streams.enter(client)
    retry = {"Retry-After": str(int(SSE_KEEPALIVE_S))}
    if refused == "client_full":
        raise ApiError(429, "too_many_streams", f"this client already has {streams.per_client} event streams open "
                       "(args.jobs.max_streams_per_client); close one or poll GET /v1/jobs/{id}",
                       headers=retry, reason="too_many_streams")
    if refused is not None:
        raise ApiError(503, "too_many_streams", "this replica holds as many event streams as it may; retry, or "
                       "poll GET /v1/jobs/{id}", headers=retry, reason="too_many_streams")
