"""A fake job backend for the Ray-free job tests: a 'generation' that takes steps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from deployments.messages import EncodedImages, StageTiming
from serve.jobs.progress import LoopProgress


class FakeJobBackend:
    """Runs a spec's prior steps then its decoder steps, ``step_s`` each, counting the
    steps each job really executed; reports them as the loops would."""

    def __init__(self, step_s: float = 0.002, fail: bool = False,
                 image: Callable[[int, Any], bytes] | None = None) -> None:
        self.step_s = step_s
        self.fail = fail
        self.image = image
        """Makes each image from ``(seed, spec)`` (default: ``b"img<i>"``)."""
        self.steps_run: dict[str, int] = {}
        self.where: dict[str, tuple[str, int, int]] = {}
        self.started: list[str] = []
        self.gate: asyncio.Event | None = None
        """When set, every step waits for it (so a test can hold jobs running)."""
        self.previews = 0
        self.specs: list = []
        """Every spec run, in order."""

    async def generate_job(self, spec, job_id):
        self.started.append(job_id)
        self.specs.append(spec)
        self.steps_run[job_id] = 0
        try:
            for stage, count in (("prior", spec.prior_steps), ("denoise", spec.steps)):
                for done in range(count):
                    self.where[job_id] = (stage, done, count)
                    if self.gate is not None:
                        await self.gate.wait()
                    await asyncio.sleep(self.step_s)  # the step's compute
                    self.steps_run[job_id] += 1
                    self.where[job_id] = (stage, done + 1, count)
                if self.fail and stage == "denoise":
                    raise RuntimeError("replica exploded\nTraceback: secret internals")
        finally:
            self.where.pop(job_id, None)
        images = [b"img%d" % i if self.image is None else self.image(seed, spec) for i, seed in enumerate(spec.seeds)]
        return EncodedImages(images, "image/png", list(spec.seeds), {"denoiser": StageTiming(1.0, 2.0, 1)})

    async def loop_progress(self, spec, job_id):
        found = self.where.get(job_id)
        if found is None:
            return LoopProgress()
        stage, done, count = found
        n = len(spec.seeds)
        pair = (done * n, count * n)
        return LoopProgress(prior=pair) if stage == "prior" else LoopProgress(denoise=pair)

    async def preview(self, spec, job_id, max_side):
        if job_id not in self.where:
            return None
        self.previews += 1
        return b"\xff\xd8preview", "image/jpeg"
