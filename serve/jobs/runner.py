"""The job runner: runs jobs in an ingress replica — a background task per job, a
progress monitor that polls the denoising loops, cancellation. No Ray."""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from serve.jobs.progress import (
    CombinedTracker, LoopProgress, ProgressReport, StageTracker, decoder_steps_of, prior_steps_of,
)
from serve.jobs.store import AsyncJobStore
from serve.settings import JobSettings

logger = logging.getLogger("kandinsky_serve.jobs")


class JobBackend(Protocol):
    """What the runner needs from the service (the Ray ingress, or a fake)."""

    async def generate_job(self, spec: Any, job_id: str) -> Any:
        """Run ``spec`` with ``job_id`` as its request id; an ``EncodedImages``. Cancelling
        the awaiting task must cancel every stage call."""
        ...

    async def loop_progress(self, spec: Any, job_id: str) -> LoopProgress:
        """Where the request stands in the prior and the denoiser (one poll)."""
        ...

    async def preview(self, spec: Any, job_id: str, max_side: int) -> tuple[bytes, str] | None:
        """A small image of the request's current latents (first image), or None."""
        ...


class WebhookDelivery(Protocol):
    """What the runner (and the route that vets a job's URL) needs to call a job's webhook
    (``serve.jobs.webhooks.WebhookSender``)."""

    async def check(self, url: str) -> Any:
        """Raise ``WebhookRefused`` (why) unless ``url`` may be called: the SSRF guard."""
        ...

    async def deliver(self, url: str, payload: dict, event: str) -> Any: ...


class SweepWork(Protocol):
    """What the runner needs from a sweep job (``serve.http.sweep.SweepPlan``)."""

    specs: list[Any]
    """Its cells' specs, in cell order."""

    def record(self) -> dict:
        """What the store keeps of it before it runs (JSON)."""
        ...

    async def run(self, generate: Callable[[int, Any], Awaitable[Any]]) -> Any:
        """Every cell through ``generate(number, spec)``; a ``SweepOutcome``, or :class:`JobFailed`."""
        ...


class JobFailed(Exception):
    """A failure the store records as it is: its ``kind`` and a message fit for the client."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass
class Submission:
    """A validated job, ready to run."""

    spec: Any
    """What it generates; a sweep's first cell (whose size and model every cell has)."""
    mode: str
    client: str
    origin: str = "jobs"
    preview_every: int = 0
    priority: int = 0
    webhook_url: str | None = None
    """Called (POST, signed) with the job's final view when it ends; already vetted by the SSRF guard."""
    idempotency_key: str | None = None
    fingerprint: str | None = None
    sweep: SweepWork | None = None
    """A sweep job: its cells run in place of ``spec``, each under a request id of its own."""


class PrioritySlots:
    """A semaphore whose waiters are served highest priority first, first come first served
    among equals. A waiter cancelled after being handed a slot passes it on."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, future in self._waiters if not future.done())

    @asynccontextmanager
    async def held(self, priority: int = 0):
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, priority: int = 0) -> None:
        if self.in_use < self.capacity and not self.waiting:
            self.in_use += 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed a slot just as it was cancelled
            raise

    def release(self) -> None:
        while self._waiters:
            *_, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # the slot passes straight to the waiter
                return
        self.in_use -= 1


class JobRunner:
    """Runs jobs in this process: one asyncio task per job, at most ``max_running_jobs``
    at once, each watched by a progress monitor.

    Cancellation: cancelling a job's task cancels its generation (and, through the
    backend, every stage call); a loop drops the request at its next step boundary.
    A cancel that reaches another replica is recorded in the store; the job's own
    runner sees it at its next progress report.
    """

    def __init__(self, store: AsyncJobStore, backend: JobBackend, settings: JobSettings | None = None,
                 owner: str | None = None, webhooks: WebhookDelivery | None = None) -> None:
        self.store = store
        self.backend = backend
        self.settings = settings or JobSettings()
        self.owner = owner or f"runner-{uuid.uuid4().hex[:8]}"
        self.webhooks = webhooks
        self._tasks: dict[str, asyncio.Task] = {}
        self._deliveries: set[asyncio.Task] = set()
        self._slots = PrioritySlots(self.settings.max_running_jobs)

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def join(self) -> None:
        """Until every job started here (queued or running) has ended and its webhook been called."""
        while self._tasks or self._deliveries:
            await asyncio.wait([*self._tasks.values(), *self._deliveries])

    async def submit(self, submission: Submission) -> dict:
        """Create and start a job; its first view, or what stopped it (see :meth:`AsyncJobStore.create`:
        ``{"limit", "retry_after_s"}``, ``{"replayed": view}``, ``{"conflict": message}``)."""
        spec, sweep = submission.spec, submission.sweep
        job_id = uuid.uuid4().hex
        seeds = [seed for cell in ([spec] if sweep is None else sweep.specs) for seed in cell.seeds]
        view = await self.store.create(
            job_id, submission.client, submission.mode, spec.width, spec.height, seeds,
            submission.origin, self.owner, submission.priority, submission.idempotency_key, submission.fingerprint,
            spec.model, None if sweep is None else sweep.record(),
        )
        if "limit" in view or "replayed" in view or "conflict" in view:
            return view
        # A fresh context: the job is not a child of the HTTP request that submitted it
        # (Ray Serve would otherwise tie its stage calls to that request's lifetime).
        task = asyncio.get_running_loop().create_task(
            self._run(job_id, submission), name=f"job-{job_id}", context=contextvars.Context()
        )
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))
        return view

    def is_local(self, job_id: str) -> bool:
        return job_id in self._tasks

    async def cancel(self, job_id: str, wait_s: float = 10.0, client: str | None = None) -> tuple[str, dict | None]:
        """Cancel a job: the store's outcome (see :meth:`JobStore.cancel`) and the job's view.

        A job running here is stopped at once and its final view returned; one running
        in another replica stops at that runner's next report (state still ``running``,
        ``cancel_requested`` true). ``client``: only if it is that client's job.
        """
        outcome, view = await self.store.cancel(job_id, client)
        task = self._tasks.get(job_id)
        if task is not None and outcome in ("cancelled", "cancelling"):
            task.cancel()
            await asyncio.wait([task], timeout=wait_s)
            view = await self.store.view(job_id)
        return outcome, view

    async def wait(self, job_id: str) -> dict | None:
        """Wait for a job started here to finish; its final view. If the waiter is
        cancelled (its HTTP client went away), the job is cancelled too."""
        task = self._tasks.get(job_id)
        if task is not None:
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.done():
                    task.cancel()  # the job records itself as cancelled
                raise
        return await self.store.view(job_id)

    async def _run(self, job_id: str, submission: Submission) -> None:
        waiting = asyncio.get_running_loop().create_task(self._heartbeat_while_queued(job_id))
        try:
            async with self._slots.held(submission.priority):
                waiting.cancel()
                if not await self.store.start(job_id, self.owner):
                    return  # cancelled while queued: it never starts
                await self._execute(job_id, submission)
        except asyncio.CancelledError:
            await asyncio.shield(self.store.mark_cancelled(job_id))
        except JobFailed as error:
            logger.exception("job %s failed", job_id)
            await asyncio.shield(self.store.fail(job_id, error.kind, error.message))
        except Exception as error:  # the store must hear of every ending
            logger.exception("job %s failed", job_id)
            await asyncio.shield(self.store.fail(job_id, "generation_failed", f"generation failed: {type(error).__name__}"))
        finally:
            waiting.cancel()
            if submission.webhook_url is not None:
                self._call_webhook(job_id, submission.webhook_url)

    def _call_webhook(self, job_id: str, url: str) -> None:
        """In the background (the job's own task is ending, maybe cancelled): POST its final view."""
        async def deliver() -> None:
            try:
                view = await self.store.view(job_id)
                if view is None or view["state"] not in ("succeeded", "failed", "cancelled"):
                    logger.warning("job %s: no final state to send to its webhook (%s)", job_id,
                                   "expired" if view is None else view["state"])
                    return
                if self.webhooks is None:
                    logger.warning("job %s: has a webhook but this runner sends none", job_id)
                    return
                await self.webhooks.deliver(url, {"event": f"job.{view['state']}", "job": view}, f"job.{view['state']}")
            except Exception:  # never lost silently
                logger.exception("job %s: webhook delivery failed", job_id)

        task = asyncio.get_running_loop().create_task(deliver(), name=f"webhook-{job_id}", context=contextvars.Context())
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _heartbeat_while_queued(self, job_id: str) -> None:
        """A queued job's lease is renewed while it waits for a slot; a cancel recorded
        elsewhere is noticed here (the job then never starts)."""
        while True:
            await asyncio.sleep(min(self.settings.lease_s / 3, 5.0))
            if await self.store.heartbeat(job_id):
                task = self._tasks.get(job_id)
                if task is not None:
                    task.cancel()
                return

    async def _execute(self, job_id: str, submission: Submission) -> None:
        job_task = asyncio.current_task()
        assert job_task is not None
        sweep = submission.sweep
        specs = [submission.spec] if sweep is None else sweep.specs
        # The loops key progress by request id: a sweep's cells run under ids of their own.
        request_ids = [job_id] if sweep is None else [f"{job_id}.{number}" for number in range(len(specs))]
        tracker = CombinedTracker([StageTracker(prior_steps_of(spec), decoder_steps_of(spec)) for spec in specs])
        monitor = asyncio.get_running_loop().create_task(
            self._monitor(job_id, submission, list(zip(specs, request_ids)), tracker, job_task))

        async def cell(number: int, spec: Any) -> Any:
            result = await self.backend.generate_job(spec, request_ids[number])
            tracker.trackers[number].finish()
            return result

        try:
            if sweep is None:
                result = await self.backend.generate_job(submission.spec, job_id)
            else:
                outcome = await sweep.run(cell)
        finally:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        if sweep is not None:
            await self.store.succeed(job_id, outcome.images, outcome.media_type, outcome.seeds, {}, outcome.record)
            return
        timings = {stage: dict(vars(timing)) for stage, timing in result.timings.items()}
        await self.store.succeed(job_id, list(result.images), result.media_type, list(result.seeds), timings,
                                 checks=result.checks_json())

    async def _monitor(self, job_id: str, submission: Submission, requests: list[tuple[Any, str]],
                       tracker: CombinedTracker, job_task: asyncio.Task) -> None:
        """``requests``: each ``(spec, request id)`` the job runs; previews are of the first one's image 0."""
        last_preview_step = 0
        preview: asyncio.Task | None = None
        try:
            while True:
                polls = await asyncio.gather(*(self._poll(job_id, spec, request_id, followed)
                                               for (spec, request_id), followed in zip(requests, tracker.trackers)))
                report = tracker.update(polls)
                if await self.store.report(job_id, report.stage, report.step, report.steps, report.progress):
                    job_task.cancel()  # cancelled through another replica
                    return
                every, first = submission.preview_every, tracker.trackers[0].report()
                if (every and first.stage == "denoise" and first.step - last_preview_step >= every
                        and first.step < first.steps and (preview is None or preview.done())):
                    last_preview_step = first.step
                    preview = asyncio.get_running_loop().create_task(self._preview(job_id, *requests[0], first))
                await asyncio.sleep(self.settings.progress_interval_s)
        finally:
            if preview is not None:
                preview.cancel()

    async def _poll(self, job_id: str, spec: Any, request_id: str, tracker: StageTracker) -> LoopProgress | None:
        if tracker.finished:
            return None
        try:
            return await self.backend.loop_progress(spec, request_id)
        except Exception:  # a lost poll only delays progress
            logger.warning("job %s: progress poll failed", job_id, exc_info=True)
            return None

    async def _preview(self, job_id: str, spec: Any, request_id: str, report: ProgressReport) -> None:
        """Best effort, off the denoiser's path: a failed preview is logged and skipped."""
        try:
            found = await self.backend.preview(spec, request_id, self.settings.preview_max_side)
        except Exception:
            logger.warning("job %s: preview failed", job_id, exc_info=True)
            return
        if found is not None:
            await self.store.add_preview(job_id, report.step, report.steps, *found)
