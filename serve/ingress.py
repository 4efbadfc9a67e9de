"""The HTTP ingress deployment: composes the four stages through DeploymentHandles.

Each stage call is awaited here before the next one starts (:func:`call_stage`), so
a replica lost mid-call (its node died) surfaces at once as an error that can be
retried on another replica. Chaining instead (one stage's ``DeploymentResponse``
passed straight into the next call) would keep intermediate tensors off the ingress,
but in Ray Serve 2.60 a chained call whose upstream replica became unreachable is
retried by the downstream router forever: the request hangs. The intermediates are
small next to the final image (embeddings, latents: tens to hundreds of KB).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.metrics import IngressMetrics, merge_exposition
from deployments.messages import DecodeParams, DenoiseParams, EncodedImages, PriorParams
from serve.api import ServiceOverloaded, create_app
from serve.schemas import Text2ImgSpec
from serve.settings import INGRESS_NAME, STAGE_NAMES, ServiceSettings

logger = logging.getLogger("ray.serve")


async def call_stage(
    method: DeploymentHandle,
    *args: Any,
    attempts: int,
    request_id: str = "",
    on_retry: Callable[[str], None] | None = None,
) -> Any:
    """Call one stage method and await its result, retrying on another replica when
    the replica serving the call dies or becomes unreachable (``RayActorError``:
    ``ActorDiedError``, ``ActorUnavailableError``).

    A stage's result depends only on its arguments (seeds travel in them), so a
    retry returns what the lost call would have. An error raised *by* the stage is
    not retried. A full stage queue (``max_queued_requests``) becomes
    :class:`~serve.api.ServiceOverloaded`, which the API turns into 503.
    """
    deployment = method.deployment_name
    for attempt in range(1, attempts + 1):
        try:
            return await method.remote(*args)
        except BackPressureError as error:
            raise ServiceOverloaded(f"{deployment} is at capacity: {error}", error.retry_after_s) from None
        except RayActorError as error:
            if attempt == attempts:
                raise
            logger.warning(
                "request %s: %s replica lost mid-call (%s); retrying, attempt %d of %d",
                request_id, deployment, type(error).__name__, attempt + 1, attempts,
            )
            if on_retry is not None:
                on_retry(deployment)
    raise AssertionError("unreachable: attempts >= 1")


@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class Ingress:
    def __init__(
        self,
        text_encoder: DeploymentHandle,
        prior: DeploymentHandle,
        denoiser: DeploymentHandle,
        movq: DeploymentHandle,
        settings: dict,
    ) -> None:
        self.settings = ServiceSettings.model_validate(settings)
        self.text_encoder = text_encoder
        self.prior = prior
        self.denoiser = denoiser
        self.movq = movq
        self.metrics = IngressMetrics()

    def __serve_build_asgi_app__(self):
        return create_app(self.settings.limits, backend=self, echo_request_id=False, metrics=self.metrics)

    async def _call(self, method: DeploymentHandle, *args: Any, request_id: str) -> Any:
        return await call_stage(
            method, *args, attempts=self.settings.resilience.stage_call_attempts, request_id=request_id,
            on_retry=self.metrics.stage_retry,
        )

    async def metrics_text(self) -> str:
        """Every node's Ray metrics agent, filtered to the product's (and Ray Serve's) metrics.

        In a cluster, scrape the agents directly (cluster/README.md); this route makes
        the embedded default observable with nothing else to run.
        """
        import httpx
        import ray

        nodes = [n for n in await asyncio.to_thread(ray.nodes) if n.get("Alive") and n.get("MetricsExportPort")]
        async with httpx.AsyncClient(timeout=5.0) as client:
            responses = await asyncio.gather(
                *(client.get(f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics") for n in nodes),
                return_exceptions=True,
            )
        texts = [r.text for r in responses if isinstance(r, httpx.Response) and r.status_code == 200]
        return merge_exposition(texts)

    async def text2img(self, spec: Text2ImgSpec, request_id: str = "") -> EncodedImages:
        logger.info("request %s: text2img %dx%d, %d image(s)", request_id, spec.width, spec.height, len(spec.seeds))
        has_negative = spec.negative_prompt is not None
        text = await self._call(
            self.text_encoder.encode, [spec.prompt, spec.negative_prompt if has_negative else ""], request_id,
            request_id=request_id,
        )
        embeddings = await self._call(
            self.prior.generate, text,
            PriorParams(spec.seeds, spec.prior_steps, spec.prior_guidance_scale, has_negative, request_id),
            request_id=request_id,
        )
        # If the client goes away, Ray Serve cancels this call and with it the stage
        # call it is awaiting; a denoising loop then drops the request at its next
        # step boundary (tests/e2e: test_client_disconnect_stops_the_denoising_loop).
        latents = await self._call(
            self.denoiser.generate, embeddings,
            DenoiseParams(spec.height, spec.width, spec.steps, spec.guidance_scale, request_id),
            request_id=request_id,
        )
        return await self._call(self.movq.decode, latents, DecodeParams(spec.output_format, request_id), request_id=request_id)

    async def readiness(self) -> dict[str, str]:
        """Per stage: "ready" when at least one replica is running, else what Serve reports."""
        status = await asyncio.to_thread(serve.status)
        app_name = serve.get_replica_context().app_name
        app = status.applications.get(app_name)
        stages: dict[str, str] = {}
        for name in STAGE_NAMES:
            deployment = app.deployments.get(name) if app else None
            if deployment is None:
                stages[name] = "not deployed"
            elif deployment.replica_states.get("RUNNING", 0) > 0:
                stages[name] = "ready"
            else:
                stages[name] = f"{deployment.status}: {deployment.message or 'no running replica'}"
        return stages
