"""The step scheduler with plain asyncio and a fake model: no Ray, no torch."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from deployments.batching import StepScheduler, StepStats


@dataclass(eq=False)
class FakeState:
    name: str
    steps: int
    done: int = 0

    @property
    def finished(self) -> bool:
        return self.done >= self.steps


class FakeModel:
    """Records every step's batch; can be held at a step so the test can act mid-step."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def step(self, states: list[FakeState]) -> None:
        self.batches.append([state.name for state in states])
        for state in states:
            assert not state.finished, f"{state.name} stepped after finishing"
            state.done += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)

    async def wait_steps(self, count: int) -> None:
        while len(self.batches) < count:
            await asyncio.sleep(0)


def submit(scheduler, state, bucket=None, cost=1, key=""):
    return asyncio.ensure_future(scheduler.submit(state, total_steps=state.steps, bucket=bucket, cost=cost, key=key))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_admission_only_at_step_boundaries():
    async def scenario():
        model = FakeModel()
        model.gate = asyncio.Event()
        scheduler = StepScheduler(model.step, max_batch=8)
        first = submit(scheduler, FakeState("a", 3))
        await model.wait_steps(1)  # step 1 is running and held at the gate
        late = submit(scheduler, FakeState("b", 2))
        await asyncio.sleep(0)
        assert model.batches == [["a"]], "nothing may join a step that has started"
        model.gate.set()
        await asyncio.gather(first, late)
        return model.batches

    assert run(scenario()) == [["a"], ["a", "b"], ["a", "b"]]


def test_retired_the_step_it_finishes_and_result_delivered_while_others_continue():
    async def scenario():
        model = FakeModel()
        scheduler = StepScheduler(model.step, max_batch=8)
        short, long = submit(scheduler, FakeState("short", 2)), submit(scheduler, FakeState("long", 5))
        item = await short
        long_still_running = not long.done()
        await long
        return item, long_still_running, model.batches

    item, long_still_running, batches = run(scenario())
    assert item.steps_done == 2 and item.state.finished
    assert long_still_running, "the short request's result must not wait for the long one"
    assert batches == [["short", "long"]] * 2 + [["long"]] * 3


def test_max_batch_is_respected_and_waiting_items_fill_freed_slots():
    async def scenario():
        model = FakeModel()
        scheduler = StepScheduler(model.step, max_batch=3)
        tasks = [submit(scheduler, FakeState(f"r{i}", 2)) for i in range(7)]
        await asyncio.gather(*tasks)
        return model.batches

    batches = run(scenario())
    assert max(len(batch) for batch in batches) == 3
    assert sum(len(batch) for batch in batches) == 7 * 2
    assert batches[0] == ["r0", "r1", "r2"] and batches[2] == ["r3", "r4", "r5"]  # FIFO admission


def test_cost_cap_limits_a_step_but_an_oversized_item_still_runs_alone():
    async def scenario():
        model = FakeModel()
        scheduler = StepScheduler(model.step, max_batch=8, max_cost=10)
        tasks = [submit(scheduler, FakeState("big", 1), cost=25), submit(scheduler, FakeState("x", 1), cost=6),
                 submit(scheduler, FakeState("y", 1), cost=6)]
        await asyncio.gather(*tasks)
        return model.batches

    assert run(scenario()) == [["big"], ["x"], ["y"]]


def test_buckets_never_share_a_step_and_take_turns():
    async def scenario():
        model = FakeModel()
        scheduler = StepScheduler(model.step, max_batch=8)
        tasks = [submit(scheduler, FakeState("a1", 3), bucket="64x64"), submit(scheduler, FakeState("b1", 2), bucket="128x128"),
                 submit(scheduler, FakeState("a2", 1), bucket="64x64")]
        await asyncio.gather(*tasks)
        return model.batches

    batches = run(scenario())
    assert batches == [["a1", "a2"], ["b1"], ["a1"], ["b1"], ["a1"]]


def test_cancellation_frees_the_slot_within_one_step():
    async def scenario():
        model = FakeModel()
        scheduler = StepScheduler(model.step, max_batch=1)
        doomed = submit(scheduler, FakeState("doomed", 100))
        waiting = submit(scheduler, FakeState("next", 2))
        await model.wait_steps(2)
        doomed.cancel()
        steps_at_cancel = len(model.batches)
        await waiting
        return model.batches, steps_at_cancel, scheduler.active, scheduler.waiting

    batches, at, active, waiting = run(scenario())
    stepped_after = [batch for batch in batches[at:] if "doomed" in batch]
    assert len(stepped_after) <= 1, "a cancelled item may finish the step in progress, no more"
    assert batches[-2:] == [["next"], ["next"]]
    assert (active, waiting) == (0, 0)


def test_cancelled_while_waiting_never_runs():
    async def scenario():
        model = FakeModel()
        model.gate = asyncio.Event()
        scheduler = StepScheduler(model.step, max_batch=1)
        first = submit(scheduler, FakeState("first", 1))
        await model.wait_steps(1)
        queued = submit(scheduler, FakeState("queued", 1))
        await asyncio.sleep(0)
        queued.cancel()
        model.gate.set()
        await first
        await asyncio.sleep(0)
        return model.batches

    assert run(scenario()) == [["first"]]


def test_no_starvation_under_a_steady_stream():
    """A steady stream into one bucket neither starves another bucket nor an early arrival."""

    async def scenario():
        model = FakeModel()
        scheduler = StepScheduler(model.step, max_batch=2)
        stream = [submit(scheduler, FakeState(f"s{i}", 3), bucket="A") for i in range(2)]
        other = submit(scheduler, FakeState("other", 2), bucket="B")
        early = submit(scheduler, FakeState("early", 2), bucket="A")
        for i in range(2, 30):  # keep bucket A full: a new arrival every step
            await model.wait_steps(i)
            stream.append(submit(scheduler, FakeState(f"s{i}", 3), bucket="A"))
        finished_other, finished_early = await other, await early
        await asyncio.gather(*stream)
        return model.batches, finished_other, finished_early

    batches, other, early = run(scenario())
    first_other = next(i for i, batch in enumerate(batches) if "other" in batch)
    assert first_other <= 1 and other.steps_done == 2
    first_early = next(i for i, batch in enumerate(batches) if "early" in batch)
    first_late = next(i for i, batch in enumerate(batches) if "s5" in batch)
    assert first_early < first_late, "first come, first served within a bucket"


def test_a_failing_step_fails_its_items_and_the_loop_goes_on():
    async def scenario():
        calls = []

        async def step(states):
            calls.append([s.name for s in states])
            if any(s.name == "bad" for s in states):
                raise RuntimeError("boom")
            for s in states:
                s.done += 1

        scheduler = StepScheduler(step, max_batch=1)
        bad = submit(scheduler, FakeState("bad", 1))
        good = submit(scheduler, FakeState("good", 1))
        with pytest.raises(RuntimeError, match="boom"):
            await bad
        return (await good).steps_done

    assert run(scenario()) == 1


def test_stats_and_progress_are_reported():
    progress = []

    class Recorder(StepStats):
        def on_progress(self, key, step, total):
            progress.append((key, step, total))

    async def scenario():
        model = FakeModel()
        recorder = Recorder()
        scheduler = StepScheduler(model.step, max_batch=4, observer=recorder)
        await asyncio.gather(submit(scheduler, FakeState("a", 2), key="req-a"), submit(scheduler, FakeState("b", 1), key="req-b"))
        return recorder

    stats = run(scenario())
    assert (stats.steps, stats.item_steps, stats.admitted) == (2, 3, 2)
    assert progress == [("req-a", 1, 2), ("req-b", 1, 1), ("req-a", 2, 2)]


def test_already_finished_state_returns_at_once():
    async def scenario():
        model = FakeModel()
        scheduler = StepScheduler(model.step, max_batch=1)
        item = await scheduler.submit(FakeState("zero", 0), total_steps=0)
        return item, model.batches

    item, batches = run(scenario())
    assert item.steps_done == 0 and batches == []


def test_admit_when_idle_only_runs_whole_batches():
    async def scenario():
        model = FakeModel()
        scheduler = StepScheduler(model.step, max_batch=8, admit_when_idle_only=True)
        first = submit(scheduler, FakeState("a", 3))
        await model.wait_steps(1)
        late = [submit(scheduler, FakeState("b", 2)), submit(scheduler, FakeState("c", 1))]
        await asyncio.gather(first, *late)
        return model.batches

    assert run(scenario()) == [["a"], ["a"], ["a"], ["b", "c"], ["b"]]


class ThreadModel:
    """A plain (blocking) model stepped on a worker thread, as a replica's model thread does;
    ``hold_at`` blocks the step with that number until ``release`` is set."""

    def __init__(self, hold_at: int | None = None, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.hold_at, self.fail_on = hold_at, fail_on
        self.held, self.release = threading.Event(), threading.Event()

    def step(self, states: list[FakeState]) -> None:
        self.batches.append([state.name for state in states])
        if self.fail_on in self.batches[-1]:
            raise RuntimeError("boom")
        for state in states:
            assert not state.finished, f"{state.name} stepped after finishing"
            state.done += 1
        if len(self.batches) == self.hold_at:
            self.held.set()
            assert self.release.wait(10), "the test never released the held step"


def offloaded(model: ThreadModel, **options) -> tuple[StepScheduler, ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1)

    def offload(fn, *args):
        return asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    return StepScheduler(model.step, offload=offload, **options), executor


async def until_held(model: ThreadModel) -> None:
    assert await asyncio.get_running_loop().run_in_executor(None, model.held.wait, 10), "the step was never reached"


def test_offloaded_steps_run_as_one_burst_and_each_step_is_reported_in_order():
    progress = []

    class Recorder(StepStats):
        def on_progress(self, key, step, total):
            progress.append((key, step, total))

    async def scenario():
        model, recorder = ThreadModel(), Recorder()
        scheduler, _ = offloaded(model, max_batch=4, observer=recorder)
        item = await submit(scheduler, FakeState("a", 5), key="req")
        return item, scheduler.bursts, recorder, model.batches

    item, bursts, stats, batches = run(scenario())
    assert bursts == 1, "a lone request needs no step boundary on the event loop"
    assert item.steps_done == 5 and batches == [["a"]] * 5
    assert stats.steps == 5 and progress == [("req", step, 5) for step in range(1, 6)]


def test_an_arrival_during_a_burst_joins_at_the_next_step_boundary():
    async def scenario():
        model = ThreadModel(hold_at=2)
        scheduler, _ = offloaded(model, max_batch=8)
        first = submit(scheduler, FakeState("a", 5))
        await until_held(model)  # step 2 of the burst is running
        late = submit(scheduler, FakeState("b", 2))
        await asyncio.sleep(0)  # let submit() queue it (and pause the burst)
        model.release.set()
        await asyncio.gather(first, late)
        return model.batches

    assert run(scenario()) == [["a"], ["a"], ["a", "b"], ["a", "b"], ["a"]]


def test_cancelling_during_a_burst_stops_it_after_the_step_in_progress():
    async def scenario():
        model = ThreadModel(hold_at=3)
        scheduler, _ = offloaded(model, max_batch=1)
        doomed = submit(scheduler, FakeState("doomed", 100))
        await until_held(model)
        doomed.cancel()
        await asyncio.sleep(0)  # the cancellation reaches the scheduler as a loop callback
        model.release.set()
        nxt = await submit(scheduler, FakeState("next", 2))
        return model.batches, nxt, (scheduler.active, scheduler.waiting)

    batches, nxt, counts = run(scenario())
    assert batches == [["doomed"]] * 3 + [["next"]] * 2
    assert nxt.steps_done == 2 and counts == (0, 0)


def test_offloaded_buckets_still_take_turns_step_by_step():
    async def scenario():
        model = ThreadModel()
        scheduler, _ = offloaded(model, max_batch=8)
        tasks = [submit(scheduler, FakeState("a1", 3), bucket="64x64"), submit(scheduler, FakeState("b1", 2), bucket="128x128")]
        await asyncio.gather(*tasks)
        return model.batches

    assert run(scenario()) == [["a1"], ["b1"], ["a1"], ["b1"], ["a1"]]


def test_a_step_failing_inside_a_burst_fails_its_items_only():
    async def scenario():
        model = ThreadModel(fail_on="bad")
        scheduler, _ = offloaded(model, max_batch=1)
        bad, good = submit(scheduler, FakeState("bad", 3)), submit(scheduler, FakeState("good", 3))
        with pytest.raises(RuntimeError, match="boom"):
            await bad
        return (await good).steps_done, model.batches

    steps, batches = run(scenario())
    assert steps == 3 and batches == [["bad"]] + [["good"]] * 3


def test_waiting_requests_do_not_break_a_whole_batch_burst_when_admitting_only_when_idle():
    async def scenario():
        model = ThreadModel(hold_at=1)
        scheduler, _ = offloaded(model, max_batch=8, admit_when_idle_only=True)
        first = submit(scheduler, FakeState("a", 4))
        await until_held(model)
        late = submit(scheduler, FakeState("b", 2))
        await asyncio.sleep(0)
        model.release.set()
        await asyncio.gather(first, late)
        return model.batches, scheduler.bursts

    batches, bursts = run(scenario())
    assert batches == [["a"]] * 4 + [["b"]] * 2
    assert bursts == 2, "b cannot join a's batch, so its arrival need not stop a's burst"


def test_a_failing_observer_never_leaves_a_caller_waiting():
    class Broken(StepStats):
        def on_progress(self, key, step, total):
            raise RuntimeError("metrics backend down")

    async def scenario():
        model = ThreadModel()
        scheduler, _ = offloaded(model, max_batch=4, observer=Broken())
        return await submit(scheduler, FakeState("a", 3))

    assert run(scenario()).steps_done == 3
