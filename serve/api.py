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
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.messages import EncodedImages
from serve.schemas import ErrorResponse, Text2ImgResponse, Text2ImgSpec, text2img_request_model
from serve.settings import ApiLimits

logger = logging.getLogger("kandinsky_serve.api")

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ServiceOverloaded(Exception):
    """Raised by a backend when a stage's queue is full; the client gets 503."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationBackend(Protocol):
    async def text2img(self, spec: Text2ImgSpec, request_id: str) -> EncodedImages: ...

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


KNOWN_ROUTES = ("/v1/text2img", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")


def _route_label(scope: Scope) -> str:
    """A bounded route label: the matched route's template, else a known path, else "other"."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    return scope.get("path") if scope.get("path") in KNOWN_ROUTES else "other"


def _error(
    status: int, kind: str, message: str, request_id: str | None, details: list[dict] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse.model_validate(
        {"error": {"type": kind, "message": message, "details": details or []}, "request_id": request_id}
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


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


def create_app(
    limits: ApiLimits, backend: GenerationBackend, echo_request_id: bool = True, metrics: ApiMetrics | None = None
) -> FastAPI:
    """Build the HTTP API on ``backend``.

    ``echo_request_id``: set the ``X-Request-ID`` response header. Behind Ray Serve's
    proxy it must be False: the proxy forwards the client's id (or one it made) to
    us and sets the response header itself.
    """
    Text2ImgRequest = text2img_request_model(limits)
    metrics = metrics or NoMetrics()
    app = FastAPI(
        title="kandinsky-serve",
        version="0.1.0",
        description="Kandinsky 2.2 text-to-image, served as a stage-split Ray Serve graph.",
    )

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

    @app.post(
        "/v1/text2img",
        response_model=Text2ImgResponse,
        responses={
            413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 500: {"model": ErrorResponse},
            503: {"model": ErrorResponse},
        },
    )
    async def text2img(body: Text2ImgRequest, request: Request):  # type: ignore[valid-type]
        request_id = request.state.request_id
        try:
            spec = body.to_spec()
        except ValueError as error:
            metrics.rejection("validation")
            return _error(422, "validation_error", f"seed: {error}", request_id, [{"field": "seed", "message": str(error)}])
        started = time.perf_counter()
        try:
            result = await backend.text2img(spec, request_id)
        except ServiceOverloaded as error:  # a stage's queue is full (max_queued_requests): try again later
            metrics.rejection("overloaded")
            retry_after = None if error.retry_after_s is None else {"Retry-After": str(max(1, round(error.retry_after_s)))}
            return _error(503, "overloaded", str(error), request_id, headers=retry_after)
        except Exception as error:  # a stage failed: explicit error, no stack trace to the client
            logger.exception("request %s failed", request_id)
            return _error(500, "generation_failed", f"generation failed: {type(error).__name__}", request_id)
        metrics.generation("text2img", spec.width, spec.height, time.perf_counter() - started)
        return Text2ImgResponse(
            images=[base64.b64encode(image).decode("ascii") for image in result.images],
            media_type=result.media_type,
            seeds=list(result.seeds),
            width=spec.width,
            height=spec.height,
            timings={stage: vars(timing) for stage, timing in result.timings.items()},
            total_ms=(time.perf_counter() - started) * 1000.0,
            request_id=request_id,
        )

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        stages = await backend.readiness()
        ready = bool(stages) and all(state == "ready" for state in stages.values())
        return JSONResponse({"ready": ready, "stages": stages}, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        """The product's metrics from every stage (Prometheus text format)."""
        return PlainTextResponse(await backend.metrics_text(), media_type="text/plain; version=0.0.4")

    # Added last, so it is the outermost middleware: oversized bodies never reach a route.
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes, metrics=metrics)
    return app
