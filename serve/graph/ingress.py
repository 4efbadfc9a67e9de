"""The HTTP ingress deployment: composes the stages through DeploymentHandles.

Each stage call is awaited here and its output passed to the next call
(``serve.graph.plan`` says why: a chained ``DeploymentResponse`` whose upstream node
died hangs in Ray Serve 2.60); which deployment serves a call comes from the stage
registry (``deployments.registry``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from ray import serve
from ray.serve.handle import DeploymentHandle

import numpy as np

from deployments.messages import CAPTION_TASK, EncodedImages, Florence2Request, UnderstandingAnswer
from deployments.metrics import merge_exposition
from serve.http.app import create_app
from serve.http.catalog import ModelCatalog
from serve.http.compat import MODEL_NAME, SAMPLERS
from serve.http.metadata import stamped
from serve.http.admission import AdmissionGate
from serve.jobs.actor import ActorJobStore, job_store_actor
from serve.jobs.webhooks import WebhookSender, webhook_secret
from serve.jobs.runner import JobRunner
from serve.jobs.progress import LoopProgress
from serve.graph.plan import plan
from serve.graph.resilience import run_resilient
from serve.http.schemas import GenerationSpec
from serve.settings import ServiceSettings

from deployments.registry import (DEFAULT_FAMILY, INGRESS_NAME, OPTIONAL_STAGES, STAGE_NAMES, UNDERSTANDING_STAGES,
                                 denoiser_of_mode, stage_for, understanding_stage)

logger = logging.getLogger("ray.serve")


class HandleCalls:
    """:class:`serve.graph.plan.StageCalls` on DeploymentHandles. Each call is awaited, and retried
    on another replica (up to ``retries`` times) when the replica serving it dies or becomes
    unreachable: a stage's output depends only on its arguments (seeds travel in them), so
    the retry returns what the lost call would have."""

    def __init__(self, handles: dict[str, DeploymentHandle | None], retries: int = 1, on_retry=None,
                 family: str = DEFAULT_FAMILY) -> None:
        self.handles = handles
        self.family = family
        self.retries = retries
        self.on_retry = on_retry
        self.issued: list = []
        self.call_ms: dict[str, float] = {}
        """Each stage call's round trip as seen from here, by the output's timing key."""

    async def _call(self, stage: str, method: str, request_id: str, *args, multiplexed: str = ""):
        from ray.exceptions import RayActorError

        handle = self.handles[stage]
        if multiplexed:
            handle = handle.options(multiplexed_model_id=multiplexed)
        for attempt in range(self.retries + 1):
            started = time.perf_counter()
            response = getattr(handle, method).remote(*args)
            self.issued.append(response)
            try:
                result = await response
            except RayActorError as error:
                if attempt == self.retries:
                    raise
                logger.warning("request %s: %s replica died or became unreachable mid-call (%s); retrying",
                               request_id, stage, type(error).__name__)
                if self.on_retry is not None:
                    self.on_retry(stage)
                continue
            for key in getattr(result, "timings", ()):  # one: the stage's own
                self.call_ms[key] = (time.perf_counter() - started) * 1000.0
            return result
        raise AssertionError("unreachable")

    def cancel_all(self) -> None:
        """Cancel every call this request made: each stage drops the work (a loop at its next step)."""
        for response in self.issued:
            response.cancel()

    def _stage(self, role: str, variant: str | None = None) -> str:
        return stage_for(role, variant, self.family).name

    async def encode_text(self, texts, request_id):
        return await self._call(self._stage("text_encoder"), "encode", request_id, texts, request_id)

    async def encode_decoder_text(self, texts, request_id):
        return await self._call(self._stage("decoder_text_encoder"), "encode", request_id, texts, request_id)

    async def embed_images(self, images, request_id):
        return await self._call(self._stage("image_encoder"), "embed", request_id, images, request_id)

    async def prior(self, text, params, images=None):
        # A fine-tuned prior goes to a replica of the family's Prior that has it loaded, if any.
        return await self._call(self._stage("prior"), "generate", params.request_id, text, params, images,
                                multiplexed=params.model)

    async def encode_image(self, image):
        return await self._call(self._stage("movq"), "encode", image.request_id, image)

    async def denoise(self, decoder, embeddings, params, init=None, hint=None, text=None):
        extra = () if text is None else (text,)
        return await self._call(self._stage("denoiser", decoder), "generate", params.request_id,
                                embeddings, params, init, hint, *extra)

    async def decode(self, latents, params):
        return await self._call(self._stage("movq"), "decode", params.request_id, latents, params)

    async def upscale(self, latents, params):
        return await self._call(self._stage("movq"), "upscale", params.request_id, latents, params)

    async def caption(self, image, request_id):
        return await self.understand("caption", Florence2Request(image, CAPTION_TASK), request_id)

    async def understand(self, mode: str, request, request_id: str):
        """One request to the image-understanding stage serving ``mode``."""
        return await self._call(understanding_stage(mode).name, "run", request_id, request, request_id)


def classify_stage_error(error: BaseException) -> str | None:
    """How :func:`serve.graph.resilience.run_resilient` should treat a stage call's error."""
    from ray import exceptions
    from ray.serve.exceptions import BackPressureError

    from deployments.runtime import StageNotReady

    if isinstance(error, BackPressureError):
        return "overloaded"
    if isinstance(error, (exceptions.ActorDiedError, exceptions.ActorUnavailableError, exceptions.RayActorError)):
        return "replica_died"
    if isinstance(error, StageNotReady) or isinstance(getattr(error, "cause", None), StageNotReady):
        return "unavailable"
    return None


def unavailable_modes(deployed: set[str]) -> dict[str, str]:
    """Modes served by an optional stage that is not deployed, each with what to configure."""
    missing = {}
    for stage in OPTIONAL_STAGES:
        if stage.name in deployed:
            continue
        for mode in stage.modes:
            missing[mode] = (
                f"{mode} is not configured on this deployment: set args.models.{stage.path_field} "
                f"(or ${stage.path_env}) to a checkpoint directory and redeploy"
            )
    return missing


def unconfigured_understanding(deployed: set[str]) -> dict[str, str]:
    """Image-understanding routes whose stage is not deployed, each with the setting to configure."""
    return {
        mode: (f"/v1/{mode} is not configured on this deployment: set args.models.{stage.path_field} "
               f"(or ${stage.path_env}) to a {stage.name} checkpoint directory and redeploy")
        for stage in UNDERSTANDING_STAGES if stage.name not in deployed for mode in stage.modes
    }


@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class Ingress:
    def __init__(self, settings: dict, **stages: DeploymentHandle | None) -> None:
        self.settings = ServiceSettings.model_validate(settings)
        self.deployed = {name for name, handle in stages.items() if handle is not None}
        self.handles = stages
        from deployments.metrics import IngressMetrics

        self.metrics = IngressMetrics()
        self.jobs = self._job_runner()
        self.gate: AdmissionGate | None = None

    def __serve_build_asgi_app__(self):
        models = self.settings.models
        catalog = ModelCatalog.serving(models.families(), self.deployed, models.default_model_id(),
                                       tuple((prior.id, prior.family) for prior in models.priors), models.family_ids())
        # A route answers 404 at once only when no served model offers its mode.
        offered = {mode for model in catalog.models.values() for mode in model.modes}
        unavailable = {mode: why for mode, why in unavailable_modes(self.deployed).items() if mode not in offered}
        unavailable.update(unconfigured_understanding(self.deployed))
        app = create_app(
            self.settings.limits, backend=self, echo_request_id=False, metrics=self.metrics,
            unavailable=unavailable, admission=self.settings.admission, auth=self.settings.auth,
            jobs=self.jobs, catalog=catalog,
        )
        self.gate = app.state.admission_gate
        return app

    async def drain(self) -> dict:
        """Take no new work from now on (503 ``shutting_down``, /readyz 503); what this replica still holds.

        Called through a handle before the service stops: Ray Serve's shutdown kills the
        HTTP proxy at once, so anything still in flight then would lose its answer.
        """
        if self.gate is not None:
            self.gate.draining = True
        return await self.in_flight()

    async def __del__(self) -> None:
        """Ray Serve's graceful stop of this replica (scale-down, redeploy, shutdown) waits for
        the requests it holds, not for jobs, which run outside any request: admit nothing new
        and let them end. ``graceful_shutdown_timeout_s`` still bounds the wait; past it the
        store's lease fails a lost job explicitly."""
        await self.drain()
        await self.jobs.join()

    async def in_flight(self) -> dict:
        """``{"replica", "draining", "requests", "jobs"}``: this replica's HTTP generations and jobs not yet done."""
        return {
            "replica": self.jobs.owner,
            "draining": bool(self.gate and self.gate.draining),
            "requests": self.gate.inside if self.gate is not None else 0,
            "jobs": self.jobs.running,
        }

    def _job_runner(self) -> JobRunner:
        """Jobs run here; their state lives in the named store actor, which outlives this replica."""
        settings = self.settings.jobs
        actor = job_store_actor(settings)
        actor.configure.remote(settings.model_dump())
        try:
            owner = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (tests that build the class directly)
            owner = None
        webhooks = WebhookSender(self.settings.webhooks, webhook_secret(self.settings.webhooks))
        return JobRunner(ActorJobStore(actor, reconnect=lambda: job_store_actor(settings)), backend=self,
                         settings=settings, owner=owner, webhooks=webhooks)

    async def generate_job(self, spec: GenerationSpec, job_id: str) -> EncodedImages:
        """A job's generation, with the job id as request id (so the loops report its
        progress under it). Cancelling the caller cancels every stage call."""
        logger.info("job %s: %s %dx%d, %d image(s)", job_id, spec.mode, spec.width, spec.height, len(spec.seeds))
        # A job runs outside any HTTP request, so Ray Serve has no parent request whose
        # cancellation would reach its stage calls: _run_plan cancels each one itself.
        return self._stamped(spec, await self._run_plan(spec, job_id))

    def _stamped(self, spec: GenerationSpec, result: EncodedImages) -> EncodedImages:
        """The images with their generation parameters in them (``outputs.embed_parameters``)."""
        if not self.settings.outputs.embed_parameters:
            return result
        return stamped(result, spec, spec.model or MODEL_NAME, SAMPLERS[spec.scheduler][0])

    async def _run_plan(self, spec: GenerationSpec, request_id: str) -> EncodedImages:
        """Every stage call of ``spec``; if this is cancelled or fails (a timeout, a client that
        went away, a dead replica), every call it made is cancelled too, so no stage keeps
        working for nobody: a denoising loop drops the request at its next step boundary."""
        calls = self._calls(spec.family)
        try:
            result = await plan(spec, calls, request_id)
        except BaseException:
            calls.cancel_all()
            raise
        return replace(result, call_ms=calls.call_ms)

    def _denoiser(self, spec: GenerationSpec) -> DeploymentHandle:
        return self.handles[denoiser_of_mode(spec.mode, spec.family).name]

    async def loop_progress(self, spec: GenerationSpec, job_id: str) -> LoopProgress:
        """One poll of the prior's and the denoiser's progress for ``job_id``.

        A poll reaches one replica of each loop: with several replicas, one that does not
        hold the job answers None (the stage-level progress stays right; steps in between
        show up when a poll reaches the right replica).
        """
        prior, denoise = await asyncio.gather(
            self.handles[stage_for("prior", family=spec.family).name].request_progress.remote(job_id),
            self._denoiser(spec).request_progress.remote(job_id),
        )

        def pair(found):
            return None if found is None else (found["done"], found["total"])

        return LoopProgress(pair(prior), pair(denoise))

    async def preview(self, spec: GenerationSpec, job_id: str, max_side: int) -> tuple[bytes, str] | None:
        """The denoiser hands over a copy of the latents between steps; the MOVQ replica
        decodes a shrunk version. The latents go replica to replica, never through here."""
        latents = self._denoiser(spec).request_latents.remote(job_id)
        return await self.handles[stage_for("movq", family=spec.family).name].preview.remote(latents, max_side)

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

    async def generate(self, spec: GenerationSpec, request_id: str = "", timeout_s: float | None = None) -> EncodedImages:
        logger.info(
            "request %s: %s %dx%d, %d image(s)", request_id, spec.mode, spec.width, spec.height, len(spec.seeds)
        )

        return self._stamped(spec, await self._resilient(lambda: self._run_plan(spec, request_id), timeout_s))

    async def embeddings(self, texts: list[str], images: list, request_id: str = "") -> tuple[np.ndarray, np.ndarray]:
        async def attempt() -> tuple[np.ndarray, np.ndarray]:
            calls = self._calls()
            try:
                empty = np.zeros((0, 0), np.float32)
                text, image = await asyncio.gather(
                    calls.encode_text(texts, request_id) if texts else asyncio.sleep(0, None),
                    calls.embed_images(images, request_id) if images else asyncio.sleep(0, None),
                )
                return (text.text_embeds if text else empty), (image.image_embeds if image else empty)
            except BaseException:
                calls.cancel_all()
                raise

        return await self._resilient(attempt)

    async def understand(self, mode: str, image: np.ndarray, task: str, text: str | None,
                         request_id: str = "") -> UnderstandingAnswer:
        """One image-understanding request of route ``mode``: a Florence-2 task or a Kosmos-2
        grounded caption, with its stage's timing (a ``ValueError`` when the stage refuses the input)."""
        if understanding_stage(mode).checkpoint == "florence2":
            request = Florence2Request(image, task, text)
        else:
            from deployments.kosmos2 import DEFAULT_PROMPT, Kosmos2Request

            request = Kosmos2Request(image, text or DEFAULT_PROMPT)

        async def attempt() -> UnderstandingAnswer:
            calls = self._calls()
            try:
                return await calls.understand(mode, request, request_id)
            except BaseException:
                calls.cancel_all()
                raise

        return await self._resilient(attempt)

    def _calls(self, family: str = DEFAULT_FAMILY) -> HandleCalls:
        return HandleCalls(self.handles, self.settings.admission.stage_retries, self.metrics.stage_retry, family)

    async def _resilient(self, attempt, timeout_s: float | None = None):
        admission = self.settings.admission
        # Retries happen per stage call (HandleCalls); here: the deadline and the error mapping.
        return await run_resilient(
            attempt, timeout_s=min(timeout_s or admission.request_timeout_s, admission.request_timeout_s),
            classify=classify_stage_error,
        )

    async def readiness(self) -> dict[str, str]:
        """Per deployed stage: "ready" when at least one replica is running, else what Serve reports."""
        status = await asyncio.to_thread(serve.status)
        app_name = serve.get_replica_context().app_name
        app = status.applications.get(app_name)
        names = [name for name in STAGE_NAMES if name in self.deployed]
        stages: dict[str, str] = {}
        for name in names:
            deployment = app.deployments.get(name) if app else None
            if deployment is None:
                stages[name] = "not deployed"
            elif deployment.replica_states.get("RUNNING", 0) > 0:
                stages[name] = "ready"
            else:  # Serve's message can carry tracebacks and paths: the log has it, /readyz (open) does not
                logger.warning("stage %s not running: %s %s", name, deployment.status, deployment.message)
                stages[name] = f"{deployment.status}: no running replica"
        # A running replica whose model failed to load says so itself (it stays up, reporting
        # the reason, rather than crash-looping).
        running = [name for name in names if stages[name] == "ready"]
        states = await asyncio.gather(
            *(asyncio.wait_for(self.handles[name].load_state.remote(), 5.0) for name in running), return_exceptions=True
        )
        for name, state in zip(running, states):
            if isinstance(state, BaseException):
                stages[name] = f"not responding: {type(state).__name__}"
            elif state != "ready":
                logger.warning("stage %s not ready: %s", name, state)
                stages[name] = "model failed to load (details in the stage's log)"
        return stages
