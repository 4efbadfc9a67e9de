"""``/v1/jobs``: asynchronous generation over HTTP, without Ray.

:func:`add_job_routes` adds the routes to the app :func:`serve.http.app.create_app` builds;
they validate with the same request models as the synchronous endpoints and hand
jobs to a :class:`serve.jobs.JobRunner`.

* ``POST /v1/jobs`` ``{"mode", "params", "preview_every"}`` -> 202, the job and its URLs;
* ``GET /v1/jobs/{id}`` -> state, stage, step i of n, progress, ETA, timings, image URLs;
* ``GET /v1/jobs/{id}/images/{i}`` -> the raw image;
* ``GET /v1/jobs/{id}/events`` -> Server-Sent Events, ending with the terminal event;
* ``DELETE /v1/jobs/{id}`` -> cancel (409 once finished).
"""

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.jobs.runner import JobRunner, Submission
from deployments.registry import MODES
from serve.http.schemas import ErrorResponse, SpecError
from serve.settings import ApiLimits

logger = logging.getLogger("kandinsky_serve.api")

SSE_KEEPALIVE_S = 15.0
"""A comment line goes out this often on an idle event stream, so proxies keep it open."""
STORE_UNAVAILABLE = "the job store is unavailable; retry shortly"


def error_response(status: int, kind: str, message: str, request_id: str | None,
                   details: list[dict] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse.model_validate(
        {"error": {"type": kind, "message": message, "details": details or []}, "request_id": request_id}
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def validation_error(error: ValidationError, prefix: str, request_id: str | None) -> JSONResponse:
    details = [
        {"field": ".".join(str(part) for part in (prefix, *item["loc"]) if part != ""), "message": item["msg"]}
        for item in error.errors()
    ]
    return error_response(422, "validation_error", "; ".join(f"{d['field']}: {d['message']}" for d in details),
                          request_id, details)


def client_key(request: Request) -> str:
    """Who a job belongs to, for the per-client cap: the bearer token (hashed) if one is
    sent, else the peer address. Forwarded-for headers are not trusted (a client could
    name itself anyone)."""
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer ") and authorization[7:].strip():
        return "key:" + hashlib.sha256(authorization[7:].strip().encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "unknown")


JOB_SUBMIT_PATH = "/v1/jobs"


def limit_response(found: dict, request_id: str | None) -> JSONResponse:
    """429 for a job cap, with Retry-After."""
    retry = str(int(found["retry_after_s"]))
    return error_response(429, "too_many_jobs", found["limit"], request_id, headers={"Retry-After": retry})


def build_spec(models: dict, mode: str, params: Any, prefix: str, request_id: str | None):
    """A spec from a mode's params, or the 422 response that says why not."""
    try:
        body = models[mode].model_validate(params)
    except ValidationError as error:
        return None, validation_error(error, prefix, request_id)
    try:
        return body.to_spec(), None
    except SpecError as error:
        field = f"{prefix}.{error.field}" if prefix else error.field
        return None, error_response(422, "validation_error", f"{field}: {error.message}", request_id,
                                    [{"field": field, "message": error.message}])


def job_request_model(limits: ApiLimits) -> type[BaseModel]:
    class JobRequest(BaseModel):
        """A job: a mode and the body its synchronous endpoint takes."""

        model_config = ConfigDict(extra="forbid", strict=True)
        mode: Literal[MODES]  # type: ignore[valid-type]
        params: dict[str, Any] = Field(description="Exactly the body of POST /v1/{mode}.")
        preview_every: int = Field(
            default=0, ge=0, le=limits.max_steps,
            description="Send a low-resolution preview of image 0 every this many denoising steps "
                        "(an SSE 'preview' event); 0: none.",
        )

    return JobRequest


class JobImageOut(BaseModel):
    index: int
    url: str
    media_type: str | None
    seed: int


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


def sse_event(event: dict) -> str:
    return f"id: {event['seq']}\nevent: {event['event']}\ndata: {json.dumps(event['data'], separators=(',', ':'))}\n\n"


def add_job_routes(app: FastAPI, limits: ApiLimits, models: dict, jobs: JobRunner,
                   unavailable: dict[str, str], metrics: Any) -> None:
    """Register ``/v1/jobs`` on ``app``."""
    JobRequest = job_request_model(limits)
    store = jobs.store
    errors = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
              429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}

    async def guarded(request: Request, call):
        try:
            return await call
        except Exception:
            logger.exception("job store call failed")
            return error_response(503, "job_store_unavailable", STORE_UNAVAILABLE, request.state.request_id,
                                  headers={"Retry-After": "1"})

    @app.post(JOB_SUBMIT_PATH, status_code=202, response_model=JobOut, responses=errors,
              summary="Submit a generation job; poll it, stream its events, or cancel it.")
    async def submit_job(body: JobRequest, request: Request):  # type: ignore[valid-type]
        request_id = request.state.request_id
        if body.mode in unavailable:
            metrics.rejection("mode_not_configured")
            return error_response(404, "mode_not_configured", unavailable[body.mode], request_id)
        spec, problem = build_spec(models, body.mode, body.params, "params", request_id)
        if problem is not None:
            metrics.rejection("validation")
            return problem
        submission = Submission(spec, body.mode, client_key(request), "jobs", body.preview_every)
        view = await guarded(request, jobs.submit(submission))
        if isinstance(view, Response):
            return view
        if "limit" in view:
            metrics.rejection("too_many_jobs")
            return limit_response(view, request_id)
        return JSONResponse(view, status_code=202, headers={"Location": view["urls"]["self"]})

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses=errors, summary="A job's state and progress.")
    async def get_job(job_id: str, request: Request):
        view = await guarded(request, store.view(job_id))
        if isinstance(view, Response):
            return view
        if view is None:
            return _unknown(job_id, request)
        return JSONResponse(view)

    @app.get("/v1/jobs/{job_id}/images/{index}", responses={**errors, 200: {"content": {"image/png": {}}}},
             response_class=Response, summary="One result image of a finished job, raw.")
    async def job_image(job_id: str, index: int, request: Request):
        found = await guarded(request, store.image(job_id, index))
        if isinstance(found, Response):
            return found
        if found is None:
            view = await store.view(job_id)
            if view is None:
                return _unknown(job_id, request)
            return error_response(404, "image_not_found",
                                  f"job {job_id} has {len(view['images'])} image(s) (state {view['state']}); no image {index}",
                                  request.state.request_id)
        data, media_type = found
        return Response(content=data, media_type=media_type)

    @app.get("/v1/jobs/{job_id}/events", responses={**errors, 200: {"content": {"text/event-stream": {}}}},
             response_class=StreamingResponse,
             summary="Server-Sent Events: state changes, per-step progress and previews, ending with the terminal event.")
    async def job_events(job_id: str, request: Request):
        last = request.headers.get("last-event-id", "0")
        after = int(last) if last.isdigit() else 0
        first = await guarded(request, store.wait_events(job_id, after, 0.0))
        if isinstance(first, Response):
            return first
        if first is None:
            return _unknown(job_id, request)
        return StreamingResponse(_stream(job_id, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(job_id: str, after: int) -> AsyncIterator[str]:
        while True:
            found = await store.wait_events(job_id, after, SSE_KEEPALIVE_S)
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

    @app.delete("/v1/jobs/{job_id}", response_model=JobOut, responses={**errors, 202: {"model": JobOut}},
                summary="Cancel a job: a queued one never starts, a running one leaves its batch at the next step.")
    async def cancel_job(job_id: str, request: Request):
        found = await guarded(request, jobs.cancel(job_id))
        if isinstance(found, Response):
            return found
        outcome, view = found
        if outcome == "unknown":
            return _unknown(job_id, request)
        if outcome == "finished":
            return error_response(409, "job_finished", f"job {job_id} has already {view['state']}; nothing to cancel",
                                  request.state.request_id)
        # Stopped here: final. Running in another replica: it stops at that replica's next report.
        return JSONResponse(view, status_code=200 if view["state"] == "cancelled" else 202)

    def _unknown(job_id: str, request: Request) -> JSONResponse:
        return error_response(404, "job_not_found", f"no job {job_id} (unknown, or expired after its TTL)",
                              request.state.request_id)

