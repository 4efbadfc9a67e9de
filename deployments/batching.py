"""Batching policy shared by every stage, kept apart from model execution.

Ray Serve's ``@serve.batch`` collects calls; this module decides how a collected
batch is split into groups that can share one forward pass, and carries the
per-stage settings that tune it. It knows nothing about models or Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class BatchSettings(BaseModel):
    """A stage's ``user_config``: dynamic batching and threading knobs."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=8, ge=1, le=256)
    """Most calls collected into one batch (one call can hold several images)."""
    batch_wait_timeout_s: float = Field(default=0.005, ge=0.0, le=10.0)
    """How long the first call of a batch waits for others to join."""
    torch_threads: int | None = Field(default=None, ge=1, le=256)
    """Intra-op threads for this replica; None leaves torch's default."""


def group_by(items: Iterable[T], key: Callable[[T], K]) -> list[tuple[K, list[T]]]:
    """Split ``items`` into groups of equal ``key``, keeping first-seen order.

    Items in one group can share a forward pass; groups run one after another.
    """
    groups: dict[K, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.items())


@dataclass
class Queued(Generic[T]):
    """A call waiting in a stage's batch queue, stamped when it arrived."""

    payload: T
    enqueued_at: float = field(default_factory=time.perf_counter)

    def queue_wait_ms(self, started_at: float) -> float:
        return max(0.0, (started_at - self.enqueued_at) * 1000.0)


class Steppable:
    """Protocol of a per-request denoising state: done once ``finished`` is true."""

    finished: bool


S = TypeVar("S", bound=Steppable)


def run_until_done(states: list[S], step: Callable[[list[S]], None]) -> int:
    """Whole-batch policy: step every unfinished state together until all finish.

    A state that finishes early leaves the batch at once, so states with different
    step counts share every forward pass they can. Returns the number of steps run.
    """
    active = [state for state in states if not state.finished]
    steps = 0
    while active:
        step(active)
        steps += 1
        active = [state for state in active if not state.finished]
    return steps
