"""The HTTP ingress deployment: composes the four stages through DeploymentHandles.

Each stage's ``DeploymentResponse`` is passed straight into the next stage's
call, so embeddings and latents go replica to replica; only the final encoded
images come back here.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.metrics import merge_exposition
from deployments.messages import DecodeParams, DenoiseParams, EncodedImages, PriorParams
from serve.api import create_app
from serve.schemas import Text2ImgSpec
from serve.settings import INGRESS_NAME, STAGE_NAMES, ServiceSettings

logger = logging.getLogger("ray.serve")


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

    def __serve_build_asgi_app__(self):
        from deployments.metrics import IngressMetrics

        return create_app(self.settings.limits, backend=self, echo_request_id=False, metrics=IngressMetrics())

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
        text = self.text_encoder.encode.remote([spec.prompt, spec.negative_prompt if has_negative else ""], request_id)
        embeddings = self.prior.generate.remote(
            text, PriorParams(spec.seeds, spec.prior_steps, spec.prior_guidance_scale, has_negative, request_id)
        )
        latents = self.denoiser.generate.remote(
            embeddings, DenoiseParams(spec.height, spec.width, spec.steps, spec.guidance_scale, request_id)
        )
        # If the client goes away, Ray Serve cancels this call and with it every
        # stage call made under it; a denoising loop then drops the request at its
        # next step boundary (tests/e2e: test_client_disconnect_stops_the_denoising_loop).
        return await self.movq.decode.remote(latents, DecodeParams(spec.output_format, request_id))

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
