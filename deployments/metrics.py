"""Prometheus metrics of the denoising loops, exported through Ray's metrics agent.

Every metric carries a ``stage`` tag; Ray Serve adds deployment, replica and
application tags. No per-request labels.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
SECONDS_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class LoopMetrics:
    """A StepObserver that records steps, batch sizes and queue waits."""

    def __init__(self, stage: str) -> None:
        self._tags = {"stage": stage}
        self.steps = Counter(
            "kandinsky_serve_denoise_steps_total", description="Denoising steps run (one forward pass each).",
            tag_keys=("stage",),
        )
        self.batch_size = Histogram(
            "kandinsky_serve_step_batch_size", description="Images in one denoising step's forward pass.",
            boundaries=BATCH_BOUNDARIES, tag_keys=("stage",),
        )
        self.step_seconds = Histogram(
            "kandinsky_serve_step_duration_seconds", description="Wall time of one denoising step.",
            boundaries=SECONDS_BOUNDARIES, tag_keys=("stage",),
        )
        self.queue_wait = Histogram(
            "kandinsky_serve_step_queue_wait_seconds", description="Time an image waited before joining the loop.",
            boundaries=SECONDS_BOUNDARIES, tag_keys=("stage",),
        )

    def on_admit(self, queue_wait_s: float) -> None:
        self.queue_wait.observe(queue_wait_s, tags=self._tags)

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.steps.inc(tags=self._tags)
        self.batch_size.observe(batch_size, tags=self._tags)
        self.step_seconds.observe(seconds, tags=self._tags)

    def on_progress(self, key: str, step: int, total: int) -> None:
        pass
