"""Job progress: turn what the two denoising loops report into a stage, a step i of n and
a 0–1 progress that only moves forward (:class:`StageTracker`; a sweep's cells as one:
:class:`CombinedTracker`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

STAGES = ("encode", "prior", "denoise", "decode")

# Shares of the 0-1 progress: encoding and decoding are short; the two loops share
# the rest by their step counts, a prior step costing about a quarter of a U-Net step
# (the prior is a small transformer over one embedding; the U-Net runs over the
# latents). Only the shape of the curve depends on these, never its monotonicity.
ENCODE_SHARE = 0.02
DECODE_SHARE = 0.05
PRIOR_STEP_COST = 0.25


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
        self.finished = False

    def finish(self) -> None:
        """Its images are back (a poll may never have seen it in a loop)."""
        self._advance(3)
        self.prior_fraction = self.denoise_fraction = 1.0
        self.finished = True

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


class CombinedTracker:
    """One report for a job's requests (a sweep's cells; a single one for any other job),
    each followed by its own :class:`StageTracker`: the stage of the least advanced, that
    loop's steps summed over all of them, and their progress weighted by each one's work
    (its steps, a prior step counted as in :class:`StageTracker`). Forward only, as each
    one's is; with one request, exactly its report."""

    def __init__(self, trackers: Sequence[StageTracker]) -> None:
        self.trackers = list(trackers)
        self.weights = [PRIOR_STEP_COST * t.prior_steps + t.decoder_steps for t in self.trackers]

    def update(self, polls: Sequence[LoopProgress | None]) -> ProgressReport:
        """``polls``: one per request, in order (None: not polled this time)."""
        reports = [tracker.update(poll) for tracker, poll in zip(self.trackers, polls, strict=True)]
        if len(reports) == 1:
            return reports[0]
        stage_index = min(tracker.stage_index for tracker in self.trackers)
        if stage_index >= 2:
            step = sum(round(t.denoise_fraction * t.decoder_steps) for t in self.trackers)
            steps = sum(t.decoder_steps for t in self.trackers)
        else:
            step = sum(round(t.prior_fraction * t.prior_steps) for t in self.trackers) if stage_index else 0
            steps = sum(t.prior_steps for t in self.trackers)
        progress = sum(w * r.progress for w, r in zip(self.weights, reports)) / sum(self.weights)
        return ProgressReport(STAGES[stage_index], step, steps, min(progress, 1.0))


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
