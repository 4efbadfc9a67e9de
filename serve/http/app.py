"""The HTTP API as a plain FastAPI app, independent of Ray.

:func:`create_app` takes the limits and a :class:`GenerationBackend`; the Ray
ingress passes itself, tests can pass a fake. The app validates, assigns the
request id, turns results into JSON and errors into 4xx/5xx bodies; it never
touches tensors.
"""


import base64
import logging
import re
import time
import uuid
from typing import Any, Protocol

import numpy as np

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.messages import EncodedImages
from serve.http.compat import SUBMIT_PATHS, add_compat_routes
from serve.jobs.runner import JobRunner
from serve.http.job_routes import JOB_SUBMIT_PATH, add_job_routes
from deployments.registry import MODES
from serve.http.schemas import (
    EmbeddingsResponse,
    ErrorResponse,
    GenerationSpec,
    ImagesResponse,
    SpecError,
    embeddings_request_model,
    request_models,
)
from serve.http.admission import AdmissionGate, RateLimiter, retry_after_header
from serve.errors import Overloaded, RequestTimedOut, StageUnavailable
from serve.settings import AdmissionSettings, ApiLimits, AuthSettings

logger = logging.getLogger("kandinsky_serve.api")

REQUEST_ID_HEADER = "X-Request-ID"
TIMEOUT_HEADER = "X-Request-Timeout"
"""A client's own deadline in seconds; the configured ``request_timeout_s`` is the most it can ask."""
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class GenerationBackend(Protocol):
    async def generate(self, spec: GenerationSpec, request_id: str, timeout_s: float | None = None) -> EncodedImages:
        """Run one request of any mode through the stages, within ``timeout_s`` if given
        (else the configured limit)."""
        ...

    async def embeddings(self, texts: list[str], images: list[np.ndarray], request_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(text embeddings (n, D), image embeddings (m, D)); empty arrays for empty inputs."""
        ...

    async def readiness(self) -> dict[str, str]:
        """Per stage, ``"ready"`` or the reason it is not."""
        ...

    async def metrics_text(self) -> str:
        """The product's metrics from every stage, in Prometheus text format."""
        ...


class ApiMetrics(Protocol):
    """What the HTTP layer records (``deployments.metrics.IngressMetrics`` in production)."""

    def http_request(self, route: str, status: int, request_bytes: int, response_bytes: int) -> None: ...

    def generation(self, mode: str, width: int, height: int, seconds: float) -> None: ...

    def rejection(self, reason: str) -> None: ...


class NoMetrics:
    def http_request(self, route: str, status: int, request_bytes: int, response_bytes: int) -> None:
        pass

    def generation(self, mode: str, width: int, height: int, seconds: float) -> None:
        pass

    def rejection(self, reason: str) -> None:
        pass


KNOWN_ROUTES = (*(f"/v1/{mode}" for mode in MODES), "/v1/embeddings", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")


def _app_path(scope: Scope) -> str:
    """The request path inside the app (without the route prefix it is served under)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
"""Routes that never need an API key (probes)."""


def _route_label(scope: Scope) -> str:
    """A bounded route label: the matched route's template, else a known path, else "other"."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    path = _app_path(scope)
    return path if path in KNOWN_ROUTES else "other"


def _error(
    status: int, kind: str, message: str, request_id: str | None, details: list[dict] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse.model_validate(
        {"error": {"type": kind, "message": message, "details": details or []}, "request_id": request_id}
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


OPEN_PATHS = ("/healthz", "/readyz")


def _field_name(loc: tuple) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query", "header", "path")]
    return ".".join(parts) or "body"


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, counting what is actually received."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: ApiMetrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.rejection("payload_too_large")
        self.metrics.http_request(_route_label(scope), 413, 0, 0)
        response = _error(
            413, "payload_too_large", f"request body exceeds the limit of {self.max_bytes} bytes", None,
            [{"field": "body", "message": f"at most {self.max_bytes} bytes"}],
        )
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


DESCRIPTION = """Kandinsky 2.2, served as a stage-split Ray Serve graph: text-to-image, image-to-image,
inpainting, image mixing, variations, ControlNet depth, and CLIP embeddings.

Input images (`image`, `mask`, `hint`, mix items) are base64 PNG, JPEG or WebP. Bodies over the byte
cap get 413; images over the pixel cap, decompression bombs, other formats, truncated files and
masks of a different size than their image get 422 — all before any model runs.

Inpainting masks: **white = repaint, black = keep** (the diffusers >= 0.19 convention);
`invert_mask: true` accepts the opposite convention.
"""


def server_timing(result: Any, total_ms: float) -> str:
    """The ``Server-Timing`` header (W3C; browsers' dev tools show it): the ingress's total,
    and per stage the call's round trip from the ingress, its queue wait and its compute.
    The round trip minus queue and compute is routing and transfer (``bench latency --breakdown``)."""
    entries = [f"total;dur={total_ms:.2f}"]
    for key, timing in result.timings.items():
        call = getattr(result, "call_ms", {}).get(key)
        if call is not None:
            entries.append(f"{key}-call;dur={call:.2f}")
        entries.append(f"{key}-queue;dur={timing.queue_ms:.2f}")
        entries.append(f"{key}-compute;dur={timing.compute_ms:.2f}")
    return ", ".join(entries)


def create_app(
    limits: ApiLimits,
    backend: GenerationBackend,
    echo_request_id: bool = True,
    metrics: ApiMetrics | None = None,
    unavailable: dict[str, str] | None = None,
    admission: AdmissionSettings | None = None,
    auth: AuthSettings | None = None,
    jobs: JobRunner | None = None,
) -> FastAPI:
    """Build the HTTP API on ``backend``.

    ``echo_request_id``: set the ``X-Request-ID`` response header. Behind Ray Serve's
    proxy it must be False: the proxy forwards the client's id (or one it made) to
    us and sets the response header itself.
    ``unavailable``: modes this deployment does not serve, each with what to configure;
    their routes answer 404 with that message.
    ``admission``: the in-flight bound (503 past it) and the end-to-end timeout.
    ``auth``: API keys and per-key rate limits (open when no keys file is configured).
    ``jobs``: runs ``/v1/jobs`` and the OpenAI / AUTOMATIC1111 routes; without it they are absent.
    """
    from serve.http.auth import KeyStore

    admission = admission or AdmissionSettings()
    auth = auth or AuthSettings()
    keys_file = auth.keys_file()
    keys = KeyStore(keys_file) if keys_file is not None else None
    limiter = RateLimiter(auth.requests_per_s, auth.burst_requests, auth.images_per_min)
    gate = AdmissionGate(admission.max_inflight_requests, admission.retry_after_s)
    generation_paths = {*(f"/v1/{mode}" for mode in MODES if mode not in (unavailable or {})), "/v1/embeddings"}
    # Every route that starts model work: none is admitted once the service drains.
    work_paths = generation_paths | ({JOB_SUBMIT_PATH, *SUBMIT_PATHS} if jobs is not None else set())
    models = request_models(limits)
    EmbeddingsRequest = embeddings_request_model(limits)
    unavailable = unavailable or {}
    metrics = metrics or NoMetrics()
    app = FastAPI(title="kandinsky-serve", version="0.2.0", description=DESCRIPTION)

    @app.middleware("http")
    async def guard_middleware(request: Request, call_next):
        """API key, per-key request rate, then the in-flight bound — before any model work."""
        request_id = getattr(request.state, "request_id", None)
        path = _app_path(request.scope)
        key = None
        if keys is not None and path not in OPEN_PATHS:
            scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
            challenge = {"WWW-Authenticate": "Bearer"}
            if not scheme:
                metrics.rejection("unauthenticated")
                return _error(401, "missing_api_key", "send 'Authorization: Bearer <key>'", request_id, headers=challenge)
            if scheme.lower() != "bearer" or not token.strip() or " " in token.strip():
                metrics.rejection("unauthenticated")
                return _error(401, "malformed_authorization", "the Authorization header must be 'Bearer <key>'",
                              request_id, headers=challenge)
            key = keys.lookup(token.strip())
            if key is None:
                metrics.rejection("unauthenticated")
                return _error(401, "invalid_api_key", "unknown API key", request_id, headers=challenge)
            if key.revoked:
                metrics.rejection("forbidden")
                return _error(403, "api_key_revoked", f"API key {key.name!r} has been revoked", request_id)
            refusal = limiter.admit_request(key.name, key.requests_per_s, key.images_per_min)
            if refusal is not None:
                metrics.rejection("rate_limited")
                return _error(429, "rate_limited", f"{refusal.reason} for key {key.name!r}", request_id,
                              headers={"Retry-After": retry_after_header(refusal.retry_after_s)})
        request.state.api_key = key
        if gate.draining and request.method == "POST" and path in work_paths:
            metrics.rejection("shutting_down")
            return _error(
                503, "shutting_down", "this ingress replica is shutting down and takes no new work; retry (another "
                "replica or the restarted service will answer)",
                request_id, headers={"Retry-After": retry_after_header(gate.retry_after_s())},
            )
        if not (request.method == "POST" and path in generation_paths):
            return await call_next(request)
        if not gate.try_enter():
            metrics.rejection("overloaded")
            return _error(
                503, "overloaded",
                f"the service is at capacity ({gate.limit} requests in flight per ingress replica); retry later",
                request_id, headers={"Retry-After": retry_after_header(gate.retry_after_s())},
            )
        started = time.perf_counter()
        succeeded = False
        try:
            response = await call_next(request)
            succeeded = response.status_code < 400
            return response
        finally:
            gate.leave(time.perf_counter() - started if succeeded else None)

    @app.middleware("http")
    async def request_id_middleware(request: Request, call_next):
        supplied = request.headers.get(REQUEST_ID_HEADER)
        declared = request.headers.get("content-length", "")
        request_bytes = int(declared) if declared.isdigit() else 0
        if supplied is not None and not _REQUEST_ID.match(supplied):
            metrics.rejection("validation")
            response = _error(
                422, "validation_error",
                f"{REQUEST_ID_HEADER}: must be 1-128 characters of letters, digits and ._:-",
                None, [{"field": REQUEST_ID_HEADER, "message": "1-128 characters of [A-Za-z0-9._:-]"}],
            )
        else:
            request.state.request_id = supplied or uuid.uuid4().hex
            response = await call_next(request)
            if echo_request_id:
                response.headers[REQUEST_ID_HEADER] = request.state.request_id
        sent = response.headers.get("content-length", "")
        metrics.http_request(_route_label(request.scope), response.status_code, request_bytes, int(sent) if sent.isdigit() else 0)
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        metrics.rejection("validation")
        details = [{"field": _field_name(tuple(item["loc"])), "message": item["msg"]} for item in error.errors()]
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return _error(422, "validation_error", message, getattr(request.state, "request_id", None), details)

    def _stage_error(error: Exception, request_id: str) -> JSONResponse:
        """Every way a backend call can fail, as one explicit error (never a stack trace)."""
        if isinstance(error, RequestTimedOut):
            metrics.rejection("timeout")
            return _error(504, "timeout", str(error), request_id)
        if isinstance(error, (StageUnavailable, Overloaded)):
            kind = "overloaded" if isinstance(error, Overloaded) else "stage_unavailable"
            metrics.rejection(kind)
            return _error(503, kind, str(error), request_id, headers={"Retry-After": retry_after_header(gate.retry_after_s())})
        logger.exception("request %s failed", request_id)
        return _error(500, "generation_failed", f"generation failed: {type(error).__name__}", request_id)

    async def run_generation(mode: str, body: Any, request: Request, response: Response) -> Any:
        request_id = request.state.request_id
        try:
            spec = body.to_spec()
        except SpecError as error:
            metrics.rejection("validation")
            return _error(422, "validation_error", str(error), request_id, [{"field": error.field, "message": error.message}])
        key = getattr(request.state, "api_key", None)
        if key is not None:
            refusal = limiter.admit_images(key.name, len(spec.seeds), key.requests_per_s, key.images_per_min)
            if refusal is not None:
                metrics.rejection("rate_limited")
                return _error(429, "rate_limited", f"{refusal.reason} for key {key.name!r}", request_id,
                              [{"field": "num_images", "message": refusal.reason}],
                              headers={"Retry-After": retry_after_header(refusal.retry_after_s)})
        timeout_s = admission.request_timeout_s
        asked = request.headers.get(TIMEOUT_HEADER)
        if asked is not None:
            try:
                timeout_s = min(timeout_s, float(asked))
                if not timeout_s > 0:
                    raise ValueError
            except ValueError:
                metrics.rejection("validation")
                return _error(422, "validation_error", f"{TIMEOUT_HEADER}: must be a number of seconds > 0", request_id,
                              [{"field": TIMEOUT_HEADER, "message": f"seconds, > 0, at most {admission.request_timeout_s:g}"}])
        started = time.perf_counter()
        try:
            result = await backend.generate(spec, request_id, timeout_s)
        except Exception as error:
            return _stage_error(error, request_id)
        metrics.generation(mode, spec.width, spec.height, time.perf_counter() - started)
        total_ms = (time.perf_counter() - started) * 1000.0
        response.headers["Server-Timing"] = server_timing(result, total_ms)
        return ImagesResponse(
            images=[base64.b64encode(image).decode("ascii") for image in result.images],
            media_type=result.media_type,
            seeds=list(result.seeds),
            width=spec.width,
            height=spec.height,
            timings={stage: vars(timing) for stage, timing in result.timings.items()},
            total_ms=total_ms,
            request_id=request_id,
            warnings=list(getattr(result, "notes", ())),
        )

    def add_generation_route(mode: str) -> None:
        model = models[mode]
        responses = {status: {"model": ErrorResponse} for status in (401, 403, 413, 422, 429, 500, 503, 504)}
        if mode in unavailable:
            reason = unavailable[mode]

            # Not configured: refuse at once, whatever the body, naming what to configure.
            @app.post(f"/v1/{mode}", status_code=404, responses={404: {"model": ErrorResponse}}, summary=model.__doc__)
            async def not_configured(request: Request) -> JSONResponse:
                metrics.rejection("mode_not_configured")
                return _error(404, "mode_not_configured", reason, request.state.request_id)

            return

        async def generate(body: model, request: Request, response: Response):  # type: ignore[valid-type]
            return await run_generation(mode, body, request, response)

        app.post(f"/v1/{mode}", response_model=ImagesResponse, responses=responses, summary=model.__doc__)(generate)

    for mode in MODES:
        add_generation_route(mode)

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingsResponse,
        responses={413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 500: {"model": ErrorResponse}},
        summary="CLIP projected embeddings of texts and/or images, and their cosine similarities.",
    )
    async def embeddings(body: EmbeddingsRequest, request: Request):  # type: ignore[valid-type]
        request_id = request.state.request_id
        try:
            texts, images = await backend.embeddings(list(body.texts), list(body.images), request_id)
        except Exception as error:
            return _stage_error(error, request_id)
        similarity = None
        if len(texts) and len(images):
            a = texts / np.linalg.norm(texts, axis=1, keepdims=True)
            b = images / np.linalg.norm(images, axis=1, keepdims=True)
            similarity = (a @ b.T).tolist()
        return EmbeddingsResponse(
            text_embeddings=texts.tolist(), image_embeddings=images.tolist(), similarity=similarity, request_id=request_id
        )

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if gate.draining:  # load balancers stop sending here; the stages need no asking
            return JSONResponse({"ready": False, "draining": True, "stages": {}}, status_code=503)
        stages = await backend.readiness()
        ready = bool(stages) and all(state == "ready" for state in stages.values())
        return JSONResponse({"ready": ready, "stages": stages}, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        """The product's metrics from every stage (Prometheus text format)."""
        return PlainTextResponse(await backend.metrics_text(), media_type="text/plain; version=0.0.4")

    if jobs is not None:
        add_job_routes(app, limits, models, jobs, unavailable, metrics)
        add_compat_routes(app, limits, models, jobs, unavailable, metrics)

    # Added last, so it is the outermost middleware: oversized bodies never reach a route.
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes, metrics=metrics)
    app.state.admission_gate = gate  # the ingress drains through it
    return app
