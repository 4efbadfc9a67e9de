"""The HTTP API as a plain FastAPI app, independent of Ray.

:func:`create_app` takes the limits and a :class:`GenerationBackend`; the Ray
ingress passes itself, tests can pass a fake. The app validates, assigns the
request id, turns results into JSON and errors into 4xx/5xx bodies; it never
touches tensors.
"""


import asyncio
import base64
import logging
import re
import time
import uuid
from typing import Protocol

import numpy as np

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.messages import EncodedImages, UnderstandingAnswer
from deployments.registry import DEFAULT_FAMILY, MODES
from serve.http.admission import AdmissionGate, RateLimiter
from serve.http.auth import ApiKey, KeyStore
from serve.http.catalog import ModelCatalog
from serve.http.compat import add_compat_routes
from serve.http.errors import ApiError, answer_error, error_response, from_backend, install_error_handlers
from serve.http.guards import Guards
from serve.http.images import DecodePool
from serve.http.job_routes import add_job_routes
from serve.http.playground import PLAYGROUND_PATH, add_playground_routes
from serve.http.readiness import ReadinessCache, is_ready
from serve.http.sweep import SWEEP_PATH, add_sweep_route
from serve.http.timing import server_timing
from serve.http.schemas import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    ErrorResponse,
    GenerationRequest,
    GenerationSpec,
    ImagesResponse,
    bind_limits,
    request_models,
)
from serve.http.understanding import ROUTES as UNDERSTANDING_ROUTES
from serve.http.understanding import add_understanding_routes
from serve.jobs.runner import JobRunner
from serve.settings import AdmissionSettings, ApiLimits, AuthSettings

logger = logging.getLogger("kandinsky_serve.api")

REQUEST_ID_HEADER = "X-Request-ID"
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

    async def understand(self, mode: str, image: np.ndarray, task: str, text: str | None, request_id: str) -> UnderstandingAnswer:
        """The answer of image-understanding route ``mode`` (Florence-2's: ``task`` with ``text``;
        Kosmos-2's: ``text`` is the prompt or None) and its stage's timing; ``ValueError`` when
        it refuses the input."""
        ...


class ApiMetrics(Protocol):
    """What the HTTP layer records (``deployments.metrics.IngressMetrics`` in production)."""

    def http_request(self, route: str, status: int, request_bytes: int, response_bytes: int) -> None: ...

    def generation(self, mode: str, width: int, height: int, seconds: float, model: str = "") -> None: ...

    def rejection(self, reason: str) -> None: ...


class NoMetrics:
    def http_request(self, route: str, status: int, request_bytes: int, response_bytes: int) -> None:
        pass

    def generation(self, mode: str, width: int, height: int, seconds: float, model: str = "") -> None:
        pass

    def rejection(self, reason: str) -> None:
        pass


KNOWN_ROUTES = (*(f"/v1/{mode}" for mode in (*MODES, *UNDERSTANDING_ROUTES)), SWEEP_PATH, "/v1/embeddings", "/healthz", "/readyz", "/v1/status",
                "/metrics", "/docs", "/openapi.json", PLAYGROUND_PATH)


def _app_path(scope: Scope) -> str:
    """The request path inside the app (without the route prefix it is served under)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _route_label(scope: Scope) -> str:
    """A bounded route label: the matched route's template, else a known path, else "other"."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    path = _app_path(scope)
    return path if path in KNOWN_ROUTES else "other"


def internal_id(request_id: str) -> str:
    """The id the stages key a request's progress and previews by: the client's label (kept
    in every stage log line, for correlation) plus a part the server draws, so that two
    requests sending the same ``X-Request-ID`` never share state."""
    return f"{request_id}.{uuid.uuid4().hex[:12]}"


class BodyLimits:
    """Refuse request bodies over ``max_bytes`` (413, counting what is actually received) or
    not received in full within ``read_timeout_s`` (408): a client trickling its body must not
    hold a place in the ingress. Only the body's arrival is timed; once it is in, the app may
    wait on ``receive`` (for a disconnect) as long as it likes."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: ApiMetrics, read_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        received = 0
        body_done = False
        refused = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, refused, body_done
            if refused:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                refused = True
                if not response_started:
                    await self._too_slow(scope, receive, send)
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    # Answer here: a body parser that catches the error would turn it into a 400.
                    refused = True
                    if not response_started:
                        await self._too_large(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message: Message) -> None:
            nonlocal response_started
            if not refused:
                response_started = True
                await send(message)

        try:
            await self.app(scope, limited_receive, send_unless_refused)
        except Exception:
            if not refused:
                raise

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._refuse(scope, receive, send, 413, "payload_too_large",
                           f"request body exceeds the limit of {self.max_bytes} bytes", f"at most {self.max_bytes} bytes")

    async def _too_slow(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._refuse(scope, receive, send, 408, "body_timeout",
                           f"the request body did not arrive in full within {self.read_timeout_s:g} s",
                           f"sent in full within {self.read_timeout_s:g} s")

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, kind: str, message: str,
                      limit: str) -> None:
        self.metrics.rejection(kind)
        self.metrics.http_request(_route_label(scope), status, 0, 0)
        response = error_response(status, kind, message, None, [{"field": "body", "message": limit}],
                                  headers={"Connection": "close"} if status == 408 else None)
        await response(scope, receive, send)


DESCRIPTION = """Kandinsky 2.2, served as a stage-split Ray Serve graph: text-to-image, image-to-image,
inpainting, image mixing, variations, ControlNet depth, and CLIP embeddings.

Input images (`image`, `mask`, `hint`, mix items) are base64 PNG, JPEG or WebP. Bodies over the byte
cap get 413; images over the pixel cap, decompression bombs, other formats, truncated files and
masks of a different size than their image get 422 — all before any model runs.

Inpainting masks: **white = repaint, black = keep** (the diffusers >= 0.19 convention);
`invert_mask: true` accepts the opposite convention.
"""


def create_app(
    limits: ApiLimits,
    backend: GenerationBackend,
    echo_request_id: bool = True,
    metrics: ApiMetrics | None = None,
    unavailable: dict[str, str] | None = None,
    admission: AdmissionSettings | None = None,
    auth: AuthSettings | None = None,
    jobs: JobRunner | None = None,
    catalog: ModelCatalog | None = None,
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
    ``catalog``: the models requests may name (default: the default family's, all modes).
    """
    admission = admission or AdmissionSettings()
    auth = auth or AuthSettings()
    keys_file = auth.keys_file()
    gate = AdmissionGate(admission.max_inflight_requests, admission.retry_after_s, admission.max_inflight_per_client)
    guards = Guards(
        KeyStore(keys_file) if keys_file is not None else None,
        RateLimiter(auth.requests_per_s, auth.burst_requests, auth.images_per_min),
        gate, admission, auth,
    )
    decode = DecodePool(admission.decode_threads)
    models = request_models(limits)
    embeddings_request = bind_limits(EmbeddingsRequest, limits)
    unavailable = unavailable or {}
    catalog = catalog or ModelCatalog.serving((DEFAULT_FAMILY,))
    metrics = metrics or NoMetrics()
    # FastAPI's own /docs and /openapi.json would skip the API key; ours are on the keyed router.
    app = FastAPI(title="kandinsky-serve", version="0.2.0", description=DESCRIPTION,
                  openapi_url=None, docs_url=None, redoc_url=None)
    install_error_handlers(app, metrics, gate.retry_after_s)
    keyed = APIRouter(dependencies=[Depends(guards.api_key)])
    errors = {status: {"model": ErrorResponse} for status in (401, 403, 413, 422, 429, 500, 503, 504)}

    @app.middleware("http")
    async def request_id_middleware(request: Request, call_next):
        supplied = request.headers.get(REQUEST_ID_HEADER)
        declared = request.headers.get("content-length", "")
        request_bytes = int(declared) if declared.isdigit() else 0
        if supplied is not None and not _REQUEST_ID.match(supplied):
            metrics.rejection("validation")
            response = error_response(
                422, "validation_error",
                f"{REQUEST_ID_HEADER}: must be 1-128 characters of letters, digits and ._:-",
                None, [{"field": REQUEST_ID_HEADER, "message": "1-128 characters of [A-Za-z0-9._:-]"}],
            )
        else:
            request.state.request_id = supplied or uuid.uuid4().hex
            try:
                await guards.check_before_body(request)
            except ApiError as refused:
                response = answer_error(request, refused, metrics)
            else:
                response = await call_next(request)
            if echo_request_id:
                response.headers[REQUEST_ID_HEADER] = request.state.request_id
        sent = response.headers.get("content-length", "")
        metrics.http_request(_route_label(request.scope), response.status_code, request_bytes, int(sent) if sent.isdigit() else 0)
        return response

    async def run_generation(body: GenerationRequest, request: Request, response: Response,
                             key: ApiKey | None, timeout_s: float) -> ImagesResponse:
        request_id = request.state.request_id
        served = catalog.resolve(body.model, body.mode)
        spec = served.apply(await decode.run(body.to_spec))
        guards.admit_cost(key, spec)
        started = time.perf_counter()
        result = await from_backend(backend.generate(spec, internal_id(request_id), timeout_s), request_id)
        metrics.generation(body.mode, spec.width, spec.height, time.perf_counter() - started, spec.model)
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
            checks=result.checks_json(),
        )

    def add_generation_route(mode: str) -> None:
        model = models[mode]
        if mode in unavailable:
            reason = unavailable[mode]

            # Not configured: refuse at once, whatever the body, naming what to configure.
            @keyed.post(f"/v1/{mode}", status_code=404, responses={404: {"model": ErrorResponse}}, summary=model.__doc__)
            async def not_configured() -> None:
                raise ApiError(404, "mode_not_configured", reason, reason="mode_not_configured")

            return

        async def generate(
            body: model, request: Request, response: Response,  # type: ignore[valid-type]
            key: ApiKey | None = Depends(guards.api_key), timeout_s: float = Depends(guards.deadline),
        ) -> ImagesResponse:
            return await run_generation(body, request, response, key, timeout_s)

        keyed.post(f"/v1/{mode}", response_model=ImagesResponse, responses=errors, summary=model.__doc__,
                   dependencies=[Depends(guards.generation_slot)])(generate)

    for mode in MODES:
        add_generation_route(mode)

    add_sweep_route(keyed, limits, models, lambda spec, request_id, timeout_s: backend.generate(
        spec, internal_id(request_id), timeout_s), guards, decode, catalog, unavailable, metrics)

    @keyed.post(
        "/v1/embeddings", response_model=EmbeddingsResponse, responses=errors,
        dependencies=[Depends(guards.generation_slot)],
        summary="CLIP projected embeddings of texts and/or images, and their cosine similarities.",
    )
    async def embeddings(body: embeddings_request, request: Request) -> EmbeddingsResponse:  # type: ignore[valid-type]
        request_id = request.state.request_id
        images = await decode.run(body.decoded_images)
        texts, image_embeddings = await from_backend(
            backend.embeddings(list(body.texts), images, internal_id(request_id)), request_id
        )
        similarity = None
        if len(texts) and len(image_embeddings):
            a = texts / np.linalg.norm(texts, axis=1, keepdims=True)
            b = image_embeddings / np.linalg.norm(image_embeddings, axis=1, keepdims=True)
            similarity = (a @ b.T).tolist()
        return EmbeddingsResponse(text_embeddings=texts.tolist(), image_embeddings=image_embeddings.tolist(),
                                  similarity=similarity, request_id=request_id)

    add_understanding_routes(keyed, limits, lambda *call: backend.understand(*call), unavailable, decode,
                             guards.generation_slot)

    @keyed.get("/v1/models", summary="The models requests may name (OpenAI's model-list shape, plus family, modes, "
               "default size and whether its stages are loaded).")
    async def list_models() -> dict:
        stages = await readiness.stages()
        side = min(limits.default_side or 512, limits.max_side)
        return {"object": "list", "data": [
            model.as_json(model.id == catalog.default_id, side,
                          loaded=all(stages.get(name) == "ready" for name in model.stages))
            for model in catalog.models.values()
        ]}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    readiness = ReadinessCache(backend.readiness)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Open to probes, so it says only whether to send traffic here (stage detail: ``/v1/status``)."""
        if gate.draining:  # load balancers stop sending here; the stages need no asking
            return JSONResponse({"ready": False, "draining": True}, status_code=503)
        ready = is_ready(await readiness.stages())
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @keyed.get("/v1/status")
    async def status() -> JSONResponse:
        """Readiness with each stage's state (behind the API key: it shows the topology)."""
        stages = await readiness.stages()
        ready = is_ready(stages) and not gate.draining
        return JSONResponse({"ready": ready, "draining": gate.draining, "stages": stages},
                            status_code=200 if ready else 503)

    @keyed.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        """The product's metrics from every stage (Prometheus text format)."""
        return PlainTextResponse(await backend.metrics_text(), media_type="text/plain; version=0.0.4")

    @keyed.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @keyed.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title=app.title)

    if jobs is not None:
        streams = add_job_routes(keyed, limits, models, jobs, unavailable, guards, decode, catalog)
        add_compat_routes(keyed, models, jobs, unavailable, guards, metrics, decode, streams, catalog)
    app.include_router(keyed)
    add_playground_routes(app)  # static, outside the key: the page asks for one when the API does

    # Added last, so it is the outermost middleware: oversized bodies never reach a route.
    app.add_middleware(BodyLimits, max_bytes=limits.max_body_bytes, metrics=metrics,
                       read_timeout_s=admission.body_read_timeout_s)
    app.state.admission_gate = gate  # the ingress drains through it
    return app
