"""Batching policy shared by every stage, kept apart from model execution.

Two policies:

* **request** batching: Ray Serve's ``@serve.batch`` collects calls, :func:`group_by`
  splits them into groups that can share a forward pass and :func:`run_until_done`
  steps a group until every member is done;
* **step** batching (:class:`StepScheduler`): the set of images in flight is
  re-formed at every step boundary — waiting images join, finished ones leave at
  once, cancelled ones are dropped — so nobody waits for a whole loop to end.

It knows nothing about models or Ray: a model is a ``step(states)`` callable.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

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


class LoopBatchSettings(BatchSettings):
    """``user_config`` of the two denoising loops (prior and denoiser)."""

    batching: Literal["step", "request", "request-when-idle"] = "step"
    """``step``: images join and leave the loop between steps. ``request``: whole-request
    batches from ``@serve.batch`` (which forms the next batch while the current one runs).
    ``request-when-idle``: whole-request batches formed only when the loop is idle, from
    everything waiting — the strongest whole-request baseline."""
    max_latent_pixels_per_step: int | None = Field(default=None, ge=1)
    """Step batching only: most latent pixels (rows x h x w) in one forward pass, a GPU memory guard."""


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


class Steppable(Protocol):
    """A per-image denoising state: done once ``finished`` is true."""

    @property
    def finished(self) -> bool: ...


S = TypeVar("S", bound=Steppable)


class StepObserver(Protocol):
    """What the policies report; metrics, statistics and progress subscribe to it."""

    def on_admit(self, queue_wait_s: float) -> None: ...

    def on_step(self, batch_size: int, seconds: float) -> None: ...

    def on_progress(self, key: str, step: int, total: int) -> None: ...


class StepStats:
    """Plain counters of what the loop did (for tests and benchmarks)."""

    def __init__(self) -> None:
        self.steps = 0
        self.item_steps = 0
        self.step_seconds = 0.0
        self.admitted = 0
        self.queue_wait_s = 0.0

    def on_admit(self, queue_wait_s: float) -> None:
        self.admitted += 1
        self.queue_wait_s += queue_wait_s

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.steps += 1
        self.item_steps += batch_size
        self.step_seconds += seconds

    def on_progress(self, key: str, step: int, total: int) -> None:
        pass

    def snapshot(self) -> dict[str, float]:
        return dict(vars(self))


class Observers:
    """Fans each report out to several observers."""

    def __init__(self, *observers: StepObserver) -> None:
        self.observers = observers

    def on_admit(self, queue_wait_s: float) -> None:
        for observer in self.observers:
            observer.on_admit(queue_wait_s)

    def on_step(self, batch_size: int, seconds: float) -> None:
        for observer in self.observers:
            observer.on_step(batch_size, seconds)

    def on_progress(self, key: str, step: int, total: int) -> None:
        for observer in self.observers:
            observer.on_progress(key, step, total)


def run_until_done(states: list[S], step: Callable[[list[S]], None], observer: StepObserver | None = None) -> int:
    """Request-batching policy: step every unfinished state together until all finish.

    A state that finishes early leaves the batch at once, so states with different
    step counts share every forward pass they can. Returns the number of steps run.
    """
    active = [state for state in states if not state.finished]
    steps = 0
    while active:
        started = time.perf_counter()
        step(active)
        if observer is not None:
            observer.on_step(len(active), time.perf_counter() - started)
        steps += 1
        active = [state for state in active if not state.finished]
    return steps


@dataclass(eq=False)
class StepItem(Generic[S]):
    """One image in the step scheduler, and what happened to it."""

    state: S
    bucket: Hashable
    cost: int
    total_steps: int
    key: str
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    steps_done: int = 0
    batch_size_sum: int = 0
    """Sum over this item's steps of the batch size it ran in."""
    max_batch_size: int = 0

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    @property
    def queue_wait_s(self) -> float:
        return (self.admitted_at or time.perf_counter()) - self.enqueued_at

    @property
    def mean_batch_size(self) -> float:
        return self.batch_size_sum / self.steps_done if self.steps_done else 0.0


@dataclass
class _Bucket(Generic[S]):
    waiting: deque = field(default_factory=deque)
    active: list = field(default_factory=list)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active)


def step_until_boundary(
    step: Callable[[list[S]], None],
    states: list[S],
    pause: threading.Event,
    report: Callable[[float, list[bool]], None],
) -> None:
    """Model-thread side of a burst: step ``states`` until one finishes or ``pause`` is set.

    ``report(seconds, finished_flags)`` is called after every step, from this thread.
    """
    while True:
        started = time.perf_counter()
        step(states)
        finished = [state.finished for state in states]
        report(time.perf_counter() - started, finished)
        if pause.is_set() or any(finished):
            return


class StepScheduler(Generic[S]):
    """Iteration-level batching of denoising loops (one per replica).

    Invariants: a state is stepped at most once per step; admission, retirement and
    cancellation happen only between steps; one step runs states of one bucket only
    (states that cannot share a forward pass live in different buckets); buckets with
    work take steps in turn, and each bucket admits first come, first served — so
    nothing starves.

    Two ways to run steps. Without ``offload``, ``step`` is a coroutine function run
    once per step on the event loop (fakes and tests). With ``offload`` (e.g. a model
    thread's ``run``), ``step`` is a plain function and consecutive steps run as one
    *burst* on that thread for as long as no boundary is wanted — nothing waits that
    could join, no other bucket has work, nothing was cancelled, nothing finished —
    because a round trip through the event loop per step cost ~1 ms a step on a busy
    2-core machine (~10 % of a 50-step loop of the tiny model). Each step is still
    reported on the loop, in order, before the burst returns.
    """

    def __init__(
        self,
        step: Callable[[list[S]], Any],
        *,
        max_batch: int,
        max_cost: int | None = None,
        observer: StepObserver | None = None,
        admit_when_idle_only: bool = False,
        offload: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        self._run_step = step
        self._offload = offload
        self.configure(max_batch, max_cost, admit_when_idle_only)
        self._observer = observer or StepStats()
        self._buckets: dict[Hashable, _Bucket[S]] = {}
        self._turn: deque[Hashable] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pause = threading.Event()
        self._bursting: _Bucket[S] | None = None
        self.bursts = 0
        """Offloaded runs started (each one or more steps): for tests and statistics."""

    def configure(self, max_batch: int, max_cost: int | None = None, admit_when_idle_only: bool = False) -> None:
        """``admit_when_idle_only`` turns step batching into whole-request batching:
        a bucket admits only when nothing of it is in flight, then runs that batch out."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.max_cost = max_cost
        self.admit_when_idle_only = admit_when_idle_only

    @property
    def waiting(self) -> int:
        return sum(len(bucket.waiting) for bucket in self._buckets.values())

    @property
    def active(self) -> int:
        return sum(len(bucket.active) for bucket in self._buckets.values())

    async def submit(self, state: S, *, total_steps: int, bucket: Hashable = None, cost: int = 1, key: str = "") -> StepItem[S]:
        """Queue ``state`` and return its item once it has finished.

        Cancelling the caller cancels the item: it leaves at the next step boundary.
        """
        loop = asyncio.get_running_loop()
        item = StepItem(state, bucket, cost, total_steps, key, loop.create_future())
        if state.finished:  # nothing to do (e.g. zero steps); never occupies a slot
            return item
        if bucket not in self._buckets:
            self._buckets[bucket] = _Bucket()
            self._turn.append(bucket)
        self._buckets[bucket].waiting.append(item)
        item.future.add_done_callback(self._pause_if_cancelled)
        if self._bursting is not None and self._wants_boundary(self._bursting):
            self._pause.set()
        self._ensure_running()
        await item.future
        return item

    def _pause_if_cancelled(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self._pause.set()

    def _wants_boundary(self, bucket: _Bucket[S]) -> bool:
        """Whether the next step boundary can change something: another bucket's turn or an admission."""
        if any(other is not bucket and other.has_work for other in self._buckets.values()):
            return True
        return bool(bucket.waiting) and not self.admit_when_idle_only and len(bucket.active) < self.max_batch

    def _ensure_running(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._serve_forever())
        self._wakeup.set()

    def _next_bucket(self) -> _Bucket[S] | None:
        """Rotate to the next bucket with work; forget idle buckets."""
        for _ in range(len(self._turn)):
            key = self._turn[0]
            self._turn.rotate(-1)
            bucket = self._buckets[key]
            self._drop_cancelled(bucket)
            if bucket.has_work:
                return bucket
            del self._buckets[key]
            self._turn.remove(key)
        return None

    @staticmethod
    def _drop_cancelled(bucket: _Bucket) -> None:
        bucket.active[:] = [item for item in bucket.active if not item.cancelled]
        if any(item.cancelled for item in bucket.waiting):
            bucket.waiting = deque(item for item in bucket.waiting if not item.cancelled)

    def _admit(self, bucket: _Bucket) -> None:
        if self.admit_when_idle_only and bucket.active:
            return
        cost = sum(item.cost for item in bucket.active)
        now = time.perf_counter()
        while bucket.waiting and len(bucket.active) < self.max_batch:
            item = bucket.waiting[0]
            # An item over the cost cap on its own still runs, alone.
            if self.max_cost is not None and bucket.active and cost + item.cost > self.max_cost:
                break
            bucket.waiting.popleft()
            item.admitted_at = now
            cost += item.cost
            bucket.active.append(item)
            self._observer.on_admit(item.queue_wait_s)

    async def _serve_forever(self) -> None:
        assert self._wakeup is not None
        try:
            while True:
                bucket = self._next_bucket()
                if bucket is None:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._admit(bucket)
                await self._step(bucket)
        except BaseException as error:  # never leave a caller waiting on a dead loop
            for bucket in self._buckets.values():
                for item in (*bucket.waiting, *bucket.active):
                    if not item.future.done():
                        item.future.set_exception(RuntimeError(f"step scheduler stopped: {error!r}"))
            self._buckets.clear()
            self._turn.clear()
            raise

    async def _step(self, bucket: _Bucket) -> None:
        batch = list(bucket.active)
        states = [item.state for item in batch]
        try:
            if self._offload is None:
                started = time.perf_counter()
                await self._run_step(states)
                self._after_step(bucket, batch, time.perf_counter() - started, [state.finished for state in states])
            else:
                await self._burst(bucket, batch, states)
        except Exception as error:  # a failed step fails exactly the items that were in it
            logger.exception("denoising step failed for %d item(s)", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            bucket.active[:] = [item for item in bucket.active if item not in batch]
            return
        bucket.active[:] = [item for item in bucket.active if not item.future.done()]

    async def _burst(self, bucket: _Bucket, batch: list[StepItem[S]], states: list[S]) -> None:
        assert self._offload is not None
        loop = asyncio.get_running_loop()

        def report(seconds: float, finished: list[bool]) -> None:  # on the model thread
            loop.call_soon_threadsafe(self._after_step, bucket, batch, seconds, finished)

        # Callbacks queued by ``report`` run before the offload's own completion callback,
        # so every step is accounted for when the await below returns.
        self._pause.clear()
        if self._wants_boundary(bucket) or any(item.cancelled for item in batch):
            self._pause.set()
        self._bursting = bucket
        self.bursts += 1
        try:
            await self._offload(step_until_boundary, self._run_step, states, self._pause, report)
        finally:
            self._bursting = None

    def _after_step(self, bucket: _Bucket, batch: list[StepItem[S]], seconds: float, finished: list[bool]) -> None:
        # Results first and observers guarded: run as a loop callback during a burst, an
        # exception here would be logged and lost, leaving a finished item's caller waiting.
        # A finished item leaves ``active`` here, before its caller can resume, so counts and
        # gauges read by that caller never include it (a burst's own return comes later).
        for item, done in zip(batch, finished, strict=True):
            item.steps_done += 1
            item.batch_size_sum += len(batch)
            item.max_batch_size = max(item.max_batch_size, len(batch))
            if done and not item.future.done():
                item.future.set_result(item)
        if any(finished):
            bucket.active[:] = [item for item in bucket.active if not item.future.done()]
        try:
            self._observer.on_step(len(batch), seconds)
            for item in batch:
                self._observer.on_progress(item.key, item.steps_done, item.total_steps)
        except Exception:
            logger.exception("a step observer failed (the step's results are delivered regardless)")


async def answer_or_raise(work: Awaitable[T]) -> T:
    """A ``@serve.batch`` result, raising the error of a request that failed alone."""
    result = await work
    if isinstance(result, Exception):
        raise result
    return result


async def run_isolated(thread: Any, run: Callable[[list], list], check: Callable[[Any], None],
                       requests: list) -> list:
    """Each request's answer or its own ``ValueError``: invalid requests never join the batch,
    and a batch refused for one request's input is rerun one request at a time."""
    errors: list[Exception | None] = []
    for request in requests:
        try:
            check(request)
            errors.append(None)
        except ValueError as error:
            errors.append(error)
    valid = [request for request, error in zip(requests, errors) if error is None]
    try:
        answers = await thread.run(run, valid) if valid else []
    except ValueError:
        answers = []
        for request in valid:
            try:
                answers.extend(await thread.run(run, [request]))
            except ValueError as error:
                answers.append(error)
    rest = iter(answers)
    return [error if error is not None else next(rest) for error in errors]
