"""The job runner: runs jobs in an ingress replica — a background task per job, a
progress monitor that polls the denoising loops, cancellation. No Ray."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from serve.jobs.progress import LoopProgress, ProgressReport, StageTracker, decoder_steps_of, prior_steps_of
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


@dataclass
class Submission:
    """A validated job, ready to run."""

    spec: Any
    mode: str
    client: str
    origin: str = "jobs"
    preview_every: int = 0


class JobRunner:
    """Runs jobs in this process: one asyncio task per job, at most ``max_running_jobs``
    at once, each watched by a progress monitor.

    Cancellation: cancelling a job's task cancels its generation (and, through the
    backend, every stage call); a loop drops the request at its next step boundary.
    A cancel that reaches another replica is recorded in the store; the job's own
    runner sees it at its next progress report.
    """

    def __init__(self, store: AsyncJobStore, backend: JobBackend, settings: JobSettings | None = None,
                 owner: str | None = None) -> None:
        self.store = store
        self.backend = backend
        self.settings = settings or JobSettings()
        self.owner = owner or f"runner-{uuid.uuid4().hex[:8]}"
        self._tasks: dict[str, asyncio.Task] = {}
        self._slots: asyncio.Semaphore | None = None

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def join(self) -> None:
        """Until every job started here (queued or running) has ended."""
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def submit(self, submission: Submission) -> dict:
        """Create and start a job; its first view, or ``{"limit", "retry_after_s"}`` when a cap is reached."""
        spec = submission.spec
        job_id = uuid.uuid4().hex
        view = await self.store.create(
            job_id, submission.client, submission.mode, spec.width, spec.height, list(spec.seeds),
            submission.origin, self.owner,
        )
        if "limit" in view:
            return view
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.max_running_jobs)
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
        assert self._slots is not None
        waiting = asyncio.get_running_loop().create_task(self._heartbeat_while_queued(job_id))
        try:
            async with self._slots:
                waiting.cancel()
                if not await self.store.start(job_id, self.owner):
                    return  # cancelled while queued: it never starts
                await self._execute(job_id, submission)
        except asyncio.CancelledError:
            await asyncio.shield(self.store.mark_cancelled(job_id))
        except Exception as error:  # the store must hear of every ending
            logger.exception("job %s failed", job_id)
            await asyncio.shield(self.store.fail(job_id, "generation_failed", f"generation failed: {type(error).__name__}"))
        finally:
            waiting.cancel()

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
        monitor = asyncio.get_running_loop().create_task(self._monitor(job_id, submission, job_task))
        try:
            result = await self.backend.generate_job(submission.spec, job_id)
        finally:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        timings = {stage: dict(vars(timing)) for stage, timing in result.timings.items()}
        await self.store.succeed(job_id, list(result.images), result.media_type, list(result.seeds), timings)

    async def _monitor(self, job_id: str, submission: Submission, job_task: asyncio.Task) -> None:
        spec = submission.spec
        tracker = StageTracker(prior_steps_of(spec), decoder_steps_of(spec))
        last_preview_step = 0
        preview: asyncio.Task | None = None
        try:
            while True:
                try:
                    poll = await self.backend.loop_progress(spec, job_id)
                except Exception:  # a lost poll only delays progress
                    logger.warning("job %s: progress poll failed", job_id, exc_info=True)
                    poll = None
                report = tracker.update(poll)
                if await self.store.report(job_id, report.stage, report.step, report.steps, report.progress):
                    job_task.cancel()  # cancelled through another replica
                    return
                every = submission.preview_every
                if (every and report.stage == "denoise" and report.step - last_preview_step >= every
                        and report.step < report.steps and (preview is None or preview.done())):
                    last_preview_step = report.step
                    preview = asyncio.get_running_loop().create_task(self._preview(job_id, spec, report))
                await asyncio.sleep(self.settings.progress_interval_s)
        finally:
            if preview is not None:
                preview.cancel()

    async def _preview(self, job_id: str, spec: Any, report: ProgressReport) -> None:
        """Best effort, off the denoiser's path: a failed preview is logged and skipped."""
        try:
            found = await self.backend.preview(spec, job_id, self.settings.preview_max_side)
        except Exception:
            logger.warning("job %s: preview failed", job_id, exc_info=True)
            return
        if found is not None:
            await self.store.add_preview(job_id, report.step, report.steps, *found)
