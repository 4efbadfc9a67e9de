"""Jobs: asynchronous generations with live progress and cancellation — without Ray.

Three pieces, each usable on its own:

* :class:`JobStore` — every job's state, progress, events and result images, with
  the caps and the TTL. Plain synchronous Python. In the service it lives in one
  named Ray actor (``serve/job_actor.py``) outside the ingress replicas, so jobs
  survive an ingress replica restart;
* :class:`AsyncJobStore` — the store's async face: the same calls as coroutines, plus
  long-polling for new events. It is the body of that actor, and the in-process
  store of unit tests;
* :class:`JobRunner` — runs jobs in an ingress replica: a background task per job,
  a progress monitor that polls the denoising loops, cancellation.

:class:`StageTracker` turns what the loops report into a stage, a step i of n and
a 0–1 progress that only moves forward.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger("kandinsky_serve.jobs")

JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
STAGES = ("encode", "prior", "denoise", "decode")

# Shares of the 0-1 progress: encoding and decoding are short; the two loops share
# the rest by their step counts, a prior step costing about a quarter of a U-Net step
# (the prior is a small transformer over one embedding; the U-Net runs over the
# latents). Only the shape of the curve depends on these, never its monotonicity.
ENCODE_SHARE = 0.02
DECODE_SHARE = 0.05
PRIOR_STEP_COST = 0.25
MAX_EVENTS_PER_JOB = 5000
"""Events kept per job; past it, progress events stop being recorded (state changes always are)."""


class JobSettings(BaseModel):
    """``args.jobs``: where job state lives, how long it is kept, how many jobs at once."""

    model_config = ConfigDict(extra="forbid")

    store_name: str = Field(default="kandinsky-serve-jobs", min_length=1, max_length=100)
    """Name of the detached Ray actor holding job state (namespace ``kandinsky-serve``).
    Every ingress replica of every deployment that names the same store shares it."""
    ttl_s: float = Field(default=3600.0, gt=0)
    """Finished jobs (and their images) are forgotten this long after they finish."""
    max_active_jobs_per_client: int = Field(default=8, ge=1)
    """Queued plus running jobs of one client; more get 429 with Retry-After."""
    max_active_jobs: int = Field(default=256, ge=1)
    """Queued plus running jobs of all clients; more get 429 with Retry-After."""
    max_stored_jobs: int = Field(default=1024, ge=1)
    """Jobs held at once, finished ones included; more get 429."""
    max_stored_image_bytes: int = Field(default=1024**3, ge=1)
    """Result images held at once, in bytes (they live in the store actor's memory); past it,
    new jobs get 429 until finished jobs expire."""
    max_running_jobs: int = Field(default=16, ge=1)
    """Jobs one ingress replica runs at once; the others wait in state ``queued``."""
    progress_interval_s: float = Field(default=0.2, gt=0, le=5.0)
    """How often a running job polls the denoising loops for its progress."""
    lease_s: float = Field(default=30.0, gt=0)
    """A queued or running job whose replica has not reported for this long (the replica
    died) is failed with ``runner_lost``."""
    preview_max_side: int = Field(default=128, ge=16, le=512)
    """Longest side of a preview image, in pixels."""


class JobLimitError(Exception):
    """A cap on jobs is reached; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass
class Job:
    id: str
    client: str
    mode: str
    origin: str
    """Which API submitted it: ``jobs``, ``openai`` or ``sdapi``."""
    width: int
    height: int
    seeds: list[int]
    created_at: float
    state: str = "queued"
    stage: str | None = None
    step: int = 0
    steps: int = 0
    progress: float = 0.0
    eta_s: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float = 0.0
    owner: str | None = None
    cancel_requested: bool = False
    error: dict | None = None
    images: list[bytes] = field(default_factory=list, repr=False)
    media_type: str | None = None
    stage_timings: dict = field(default_factory=dict)
    events: list[dict] = field(default_factory=list, repr=False)
    next_seq: int = 1
    preview: dict | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


def job_urls(job_id: str) -> dict[str, str]:
    base = f"/v1/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "cancel": base}


def job_view(job: Job) -> dict:
    """What ``GET /v1/jobs/{id}`` returns (and every state and progress event carries).

    Only absolute times, so a finished job's view never changes.
    """
    queue_s = None if job.started_at is None else job.started_at - job.created_at
    end = job.finished_at
    run_s = None if job.started_at is None or end is None else end - job.started_at
    images = [
        {"index": i, "url": f"/v1/jobs/{job.id}/images/{i}", "media_type": job.media_type, "seed": seed}
        for i, seed in enumerate(job.seeds[: len(job.images)])
    ]
    return {
        "id": job.id,
        "mode": job.mode,
        "origin": job.origin,
        "state": job.state,
        "stage": job.stage,
        "step": job.step,
        "steps": job.steps,
        "progress": round(job.progress, 4),
        "eta_s": None if job.eta_s is None else round(job.eta_s, 2),
        "cancel_requested": job.cancel_requested,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "timings": {
            "queue_s": None if queue_s is None else round(queue_s, 4),
            "run_s": None if run_s is None else round(run_s, 4),
            "stages": job.stage_timings,
        },
        "width": job.width,
        "height": job.height,
        "seeds": list(job.seeds),
        "images": images,
        "error": job.error,
        "urls": job_urls(job.id),
    }


class JobStore:
    """Every job's state, events and images, in memory; the caps and the TTL.

    Invariants: a job's progress never decreases; its events are numbered 1, 2, ...
    in the order they happened; the last event of a finished job is a ``state`` event
    carrying its final view, which equals what :meth:`view` returns from then on.
    """

    def __init__(self, settings: JobSettings | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings or JobSettings()
        self.clock = clock
        self._jobs: dict[str, Job] = {}

    # -- creating and reading ------------------------------------------------

    def create(self, job_id: str, client: str, mode: str, width: int, height: int, seeds: list[int],
               origin: str = "jobs", owner: str | None = None) -> dict:
        """A new queued job, or :class:`JobLimitError` when a cap is reached."""
        now = self.clock()
        self.sweep()
        if job_id in self._jobs:
            raise ValueError(f"job {job_id} exists")
        active = [job for job in self._jobs.values() if not job.finished]
        mine = [job for job in active if job.client == client]
        s = self.settings
        if len(mine) >= s.max_active_jobs_per_client:
            raise JobLimitError(
                f"this client has {len(mine)} jobs queued or running, the most allowed "
                f"(max_active_jobs_per_client={s.max_active_jobs_per_client}); wait for one to finish",
                self._retry_after(mine),
            )
        if len(active) >= s.max_active_jobs:
            raise JobLimitError(
                f"{len(active)} jobs are queued or running, the most allowed (max_active_jobs={s.max_active_jobs})",
                self._retry_after(active),
            )
        stored_bytes = sum(len(image) for job in self._jobs.values() for image in job.images)
        if len(self._jobs) >= s.max_stored_jobs or stored_bytes >= s.max_stored_image_bytes:
            finished = [job.finished_at for job in self._jobs.values() if job.finished_at is not None]
            wait = min(finished) + s.ttl_s - now if finished else None
            what = (f"{len(self._jobs)} jobs are stored, the most allowed (max_stored_jobs={s.max_stored_jobs})"
                    if len(self._jobs) >= s.max_stored_jobs else
                    f"{stored_bytes} bytes of images are stored, the most allowed "
                    f"(max_stored_image_bytes={s.max_stored_image_bytes})")
            raise JobLimitError(what, _whole_seconds(wait) if wait is not None else self._retry_after(active))
        job = Job(job_id, client, mode, origin, width, height, list(seeds), created_at=now, heartbeat_at=now, owner=owner)
        self._jobs[job_id] = job
        self._emit(job, "state")
        return job_view(job)

    def _retry_after(self, jobs: list[Job]) -> int:
        """Seconds until the soonest of ``jobs`` should finish (its ETA), at least 1."""
        etas = [job.eta_s for job in jobs if job.eta_s is not None]
        return _whole_seconds(min(etas)) if etas else 1

    def view(self, job_id: str) -> dict | None:
        self.sweep()
        job = self._jobs.get(job_id)
        return None if job is None else job_view(job)

    def image(self, job_id: str, index: int) -> tuple[bytes, str] | None:
        job = self._jobs.get(job_id)
        if job is None or not 0 <= index < len(job.images):
            return None
        return job.images[index], job.media_type or "application/octet-stream"

    def events_after(self, job_id: str, seq: int) -> tuple[list[dict], bool] | None:
        """Events numbered after ``seq``, and whether the job has finished; None if unknown."""
        self.sweep()
        job = self._jobs.get(job_id)
        if job is None:
            return None
        return [event for event in job.events if event["seq"] > seq], job.finished

    def active(self, client: str | None = None, origin: str | None = None) -> list[dict]:
        """Views of queued and running jobs, oldest first, optionally of one client and origin."""
        self.sweep()
        return [
            job_view(job) for job in sorted(self._jobs.values(), key=lambda j: j.created_at)
            if not job.finished and (client is None or job.client == client) and (origin is None or job.origin == origin)
        ]

    # -- the runner's reports --------------------------------------------------

    def start(self, job_id: str, owner: str) -> bool:
        """The runner is about to start the job; False if it must not (cancelled, unknown)."""
        job = self._jobs.get(job_id)
        if job is None or job.finished or job.cancel_requested:
            return False
        now = self.clock()
        job.state, job.stage, job.started_at, job.heartbeat_at, job.owner = "running", "encode", now, now, owner
        self._emit(job, "state")
        return True

    def report(self, job_id: str, stage: str | None, step: int, steps: int, progress: float) -> bool:
        """Progress of a running job (also its runner's heartbeat); True if it should be cancelled."""
        job = self._jobs.get(job_id)
        if job is None or job.finished:
            return job is not None and job.cancel_requested
        now = self.clock()
        job.heartbeat_at = now
        progress = max(job.progress, min(1.0, float(progress)))  # only forward
        if (stage, step, steps, round(progress, 4)) != (job.stage, job.step, job.steps, round(job.progress, 4)):
            job.stage, job.step, job.steps, job.progress = stage, step, steps, progress
            if job.started_at is not None and progress >= 0.02:
                elapsed = now - job.started_at
                job.eta_s = elapsed * (1.0 - progress) / progress
            if len(job.events) < MAX_EVENTS_PER_JOB:
                self._emit(job, "progress")
        return job.cancel_requested

    def heartbeat(self, job_id: str) -> bool:
        """The runner still holds a (queued) job; True if it should be cancelled."""
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.heartbeat_at = self.clock()
        return job.cancel_requested

    def add_preview(self, job_id: str, step: int, steps: int, image: bytes, media_type: str) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.finished:
            return
        job.preview = {"step": step, "steps": steps, "media_type": media_type,
                       "image": base64.b64encode(image).decode("ascii")}
        if len(job.events) < MAX_EVENTS_PER_JOB:
            self._emit(job, "preview", dict(job.preview))

    def succeed(self, job_id: str, images: list[bytes], media_type: str, seeds: list[int], stage_timings: dict) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.finished:
            return
        job.images, job.media_type, job.seeds, job.stage_timings = list(images), media_type, list(seeds), stage_timings
        job.progress, job.eta_s = 1.0, 0.0
        if job.steps:
            job.step = job.steps
        self._finish(job, "succeeded")

    def fail(self, job_id: str, kind: str, message: str) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.finished:
            return
        job.error = {"type": kind, "message": message}
        self._finish(job, "failed")

    def mark_cancelled(self, job_id: str) -> None:
        """The runner stopped the job (or it never started)."""
        job = self._jobs.get(job_id)
        if job is None or job.finished:
            return
        job.cancel_requested = True
        self._finish(job, "cancelled")

    def cancel(self, job_id: str) -> tuple[str, dict | None]:
        """A client's cancel: ``("unknown", None)``, ``("finished", view)``, ``("cancelled", view)``
        (a queued job, which now never starts) or ``("cancelling", view)`` (a running one:
        its runner stops it at its next report, or at once if it is local)."""
        self.sweep()
        job = self._jobs.get(job_id)
        if job is None:
            return "unknown", None
        if job.finished:
            return "finished", job_view(job)
        job.cancel_requested = True
        if job.state == "queued":
            self._finish(job, "cancelled")
            return "cancelled", job_view(job)
        self._emit(job, "progress")
        return "cancelling", job_view(job)

    # -- housekeeping ------------------------------------------------------------

    def sweep(self) -> None:
        """Forget finished jobs past their TTL; fail jobs whose replica stopped reporting."""
        now = self.clock()
        ttl, lease = self.settings.ttl_s, self.settings.lease_s
        for job_id, job in list(self._jobs.items()):
            if job.finished:
                if job.finished_at is not None and now - job.finished_at > ttl:
                    del self._jobs[job_id]
            elif now - job.heartbeat_at > lease:
                job.error = {
                    "type": "runner_lost",
                    "message": f"the replica running this job stopped reporting for over {lease:g} s (it was restarted "
                               "or died); submit the job again",
                }
                self._finish(job, "failed")

    def __len__(self) -> int:
        return len(self._jobs)

    def _finish(self, job: Job, state: str) -> None:
        job.state, job.finished_at = state, self.clock()
        if state != "succeeded":
            job.eta_s = None
        job.stage = None
        self._emit(job, "state")

    def _emit(self, job: Job, kind: str, data: dict | None = None) -> None:
        job.events.append({"seq": job.next_seq, "event": kind, "data": data if data is not None else job_view(job)})
        job.next_seq += 1


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


class AsyncJobStore:
    """:class:`JobStore` as coroutines, with long-polling for events.

    The body of the job-store actor (one event loop: calls never interleave inside
    a store method), and the in-process store of tests.
    """

    def __init__(self, settings: dict | JobSettings | None = None) -> None:
        self.store = JobStore(JobSettings.model_validate(settings or {}) if not isinstance(settings, JobSettings) else settings)
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        condition = self._condition()
        async with condition:
            condition.notify_all()

    async def create(self, job_id: str, client: str, mode: str, width: int, height: int, seeds: list[int],
                     origin: str = "jobs", owner: str | None = None) -> dict:
        """Like :meth:`JobStore.create`, but a cap reached is returned, not raised (it crosses Ray):
        ``{"limit": message, "retry_after_s": n}``."""
        try:
            view = self.store.create(job_id, client, mode, width, height, seeds, origin, owner)
        except JobLimitError as error:
            return {"limit": error.message, "retry_after_s": error.retry_after_s}
        await self._notify()
        return view

    async def view(self, job_id: str) -> dict | None:
        return self.store.view(job_id)

    async def image(self, job_id: str, index: int) -> tuple[bytes, str] | None:
        return self.store.image(job_id, index)

    async def active(self, client: str | None = None, origin: str | None = None) -> list[dict]:
        return self.store.active(client, origin)

    async def start(self, job_id: str, owner: str) -> bool:
        started = self.store.start(job_id, owner)
        await self._notify()
        return started

    async def report(self, job_id: str, stage: str | None, step: int, steps: int, progress: float) -> bool:
        cancel = self.store.report(job_id, stage, step, steps, progress)
        await self._notify()
        return cancel

    async def heartbeat(self, job_id: str) -> bool:
        return self.store.heartbeat(job_id)

    async def add_preview(self, job_id: str, step: int, steps: int, image: bytes, media_type: str) -> None:
        self.store.add_preview(job_id, step, steps, image, media_type)
        await self._notify()

    async def succeed(self, job_id: str, images: list[bytes], media_type: str, seeds: list[int], stage_timings: dict) -> dict | None:
        self.store.succeed(job_id, images, media_type, seeds, stage_timings)
        await self._notify()
        return self.store.view(job_id)

    async def fail(self, job_id: str, kind: str, message: str) -> dict | None:
        self.store.fail(job_id, kind, message)
        await self._notify()
        return self.store.view(job_id)

    async def mark_cancelled(self, job_id: str) -> dict | None:
        self.store.mark_cancelled(job_id)
        await self._notify()
        return self.store.view(job_id)

    async def cancel(self, job_id: str) -> tuple[str, dict | None]:
        outcome = self.store.cancel(job_id)
        await self._notify()
        return outcome

    async def wait_events(self, job_id: str, after: int, timeout_s: float) -> tuple[list[dict], bool] | None:
        """Events after ``after`` as soon as there are any (or the job has finished), waiting
        at most ``timeout_s``; ``(events, finished)``, or None for an unknown job."""
        deadline = time.monotonic() + timeout_s
        condition = self._condition()
        while True:
            found = self.store.events_after(job_id, after)
            if found is None or found[0] or found[1]:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return found
            async with condition:
                try:
                    await asyncio.wait_for(condition.wait(), timeout=remaining)
                except asyncio.TimeoutError:
                    pass

    async def sweep(self) -> int:
        """Expire and fail what is due now (also done on every read); the number of jobs held."""
        self.store.sweep()
        await self._notify()
        return len(self.store)


# -- progress ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoopProgress:
    """What one poll of the two loops says about a request: image-steps ``(done, total)``
    while it is in that loop's replica, else None."""

    prior: tuple[int, int] | None = None
    denoise: tuple[int, int] | None = None


@dataclass(frozen=True)
class ProgressReport:
    stage: str
    step: int
    steps: int
    progress: float


class StageTracker:
    """Maps loop polls of one job to its stage, step i of n and a 0-1 progress.

    Stages go ``encode -> prior -> denoise -> decode`` and never back: a loop seen
    and then gone is done. The progress is a weighted sum of the stages done and
    the running loop's fraction of image-steps, so it moves forward as long as each
    loop's own count does (the store also clamps it).
    """

    def __init__(self, prior_steps: int, decoder_steps: int) -> None:
        self.prior_steps = max(1, prior_steps)
        self.decoder_steps = max(1, decoder_steps)
        loops = 1.0 - ENCODE_SHARE - DECODE_SHARE
        prior_cost = PRIOR_STEP_COST * self.prior_steps
        self.prior_share = loops * prior_cost / (prior_cost + self.decoder_steps)
        self.denoise_share = loops - self.prior_share
        self.stage_index = 0
        self.prior_fraction = 0.0
        self.denoise_fraction = 0.0

    def update(self, poll: LoopProgress | None) -> ProgressReport:
        if poll is not None:
            if poll.denoise is not None:
                self._advance(2)
                self.prior_fraction = 1.0
                self.denoise_fraction = max(self.denoise_fraction, _fraction(poll.denoise))
            elif self.stage_index == 2 and self.denoise_fraction > 0:
                self._advance(3)  # the denoiser had it and no longer has it: decoding
                self.denoise_fraction = 1.0
            if poll.prior is not None and self.stage_index <= 1:
                self._advance(1)
                self.prior_fraction = max(self.prior_fraction, _fraction(poll.prior))
            elif poll.prior is None and self.stage_index == 1:
                self._advance(2)  # the prior had it and no longer has it: on to the denoiser
                self.prior_fraction = 1.0
        return self.report()

    def _advance(self, index: int) -> None:
        self.stage_index = max(self.stage_index, index)

    def report(self) -> ProgressReport:
        stage = STAGES[self.stage_index]
        progress = ENCODE_SHARE if self.stage_index >= 1 else 0.0
        progress += self.prior_share * self.prior_fraction + self.denoise_share * self.denoise_fraction
        if self.stage_index == 3:
            progress = 1.0 - DECODE_SHARE
        if stage == "prior":
            step, steps = round(self.prior_fraction * self.prior_steps), self.prior_steps
        elif stage in ("denoise", "decode"):
            step, steps = round(self.denoise_fraction * self.decoder_steps), self.decoder_steps
        else:
            step, steps = 0, self.prior_steps
        return ProgressReport(stage, step, steps, min(progress, 1.0))


def _fraction(done_total: tuple[int, int]) -> float:
    done, total = done_total
    return min(1.0, done / total) if total else 1.0


def decoder_steps_of(spec: Any) -> int:
    """The U-Net steps a spec's images actually run (image-to-image skips the first ones)."""
    from deployments.denoiser import strength_start

    if spec.mode in ("img2img", "controlnet") and spec.strength is not None:
        return spec.steps - strength_start(spec.steps, spec.strength)
    return spec.steps


def prior_steps_of(spec: Any) -> int:
    if spec.mode == "variations" and spec.strength is not None:
        return max(1, min(int(spec.prior_steps * spec.strength), spec.prior_steps))
    return spec.prior_steps


# -- the runner ---------------------------------------------------------------------


class JobStoreClient(Protocol):
    """The store's calls as the runner and the routes make them (an :class:`AsyncJobStore`
    in process, or the actor behind ``serve.job_actor.ActorJobStore``)."""

    async def create(self, job_id: str, client: str, mode: str, width: int, height: int, seeds: list[int],
                     origin: str = "jobs", owner: str | None = None) -> dict: ...

    async def view(self, job_id: str) -> dict | None: ...

    async def image(self, job_id: str, index: int) -> tuple[bytes, str] | None: ...

    async def active(self, client: str | None = None, origin: str | None = None) -> list[dict]: ...

    async def start(self, job_id: str, owner: str) -> bool: ...

    async def report(self, job_id: str, stage: str | None, step: int, steps: int, progress: float) -> bool: ...

    async def heartbeat(self, job_id: str) -> bool: ...

    async def add_preview(self, job_id: str, step: int, steps: int, image: bytes, media_type: str) -> None: ...

    async def succeed(self, job_id: str, images: list[bytes], media_type: str, seeds: list[int], stage_timings: dict) -> dict | None: ...

    async def fail(self, job_id: str, kind: str, message: str) -> dict | None: ...

    async def mark_cancelled(self, job_id: str) -> dict | None: ...

    async def cancel(self, job_id: str) -> tuple[str, dict | None]: ...

    async def wait_events(self, job_id: str, after: int, timeout_s: float) -> tuple[list[dict], bool] | None: ...


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

    def __init__(self, store: JobStoreClient, backend: JobBackend, settings: JobSettings | None = None,
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

    async def cancel(self, job_id: str, wait_s: float = 10.0) -> tuple[str, dict | None]:
        """Cancel a job: the store's outcome (see :meth:`JobStore.cancel`) and the job's view.

        A job running here is stopped at once and its final view returned; one running
        in another replica stops at that runner's next report (state still ``running``,
        ``cancel_requested`` true).
        """
        outcome, view = await self.store.cancel(job_id)
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
