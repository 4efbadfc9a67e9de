"""Per-request progress of a replica's denoising loop, polled by the job runner.

The step scheduler reports every image's every step; the board turns that into
"request R: d of n image-steps done". Progress only moves forward.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

RECENT_REQUESTS = 256
"""Finished requests whose final count a board remembers (see :meth:`ProgressBoard.steps_run`)."""


@dataclass(frozen=True)
class Progress:
    done: int
    total: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


class ProgressBoard:
    def __init__(self) -> None:
        self._progress: dict[str, Progress] = {}
        self._recent: OrderedDict[str, Progress] = OrderedDict()

    def start(self, key: str, total: int) -> None:
        if key:
            self._progress[key] = Progress(0, total)

    def finish(self, key: str) -> None:
        last = self._progress.pop(key, None)
        if last is not None:
            self._recent[key] = last
            self._recent.move_to_end(key)
            while len(self._recent) > RECENT_REQUESTS:
                self._recent.popitem(last=False)

    def get(self, key: str) -> Progress | None:
        return self._progress.get(key)

    def steps_run(self, key: str) -> tuple[Progress, bool] | None:
        """Image-steps run for ``key`` and whether it has left the loop (finished, failed or
        cancelled); the last :data:`RECENT_REQUESTS` finished requests are remembered."""
        if key in self._progress:
            return self._progress[key], False
        if key in self._recent:
            return self._recent[key], True
        return None

    # StepObserver
    def on_admit(self, queue_wait_s: float) -> None:
        pass

    def on_step(self, batch_size: int, seconds: float) -> None:
        pass

    def on_progress(self, key: str, step: int, total: int) -> None:
        current = self._progress.get(key)
        if current is not None:
            self._progress[key] = Progress(min(current.done + 1, current.total), current.total)

