"""The job store: every job's state, progress, events and result images, with the caps
and the TTL — plain Python, no Ray.

* :class:`JobStore` — synchronous; the whole state machine.
* :class:`AsyncJobStore` — the one interface the runner and the routes call: the same
  calls as coroutines, plus long-polling for new events. It is the body of the store
  actor (``serve.jobs.actor``), whose proxy ``ActorJobStore`` forwards exactly its
  methods, and the in-process store of unit tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from serve.jobs.database import JobDatabase
from serve.settings import JobSettings

logger = logging.getLogger("kandinsky_serve.jobs")

JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
MAX_EVENTS_PER_JOB = 5000
EVENT_OVERHEAD_BYTES = 64
"""Counted per stored event beyond its JSON (the dict and its numbering)."""
"""Events kept per job; past it, progress events stop being recorded (state changes always are)."""


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` already used by this client for a different request."""


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
    stored_bytes: int = 0
    """What this job holds in memory: result images, the preview image, events (as JSON)."""
    fetched_at: float | None = None
    """When one of its images was first read (after that, ``fetched_ttl_s`` applies)."""
    priority: int = 0
    """Higher starts sooner among queued jobs; equal priorities start first come, first served."""
    idempotency_key: str | None = None
    model: str = ""
    """The model id it runs (empty: a record from before models were named)."""
    fingerprint: str | None = None
    """A digest of the request that created it: a retry with the same ``idempotency_key``
    must carry the same request."""
    checks: list[dict] | None = None
    """``caption_check``: each image's caption and CLIP similarity, in image order."""
    sweep: dict | None = None
    """A sweep job's ``{mode, axes, cells: [{index, values, seeds, total_ms, warnings}], grid}``
    (``serve.http.sweep.SweepPlan.record``); its images are every cell's in cell order, then
    the grid's (when ``grid`` is ``{width, height}``)."""

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
    images = [_image_view(job, i, seed) for i, seed in enumerate(job.seeds[: len(job.images)])]
    return {
        "id": job.id,
        "position": None,  # the store fills it in for a queued job's GET and list (it changes as others start)
        "priority": job.priority,
        "model": job.model or None,
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
        "sweep": None if job.sweep is None else sweep_view(job, job.sweep),
    }


def sweep_view(job: Job, sweep: dict) -> dict:
    """A sweep job's axes and cells (``sweep``, its record), each with its images once the job
    has them, and its grid."""
    cells, first = [], 0
    for cell in sweep["cells"]:
        images = [_image_view(job, first + i, seed) for i, seed in enumerate(cell["seeds"]) if first + i < len(job.images)]
        cells.append({**cell, "images": images})
        first += len(cell["seeds"])
    grid = None
    if sweep["grid"] is not None and first < len(job.images):  # the grid's image follows the cells'
        grid = {**sweep["grid"], "index": first, "url": _image_url(job.id, first), "media_type": job.media_type}
    return {"mode": sweep["mode"], "axes": sweep["axes"], "cells": cells, "grid": grid}


def _image_url(job_id: str, index: int) -> str:
    return f"/v1/jobs/{job_id}/images/{index}"


def _image_view(job: Job, index: int, seed: int) -> dict:
    view = {"index": index, "url": _image_url(job.id, index), "media_type": job.media_type, "seed": seed}
    if job.checks is not None and index < len(job.checks):
        view["check"] = job.checks[index]
    return view


class JobStore:
    """Every job's state, events and images, in memory; the caps and the TTL.

    Invariants: a job's progress never decreases; its events are numbered 1, 2, ...
    in the order they happened; the last event of a finished job is a ``state`` event
    carrying its final view, which equals what :meth:`view` returns from then on.
    """

    def __init__(self, settings: JobSettings | None = None, clock: Callable[[], float] = time.time,
                 database: JobDatabase | None = None) -> None:
        self.settings = settings or JobSettings()
        self.clock = clock
        self.database = database
        self._jobs: dict[str, Job] = {}
        if database is not None:
            self._reload(database)

    def _reload(self, database: JobDatabase) -> None:
        """The jobs a previous store kept. Each starts a new event history with its current state;
        an unfinished one gets a fresh lease, so that its runner (if alive) can report again
        before it is declared lost."""
        now = self.clock()
        for job in database.load(Job):
            if not job.finished:
                job.heartbeat_at = now
            job.stored_bytes = sum(len(image) for image in job.images)
            self._jobs[job.id] = job
            self._emit(job, "state")
        self.sweep()

    def _persist(self, job: Job, with_images: bool = False) -> None:
        if self.database is None:
            return
        try:
            self.database.save(job, with_images)
        except Exception:  # the job goes on in memory; only its durability is lost
            logger.exception("job %s: could not write its record to %s", job.id, self.database.path)

    def _forget(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            del self._jobs[job_id]
        if self.database is not None and job_ids:
            try:
                self.database.delete(job_ids)
            except Exception:
                logger.exception("could not delete %d job record(s) from %s", len(job_ids), self.database.path)

    # -- creating and reading ------------------------------------------------

    def find_idempotent(self, client: str, idempotency_key: str, fingerprint: str | None) -> dict | None:
        """The view of ``client``'s stored job made with ``idempotency_key``, if any;
        :class:`IdempotencyConflict` if it was made by a different request."""
        self.sweep()
        for job in self._jobs.values():
            if job.client == client and job.idempotency_key == idempotency_key:
                if job.fingerprint != fingerprint:
                    raise IdempotencyConflict(
                        f"Idempotency-Key {idempotency_key!r} was used for a different request (job {job.id}); "
                        "a retry must repeat the same request, a new request needs a new key")
                return self._with_position(job)
        return None

    def create(self, job_id: str, client: str, mode: str, width: int, height: int, seeds: list[int],
               origin: str = "jobs", owner: str | None = None, priority: int = 0,
               idempotency_key: str | None = None, fingerprint: str | None = None, model: str = "",
               sweep: dict | None = None) -> dict:
        """A new queued job, or :class:`JobLimitError` when a cap is reached."""
        now = self.clock()
        self.sweep()
        if job_id in self._jobs:
            if self._jobs[job_id].client != client:
                raise ValueError(f"job {job_id} exists")
            return self._with_position(self._jobs[job_id])  # a repeated call (see ActorJobStore)
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
        self._make_room(client, now)
        job = Job(job_id, client, mode, origin, width, height, list(seeds), created_at=now, heartbeat_at=now, owner=owner,
                  priority=priority, idempotency_key=idempotency_key, fingerprint=fingerprint, model=model,
                  sweep=sweep)
        self._jobs[job_id] = job
        self._emit(job, "state")
        self._persist(job)
        return self._with_position(job)

    def _over_a_storage_cap(self, client: str) -> str | None:
        """Which storage cap a new job of ``client`` would exceed, if any (a message naming it)."""
        s = self.settings
        mine = [job for job in self._jobs.values() if job.client == client]
        mine_bytes = sum(job.stored_bytes for job in mine)
        all_bytes = sum(job.stored_bytes for job in self._jobs.values())
        if len(mine) >= s.max_stored_jobs_per_client:
            return (f"this client has {len(mine)} jobs stored, the most allowed "
                    f"(max_stored_jobs_per_client={s.max_stored_jobs_per_client})")
        if mine_bytes >= s.max_stored_bytes_per_client:
            return (f"this client's jobs hold {mine_bytes} bytes, the most allowed "
                    f"(max_stored_bytes_per_client={s.max_stored_bytes_per_client})")
        if len(self._jobs) >= s.max_stored_jobs:
            return f"{len(self._jobs)} jobs are stored, the most allowed (max_stored_jobs={s.max_stored_jobs})"
        if all_bytes >= s.max_stored_bytes:
            return f"{all_bytes} bytes are stored, the most allowed (max_stored_bytes={s.max_stored_bytes})"
        return None

    def _make_room(self, client: str, now: float) -> None:
        """Drop ``client``'s own oldest finished jobs while a storage cap is in the way; raise
        :class:`JobLimitError` if that is not enough. Other clients' jobs are never dropped."""
        while (over := self._over_a_storage_cap(client)) is not None:
            own_finished = [job for job in self._jobs.values() if job.client == client and job.finished]
            if not own_finished:
                expiries = [self._expires_at(job) for job in self._jobs.values() if job.finished]
                active = [job for job in self._jobs.values() if not job.finished]
                wait = _whole_seconds(min(expiries) - now) if expiries else self._retry_after(active)
                raise JobLimitError(over, wait)
            oldest = min(own_finished, key=lambda job: job.finished_at or 0.0)
            self._forget([oldest.id])

    def _expires_at(self, job: Job) -> float:
        """When a finished job is forgotten: ``ttl_s`` after it finished, or ``fetched_ttl_s``
        after its images were first read, whichever comes first."""
        s = self.settings
        end = (job.finished_at or self.clock()) + s.ttl_s
        return end if job.fetched_at is None else min(end, job.fetched_at + s.fetched_ttl_s)

    def _retry_after(self, jobs: list[Job]) -> int:
        """Seconds until the soonest of ``jobs`` should finish (its ETA), at least 1."""
        etas = [job.eta_s for job in jobs if job.eta_s is not None]
        return _whole_seconds(min(etas)) if etas else 1

    def _job(self, job_id: str, client: str | None) -> Job | None:
        """The job, if ``client`` may see it: ``None`` is everyone (the service itself, an admin);
        a client's request for another client's job finds nothing, exactly as for an unknown id."""
        job = self._jobs.get(job_id)
        if job is None or (client is not None and job.client != client):
            return None
        return job

    def view(self, job_id: str, client: str | None = None) -> dict | None:
        self.sweep()
        job = self._job(job_id, client)
        return None if job is None else self._with_position(job)

    def _with_position(self, job: Job, positions: dict[str, int] | None = None) -> dict:
        """The job's view and, while it waits, how many jobs are ahead of it in the queue
        (queued earlier, by anyone): 0 is next. ``positions``: :meth:`_queue_positions`,
        when several views are made at once."""
        view = job_view(job)
        if job.state == "queued":
            view["position"] = (positions if positions is not None else self._queue_positions())[job.id]
        return view

    def _queue_positions(self) -> dict[str, int]:
        # The order runners start jobs in: higher priority first, then first come, first served.
        queued = sorted((job for job in self._jobs.values() if job.state == "queued"),
                        key=lambda j: (-j.priority, j.created_at, j.id))
        return {job.id: position for position, job in enumerate(queued)}

    def list_jobs(self, client: str | None, state: str | None = None, limit: int = 20,
                  before: str | None = None) -> dict | None:
        """``client``'s jobs (None: everyone's), newest first, ``limit`` at most, optionally in
        one ``state``, and older than job ``before`` (the previous page's ``next``). None when
        ``before`` is no job of theirs (any more)."""
        self.sweep()
        mine = sorted((job for job in self._jobs.values() if client is None or job.client == client),
                      key=lambda job: (job.created_at, job.id), reverse=True)
        if before is not None:
            cursor = self._job(before, client)
            if cursor is None:
                return None
            mine = [job for job in mine if (job.created_at, job.id) < (cursor.created_at, cursor.id)]
        if state is not None:
            mine = [job for job in mine if job.state == state]
        page = mine[:limit]
        positions = self._queue_positions()
        return {"jobs": [self._with_position(job, positions) for job in page],
                "next": page[-1].id if len(mine) > limit else None}

    def image(self, job_id: str, index: int, client: str | None = None) -> tuple[bytes, str] | None:
        job = self._job(job_id, client)
        if job is None or not 0 <= index < len(job.images):
            return None
        if job.fetched_at is None:
            job.fetched_at = self.clock()
            self._persist(job)
        return job.images[index], job.media_type or "application/octet-stream"

    def preview(self, job_id: str, client: str | None = None) -> dict | None:
        """The job's latest preview ``{step, steps, media_type, image (base64)}``, if any."""
        job = self._job(job_id, client)
        return None if job is None or job.preview is None else dict(job.preview)

    def events_after(self, job_id: str, seq: int, client: str | None = None) -> tuple[list[dict], bool] | None:
        """Events numbered after ``seq``, and whether the job has finished; None if unknown."""
        self.sweep()
        job = self._job(job_id, client)
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
        self._persist(job)
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
        # Only the latest preview keeps its image: earlier preview events stay in the
        # stream (numbering, resumption) without it.
        for event in reversed(job.events):
            if event["event"] == "preview" and event["data"].get("image") is not None:
                job.stored_bytes -= len(event["data"]["image"])
                event["data"] = {**event["data"], "image": None}
                break
        job.preview = {"step": step, "steps": steps, "media_type": media_type,
                       "image": base64.b64encode(image).decode("ascii")}
        if len(job.events) < MAX_EVENTS_PER_JOB:
            self._emit(job, "preview", dict(job.preview))

    def succeed(self, job_id: str, images: list[bytes], media_type: str, seeds: list[int], stage_timings: dict,
                sweep: dict | None = None, checks: list[dict] | None = None) -> None:
        """``sweep``: a sweep job's record with its results (seeds, times, grid size);
        ``checks``: ``caption_check``'s, one per image."""
        job = self._jobs.get(job_id)
        if job is None or job.finished:
            return
        job.images, job.media_type, job.seeds, job.stage_timings = list(images), media_type, list(seeds), stage_timings
        job.checks = checks
        if sweep is not None:
            job.sweep = sweep
        job.stored_bytes += sum(len(image) for image in images)
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

    def cancel(self, job_id: str, client: str | None = None) -> tuple[str, dict | None]:
        """A client's cancel: ``("unknown", None)``, ``("finished", view)``, ``("cancelled", view)``
        (a queued job, which now never starts) or ``("cancelling", view)`` (a running one:
        its runner stops it at its next report, or at once if it is local)."""
        self.sweep()
        job = self._job(job_id, client)
        if job is None:
            return "unknown", None
        if job.finished:
            return "finished", job_view(job)
        job.cancel_requested = True
        if job.state == "queued":
            self._finish(job, "cancelled")
            return "cancelled", job_view(job)
        self._emit(job, "progress")
        self._persist(job)  # another replica's runner, or one after a store restart, must still see it
        return "cancelling", job_view(job)

    # -- housekeeping ------------------------------------------------------------

    def sweep(self) -> None:
        """Forget finished jobs past their TTL; fail jobs whose replica stopped reporting."""
        now = self.clock()
        lease = self.settings.lease_s
        expired = []
        for job_id, job in list(self._jobs.items()):
            if job.finished:
                if job.finished_at is not None and now > self._expires_at(job):
                    expired.append(job_id)
            elif now - job.heartbeat_at > lease:
                job.error = {
                    "type": "runner_lost",
                    "message": f"the replica running this job stopped reporting for over {lease:g} s (it was restarted "
                               "or died); submit the job again",
                }
                self._finish(job, "failed")
        self._forget(expired)

    def __len__(self) -> int:
        return len(self._jobs)

    def _finish(self, job: Job, state: str) -> None:
        job.state, job.finished_at = state, self.clock()
        if state != "succeeded":
            job.eta_s = None
        job.stage = None
        self._emit(job, "state")
        self._persist(job, with_images=state == "succeeded")

    def _emit(self, job: Job, kind: str, data: dict | None = None) -> None:
        event = {"seq": job.next_seq, "event": kind, "data": data if data is not None else job_view(job)}
        job.events.append(event)
        job.stored_bytes += len(json.dumps(event["data"], separators=(",", ":"))) + EVENT_OVERHEAD_BYTES
        job.next_seq += 1


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


class AsyncJobStore:
    """:class:`JobStore` as coroutines, with long-polling for events.

    The body of the job-store actor (one event loop: calls never interleave inside
    a store method), and the in-process store of tests.
    """

    def __init__(self, settings: dict | JobSettings | None = None, database: JobDatabase | None = None) -> None:
        settings = JobSettings.model_validate(settings or {}) if not isinstance(settings, JobSettings) else settings
        self.store = JobStore(settings, database=database)
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
                     origin: str = "jobs", owner: str | None = None, priority: int = 0,
                     idempotency_key: str | None = None, fingerprint: str | None = None, model: str = "",
                     sweep: dict | None = None) -> dict:
        """Like :meth:`JobStore.create`, but what stops it is returned, not raised (it crosses Ray):
        a cap reached is ``{"limit": message, "retry_after_s": n}``; a job this client already made
        with ``idempotency_key`` is ``{"replayed": its view}`` (nothing new is created), or
        ``{"conflict": message}`` if that job was made by a different request."""
        try:
            if idempotency_key is not None:
                existing = self.store.find_idempotent(client, idempotency_key, fingerprint)
                if existing is not None:
                    return {"replayed": existing}
            view = self.store.create(job_id, client, mode, width, height, seeds, origin, owner, priority,
                                     idempotency_key, fingerprint, model, sweep)
        except IdempotencyConflict as error:
            return {"conflict": str(error)}
        except JobLimitError as error:
            return {"limit": error.message, "retry_after_s": error.retry_after_s}
        await self._notify()
        return view

    async def view(self, job_id: str, client: str | None = None) -> dict | None:
        return self.store.view(job_id, client)

    async def image(self, job_id: str, index: int, client: str | None = None) -> tuple[bytes, str] | None:
        return self.store.image(job_id, index, client)

    async def active(self, client: str | None = None, origin: str | None = None) -> list[dict]:
        return self.store.active(client, origin)

    async def preview(self, job_id: str, client: str | None = None) -> dict | None:
        return self.store.preview(job_id, client)

    async def list_jobs(self, client: str | None, state: str | None = None, limit: int = 20,
                        before: str | None = None) -> dict | None:
        return self.store.list_jobs(client, state, limit, before)

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

    async def succeed(self, job_id: str, images: list[bytes], media_type: str, seeds: list[int], stage_timings: dict,
                      sweep: dict | None = None, checks: list[dict] | None = None) -> dict | None:
        self.store.succeed(job_id, images, media_type, seeds, stage_timings, sweep, checks)
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

    async def cancel(self, job_id: str, client: str | None = None) -> tuple[str, dict | None]:
        outcome = self.store.cancel(job_id, client)
        await self._notify()
        return outcome

    async def wait_events(self, job_id: str, after: int, timeout_s: float,
                          client: str | None = None) -> tuple[list[dict], bool] | None:
        """Events after ``after`` as soon as there are any (or the job has finished), waiting
        at most ``timeout_s``; ``(events, finished)``, or None for an unknown job."""
        deadline = time.monotonic() + timeout_s
        condition = self._condition()
        while True:
            found = self.store.events_after(job_id, after, client)
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
