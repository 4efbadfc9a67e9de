"""Job progress: turn what the two denoising loops report into a stage, a step i of n and
a 0–1 progress that only moves forward (:class:`StageTracker`)."""

from __future__ import annotations

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
