"""What every stage replica shares: where its model runs, how calls are counted
and logged, and (for the two denoising loops) which batching policy serves them.

Model code runs on one dedicated OS thread per replica. Torch keeps an intra-op
thread team per calling OS thread; running every model call on the same thread
keeps that team warm (a fresh executor thread per call was measured 2-3x slower
with 2 threads) and never runs one model from two threads at once. The replica's
event loop stays free to queue requests meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
from ray import serve

from deployments.batching import (
    BatchSettings, LoopBatchSettings, Observers, Queued, StepItem, StepScheduler, StepStats, answer_or_raise, run_isolated,
)
from deployments.messages import StageTiming, UnderstandingAnswer
from deployments.progress import ProgressBoard

R = TypeVar("R")
logger = logging.getLogger("ray.serve")


class StageNotReady(RuntimeError):
    """This replica cannot serve: its model failed to load (the message says why)."""


def _family_label(stage: str) -> str:
    """``stage``, suffixed with the family for a deployment of a non-default model family
    (``denoiser_21``): its metrics, logs and timings stay apart from the default family's."""
    from deployments.registry import BY_NAME, DEFAULT_FAMILY

    try:
        entry = BY_NAME.get(serve.get_replica_context().deployment)
    except Exception:  # outside a replica (models driven in process)
        return stage
    if entry is None or entry.family in (DEFAULT_FAMILY, None):
        return stage
    return f"{stage}_{entry.family.replace('.', '')}"


def assigned_gpu_share() -> float | None:
    """The GPU share Ray assigned this replica (its ``num_gpus``), None outside Ray or without one."""
    import ray

    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_assigned_resources().get("GPU")


class ModelThread:
    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model")
        self.pending = 0
        self.last_done = time.monotonic()

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.pending -= 1
            self.last_done = time.monotonic()

    def set_torch_threads(self, count: int | None) -> None:
        if count:
            self._executor.submit(torch.set_num_threads, count).result()


class StageReplica:
    """Plumbing every stage deployment shares: model thread, metrics, request logs,
    batching knobs, readiness.

    Subclasses call :meth:`setup` from ``__init__`` and decorate ``_run_batch``
    with ``@serve.batch``; the decorator's defaults are replaced by ``user_config``.
    """

    settings_class: type[BatchSettings] = BatchSettings
    batch_methods: tuple[str, ...] = ("_run_batch",)
    """The ``@serve.batch`` methods that ``user_config`` sizes."""
    thread: ModelThread
    _run_batch: Any

    # check_health: a forward probe at most this often, and only when the model is idle;
    # a model thread busy this long without finishing anything counts as stuck.
    HEALTH_PROBE_INTERVAL_S = 30.0
    STALL_LIMIT_S = 300.0
    RELOAD_BACKOFF_S = (30.0, 60.0, 120.0, 300.0, 600.0)

    def setup(self, stage: str, device: str, load_model: Callable[[], Any]) -> None:
        from deployments.metrics import StageMetrics

        self.stage = stage = _family_label(stage)
        self.device = device
        self.thread = ModelThread(stage)
        self.metrics = StageMetrics(stage, device, assigned_gpu_share() if device.startswith("cuda") else None)
        self._load_model = load_model
        self.model = None
        self.load_error: str | None = None
        self._load_attempts = 0
        self._next_load_at = 0.0
        self._reloading = False
        self._last_probe = time.monotonic()
        self._injected_faults: set[str] = set()
        self._try_load()
        self.init_policy()
        self.reconfigure({})

    def _try_load(self) -> None:
        """Load the model; on failure stay up, report the reason, and retry later with backoff
        (a broken checkpoint must not become a silent crash loop)."""
        started = time.perf_counter()
        self._load_attempts += 1
        try:
            self.model = self._load_model()
        except Exception as error:  # noqa: BLE001 - reported through readiness and logs
            self.load_error = f"{type(error).__name__}: {error}"
            backoff = self.RELOAD_BACKOFF_S[min(self._load_attempts - 1, len(self.RELOAD_BACKOFF_S) - 1)]
            self._next_load_at = time.monotonic() + backoff
            logger.error("stage %s: model failed to load (attempt %d; next in %.0f s): %s",
                         self.stage, self._load_attempts, backoff, self.load_error)
            return
        self.load_error = None
        self.metrics.model_loaded(time.perf_counter() - started)

    def _require_model(self) -> None:
        if self.model is None:
            raise StageNotReady(f"stage {self.stage}: model not loaded: {self.load_error}")

    async def load_state(self) -> str:
        """"ready", or why this replica cannot serve."""
        return "ready" if self.model is not None else f"model failed to load: {self.load_error}"

    def init_policy(self) -> None:
        """Hook for subclasses that need more than ``@serve.batch`` (set up before reconfigure)."""

    async def serve_call(self, work: Awaitable[R], request_id: str, stage: str | None = None) -> R:
        """Count, time and log one call; every outcome is recorded, errors by type.

        ``stage``: the key of this call's timing in the result (default: the stage's name).
        """
        self.metrics.request()
        try:
            if self.model is None:
                if hasattr(work, "close"):
                    work.close()  # never started: nothing to await
                self._require_model()
            result = await work
        except Exception as error:
            self.metrics.error(error)
            logger.warning("request %s: stage %s failed: %s", request_id, self.stage, type(error).__name__,
                           extra={"stage": self.stage, "error_type": type(error).__name__})
            raise
        self.metrics.produced(getattr(result, "count", 0))  # images out of this stage (0: encodings)
        timing = result.timings[stage or self.stage]
        logger.info(
            "request %s: stage %s done: batch_size=%d queue_ms=%.1f compute_ms=%.1f",
            request_id, self.stage, timing.batch_size, timing.queue_ms, timing.compute_ms,
            # Fields of their own in JSON logs (logging_config.encoding: JSON).
            extra={"stage": self.stage, "batch_size": timing.batch_size,
                   "queue_ms": round(timing.queue_ms, 3), "compute_ms": round(timing.compute_ms, 3)},
        )
        return result

    def record_batch(self, calls: list[Queued], started: float) -> float:
        """Batch-level metrics of a ``@serve.batch`` batch; returns its compute time in ms."""
        compute_s = time.perf_counter() - started
        self.metrics.batch(len(calls), compute_s, [call.queue_wait_ms(started) / 1000.0 for call in calls])
        return compute_s * 1000.0

    def reconfigure(self, user_config: dict | None) -> None:
        settings = self.settings_class.model_validate(user_config or {})
        self.thread.set_torch_threads(settings.torch_threads)
        for name in self.batch_methods:
            getattr(self, name).set_max_batch_size(settings.max_batch_size)
            getattr(self, name).set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.batch_settings = settings

    async def check_health(self) -> None:
        """Called by Ray Serve every ``health_check_period_s``; raising gets the replica replaced.

        Healthy: CUDA answers (on GPU), the model thread is not stuck, and — when idle, at
        most every ``HEALTH_PROBE_INTERVAL_S`` — a tiny forward pass runs. A replica whose
        model failed to load stays up (reporting why through ``load_state``) and retries
        the load with backoff instead of failing health checks into a crash loop.
        """
        self.metrics.refresh_gauges()
        if "health" in self._injected_faults:
            raise RuntimeError(f"stage {self.stage}: injected health-check failure")
        if self.model is None:
            if not self._reloading and time.monotonic() >= self._next_load_at:
                self._reloading = True
                try:
                    await self.thread.run(self._try_load)
                finally:
                    self._reloading = False
            return
        if self.device.startswith("cuda"):
            await self.thread.run(torch.cuda.synchronize)
        now = time.monotonic()
        if self.thread.pending:
            if now - self.thread.last_done > self.STALL_LIMIT_S:
                raise RuntimeError(f"stage {self.stage}: the model thread has been busy for {now - self.thread.last_done:.0f} s")
            return
        if now - self._last_probe >= self.HEALTH_PROBE_INTERVAL_S:
            self._last_probe = now
            await self.thread.run(self.model.health_probe)

    async def inject_fault(self, kind: str) -> None:
        """Chaos testing only (refused unless the replica runs with ``KANDINSKY_CHAOS=1``):
        ``health`` makes health checks fail from now on; ``exit`` kills the process."""
        import os

        if os.environ.get("KANDINSKY_CHAOS") != "1":
            raise PermissionError("fault injection is disabled (set KANDINSKY_CHAOS=1 in the replica's environment)")
        if kind == "exit":
            os._exit(1)
        self._injected_faults.add(kind)


class UnderstandingReplica(StageReplica):
    """An image-understanding stage: requests of any task batched into one ``generate`` call
    of ``self.model.run``; a request ``check_request`` refuses (or the model refuses alone)
    fails on its own, not its batch."""

    @staticmethod
    def check_request(request: Any) -> None:
        """Raise ``ValueError`` naming what is wrong with ``request``."""

    async def run(self, request: Any, request_id: str = "") -> UnderstandingAnswer:
        return await self.serve_call(answer_or_raise(self._run_batch(Queued(request))), request_id)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _run_batch(self, calls: list[Queued[Any]]) -> list[UnderstandingAnswer | Exception]:
        started = time.perf_counter()
        answers = await run_isolated(self.thread, self.model.run, self.check_request, [call.payload for call in calls])
        compute_ms = self.record_batch(calls, started)
        return [answer if isinstance(answer, Exception) else UnderstandingAnswer(
            answer, {self.stage: StageTiming(call.queue_wait_ms(started), compute_ms, len(calls))})
            for call, answer in zip(calls, answers)]


class LoopReplica(StageReplica):
    """A stage whose model runs a denoising loop, under step or request batching.

    The model must offer ``step(states)``; every state has ``total_steps`` and
    ``finished``. Step batching (and its whole-batch variant ``request-when-idle``)
    sends each image through one shared :class:`StepScheduler`; ``request`` batching
    uses ``@serve.batch`` and runs each collected batch to completion. All report
    to the same observers.
    """

    settings_class = LoopBatchSettings
    batch_settings: LoopBatchSettings
    model: Any

    def init_policy(self) -> None:
        from deployments.metrics import LoopMetrics

        self.stats = StepStats()
        self.progress = ProgressBoard()
        self.observer = Observers(self.stats, self.progress, LoopMetrics(self.stage))
        self.scheduler: StepScheduler = StepScheduler(self._step, max_batch=1, observer=self.observer, offload=self.thread.run)
        self._states_of: dict[str, list] = {}
        """Per request id in flight on the scheduler, its images' states (read for previews only)."""

    def reconfigure(self, user_config: dict | None) -> None:
        super().reconfigure(user_config)
        settings = self.batch_settings
        self.scheduler.configure(
            settings.max_batch_size, settings.max_latent_pixels_per_step, settings.batching == "request-when-idle"
        )

    @property
    def uses_scheduler(self) -> bool:
        """``step`` and ``request-when-idle`` run on the scheduler; ``request`` on ``@serve.batch``."""
        return self.batch_settings.batching != "request"

    def _step(self, states: list) -> None:
        self.model.step(states)

    def make_output(self, inputs: tuple, output: Any, timing: StageTiming) -> Any:
        """The stage's message for one request, from its call's arguments and the model's ``finish_all`` output."""
        raise NotImplementedError

    async def run_request(self, *inputs: Any) -> Any:
        """One request ``(upstream, params, *extras)`` through the loop, under the configured policy."""
        return await self.serve_call(self._run_request(inputs), inputs[1].request_id)

    async def _run_request(self, inputs: tuple) -> Any:
        if not self.uses_scheduler:
            return await self._run_batch(Queued(inputs))
        started = time.perf_counter()
        states = self.model.start_all(*inputs)
        items = await self._run_on_scheduler(states, key=inputs[1].request_id)
        output = await self.thread.run(self.model.finish_all, states)
        return self.make_output(inputs, output, self._timing(items, started))

    async def _run_on_scheduler(self, states: list, key: str) -> list[StepItem]:
        self.progress.start(key, sum(state.total_steps for state in states))
        if key:
            self._states_of[key] = states
        try:
            return list(await asyncio.gather(*(
                self.scheduler.submit(state, total_steps=state.total_steps, bucket=state.bucket, cost=state.cost, key=key)
                for state in states
            )))
        finally:
            self.progress.finish(key)
            self._states_of.pop(key, None)

    @staticmethod
    def _timing(items: list[StepItem], started: float) -> StageTiming:
        total_ms = (time.perf_counter() - started) * 1000.0
        queue_ms = max((item.queue_wait_s for item in items), default=0.0) * 1000.0
        return StageTiming(queue_ms, max(0.0, total_ms - queue_ms), max((i.max_batch_size for i in items), default=0))

    # One batch queue per decorated function per process: fine, as each replica is its
    # own process and holds one stage.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run_batch(self, calls: list[Queued]) -> list:
        """``batching: request``: ``@serve.batch`` collects calls; the batch runs to the end."""
        started = time.perf_counter()
        outputs = await self.thread.run(self.model.generate, [call.payload for call in calls], self.observer)
        compute_ms = self.record_batch(calls, started)
        return [
            self.make_output(call.payload, output, StageTiming(call.queue_wait_ms(started), compute_ms, len(calls)))
            for call, output in zip(calls, outputs)
        ]

    async def request_progress(self, request_id: str) -> dict | None:
        """Image-steps done / total for a request in flight in this replica, else None."""
        progress = self.progress.get(request_id)
        return None if progress is None else {"done": progress.done, "total": progress.total}

    async def request_steps(self, request_id: str) -> dict | None:
        """Image-steps this replica has run for a request, in flight or among the last
        finished (``left``: it has left the loop, whether done or cancelled), else None."""
        found = self.progress.steps_run(request_id)
        if found is None:
            return None
        progress, left = found
        return {"done": progress.done, "total": progress.total, "left": left}

    async def request_latents(self, request_id: str) -> np.ndarray | None:
        """A copy of the current latents of a request's first image, for a preview; None when
        it is not in this replica's loop. Read between steps on the event loop: the model
        thread replaces a state's latents with a new tensor at each step, never edits them."""
        states = self._states_of.get(request_id)
        latents = getattr(states[0], "latents", None) if states else None
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
            return None
        return latents.detach().float().cpu().numpy().copy()

    async def loop_stats(self) -> dict:
        """What the loop has done so far in this replica (for benchmarks and tests)."""
        return {
            "batching": self.batch_settings.batching,
            "active": self.scheduler.active,
            "waiting": self.scheduler.waiting,
            **self.stats.snapshot(),
        }
