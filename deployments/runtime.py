"""Where a replica's model code runs: one dedicated OS thread per replica.

Torch keeps an intra-op thread team per calling OS thread; running every model
call on the same thread keeps that team warm (a fresh executor thread per call
was measured 2-3x slower with 2 threads) and never runs one model from two
threads at once. The replica's event loop stays free to queue requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from ray import serve

from deployments.batching import BatchSettings, LoopBatchSettings, Observers, Queued, StepItem, StepScheduler, StepStats
from deployments.messages import StageTiming
from deployments.progress import ProgressBoard

R = TypeVar("R")


class ModelThread:
    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model")

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def set_torch_threads(self, count: int | None) -> None:
        if count:
            self._executor.submit(torch.set_num_threads, count).result()


class StageReplica:
    """Plumbing every stage deployment shares: the model thread, batching knobs, readiness.

    Subclasses set ``self.thread`` and ``self.model`` and decorate ``_run_batch``
    with ``@serve.batch``; the decorator's defaults are replaced by ``user_config``.
    """

    settings_class: type[BatchSettings] = BatchSettings
    thread: ModelThread
    _run_batch: Any

    def reconfigure(self, user_config: dict | None) -> None:
        settings = self.settings_class.model_validate(user_config or {})
        self.thread.set_torch_threads(settings.torch_threads)
        self._run_batch.set_max_batch_size(settings.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.batch_settings = settings

    async def ready(self) -> bool:
        return True


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

    def init_loop(self, stage: str) -> None:
        from deployments.metrics import LoopMetrics

        self.stats = StepStats()
        self.progress = ProgressBoard()
        self.observer = Observers(self.stats, self.progress, LoopMetrics(stage))
        self.scheduler: StepScheduler = StepScheduler(self._step_on_model_thread, max_batch=1, observer=self.observer)

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

    async def _step_on_model_thread(self, states: list) -> None:
        await self.thread.run(self.model.step, states)

    def make_output(self, upstream: Any, params: Any, output: Any, timing: StageTiming) -> Any:
        """The stage's message for one request from the model's ``finish_all`` output."""
        raise NotImplementedError

    async def run_request(self, upstream: Any, params: Any) -> Any:
        """One request through the loop, under the configured policy."""
        if not self.uses_scheduler:
            return await self._run_batch(Queued((upstream, params)))
        started = time.perf_counter()
        states = self.model.start_all(upstream, params)
        items = await self._run_on_scheduler(states, key=params.request_id)
        output = await self.thread.run(self.model.finish_all, states)
        return self.make_output(upstream, params, output, self._timing(items, started))

    async def _run_on_scheduler(self, states: list, key: str) -> list[StepItem]:
        self.progress.start(key, sum(state.total_steps for state in states))
        try:
            return list(await asyncio.gather(*(
                self.scheduler.submit(state, total_steps=state.total_steps, bucket=state.bucket, cost=state.cost, key=key)
                for state in states
            )))
        finally:
            self.progress.finish(key)

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
        compute_ms = (time.perf_counter() - started) * 1000.0
        return [
            self.make_output(*call.payload, output, StageTiming(call.queue_wait_ms(started), compute_ms, len(calls)))
            for call, output in zip(calls, outputs)
        ]

    async def request_progress(self, request_id: str) -> dict | None:
        """Image-steps done / total for a request in flight in this replica, else None."""
        progress = self.progress.get(request_id)
        return None if progress is None else {"done": progress.done, "total": progress.total}

    async def loop_stats(self) -> dict:
        """What the loop has done so far in this replica (for benchmarks and tests)."""
        return {
            "batching": self.batch_settings.batching,
            "active": self.scheduler.active,
            "waiting": self.scheduler.waiting,
            **self.stats.snapshot(),
        }
