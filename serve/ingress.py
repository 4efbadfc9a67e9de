"""The HTTP ingress deployment: composes the stages through DeploymentHandles.

Each stage's ``DeploymentResponse`` is passed straight into the next stage's
call, so embeddings and latents go replica to replica; only the final encoded
images come back here.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

import numpy as np

from deployments.messages import EncodedImages
from deployments.metrics import merge_exposition
from serve.api import create_app
from serve.job_actor import ActorJobStore, job_store_actor
from serve.jobs import JobRunner, LoopProgress
from serve.plan import DECODER_OF_MODE, plan
from serve.schemas import GenerationSpec
from serve.settings import (
    CONTROLNET_DECODER_PATH_ENV,
    INGRESS_NAME,
    INPAINT_DECODER_PATH_ENV,
    STAGE_NAMES,
    VARIANT_PATH_FIELDS,
    ServiceSettings,
)

VARIANT_ENV = {"InpaintDenoiser": INPAINT_DECODER_PATH_ENV, "ControlnetDenoiser": CONTROLNET_DECODER_PATH_ENV}

logger = logging.getLogger("ray.serve")


class HandleCalls:
    """:class:`serve.plan.StageCalls` on DeploymentHandles: every call returns a
    ``DeploymentResponse``, passed unresolved into the next stage's call."""

    def __init__(self, handles: dict[str, DeploymentHandle | None]) -> None:
        self.handles = handles

    def encode_text(self, texts, request_id):
        return self.handles["TextEncoder"].encode.remote(texts, request_id)

    def embed_images(self, images, request_id):
        return self.handles["ImageEncoder"].embed.remote(images, request_id)

    def prior(self, text, params, images=None):
        return self.handles["Prior"].generate.remote(text, params, images)

    def encode_image(self, image):
        return self.handles["MovqDecoder"].encode.remote(image)

    def denoise(self, decoder, embeddings, params, init=None, hint=None):
        return self.handles[DENOISER_OF_DECODER[decoder]].generate.remote(embeddings, params, init, hint)

    def decode(self, latents, params):
        return self.handles["MovqDecoder"].decode.remote(latents, params)


DENOISER_OF_DECODER = {"text2img": "Denoiser", "inpaint": "InpaintDenoiser", "controlnet": "ControlnetDenoiser"}


class RecordingCalls:
    """:class:`HandleCalls` that remember every call made, so a job can cancel them all.

    A job runs outside any HTTP request, so Ray Serve has no parent request whose
    cancellation would reach its stage calls; the job cancels each one itself.
    """

    def __init__(self, calls: HandleCalls) -> None:
        self._calls = calls
        self.responses: list = []

    def __getattr__(self, name: str):
        method = getattr(self._calls, name)

        def call(*args, **kwargs):
            response = method(*args, **kwargs)
            self.responses.append(response)
            return response

        return call

    def cancel_all(self) -> None:
        for response in self.responses:
            response.cancel()


def unavailable_modes(deployed: set[str]) -> dict[str, str]:
    """Modes whose decoder variant is not deployed, each with what to configure."""
    missing = {}
    for mode, decoder in DECODER_OF_MODE.items():
        name = DENOISER_OF_DECODER[decoder]
        if name not in deployed:
            missing[mode] = (
                f"{mode} is not configured on this deployment: set args.models.{VARIANT_PATH_FIELDS[name]} "
                f"(or ${VARIANT_ENV[name]}) to a checkpoint directory and redeploy"
            )
    return missing


@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class Ingress:
    def __init__(self, settings: dict, **stages: DeploymentHandle | None) -> None:
        self.settings = ServiceSettings.model_validate(settings)
        self.deployed = {name for name, handle in stages.items() if handle is not None}
        self.calls = HandleCalls(stages)
        self.handles = stages
        self.jobs = self._job_runner()

    def __serve_build_asgi_app__(self):
        from deployments.metrics import IngressMetrics

        return create_app(
            self.settings.limits, backend=self, echo_request_id=False, metrics=IngressMetrics(),
            unavailable=unavailable_modes(self.deployed), jobs=self.jobs,
        )

    def _job_runner(self) -> JobRunner:
        """Jobs run here; their state lives in the named store actor, which outlives this replica."""
        settings = self.settings.jobs
        actor = job_store_actor(settings)
        actor.configure.remote(settings.model_dump())
        try:
            owner = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (tests that build the class directly)
            owner = None
        return JobRunner(ActorJobStore(actor), backend=self, settings=settings, owner=owner)

    async def generate_job(self, spec: GenerationSpec, job_id: str) -> EncodedImages:
        """A job's generation, with the job id as request id (so the loops report its
        progress under it). Cancelling the caller cancels every stage call."""
        logger.info("job %s: %s %dx%d, %d image(s)", job_id, spec.mode, spec.width, spec.height, len(spec.seeds))
        calls = RecordingCalls(self.calls)
        try:
            return await plan(spec, calls, job_id)
        except asyncio.CancelledError:
            calls.cancel_all()
            raise

    def _denoiser(self, spec: GenerationSpec) -> DeploymentHandle:
        return self.handles[DENOISER_OF_DECODER[DECODER_OF_MODE[spec.mode]]]

    async def loop_progress(self, spec: GenerationSpec, job_id: str) -> LoopProgress:
        """One poll of the prior's and the denoiser's progress for ``job_id``.

        A poll reaches one replica of each loop: with several replicas, one that does not
        hold the job answers None (the stage-level progress stays right; steps in between
        show up when a poll reaches the right replica).
        """
        prior, denoise = await asyncio.gather(
            self.handles["Prior"].request_progress.remote(job_id), self._denoiser(spec).request_progress.remote(job_id)
        )

        def pair(found):
            return None if found is None else (found["done"], found["total"])

        return LoopProgress(pair(prior), pair(denoise))

    async def preview(self, spec: GenerationSpec, job_id: str, max_side: int) -> tuple[bytes, str] | None:
        """The denoiser hands over a copy of the latents between steps; the MOVQ replica
        decodes a shrunk version. The latents go replica to replica, never through here."""
        latents = self._denoiser(spec).request_latents.remote(job_id)
        return await self.handles["MovqDecoder"].preview.remote(latents, max_side)

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

    async def generate(self, spec: GenerationSpec, request_id: str = "") -> EncodedImages:
        logger.info(
            "request %s: %s %dx%d, %d image(s)", request_id, spec.mode, spec.width, spec.height, len(spec.seeds)
        )
        # If the client goes away, Ray Serve cancels this call and with it every
        # stage call made under it; a denoising loop then drops the request at its
        # next step boundary (tests/e2e: test_client_disconnect_stops_the_denoising_loop).
        return await plan(spec, self.calls, request_id)

    async def embeddings(self, texts: list[str], images: list, request_id: str = "") -> tuple[np.ndarray, np.ndarray]:
        text_call = self.calls.encode_text(texts, request_id) if texts else None
        image_call = self.calls.embed_images(images, request_id) if images else None
        text_embeds = (await text_call).text_embeds if text_call is not None else np.zeros((0, 0), np.float32)
        image_embeds = (await image_call).image_embeds if image_call is not None else np.zeros((0, 0), np.float32)
        return text_embeds, image_embeds

    async def readiness(self) -> dict[str, str]:
        """Per deployed stage: "ready" when at least one replica is running, else what Serve reports."""
        status = await asyncio.to_thread(serve.status)
        app_name = serve.get_replica_context().app_name
        app = status.applications.get(app_name)
        stages: dict[str, str] = {}
        for name in STAGE_NAMES:
            if name not in self.deployed:
                continue
            deployment = app.deployments.get(name) if app else None
            if deployment is None:
                stages[name] = "not deployed"
            elif deployment.replica_states.get("RUNNING", 0) > 0:
                stages[name] = "ready"
            else:
                stages[name] = f"{deployment.status}: {deployment.message or 'no running replica'}"
        return stages
