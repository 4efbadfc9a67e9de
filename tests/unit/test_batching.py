from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from deployments.batching import BatchSettings, Queued, group_by, run_until_done


def test_group_by_keeps_first_seen_order_and_members():
    items = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)]
    groups = group_by(items, key=lambda item: item[0])
    assert [key for key, _ in groups] == ["a", "b", "c"]
    assert groups[0][1] == [("a", 1), ("a", 3)]
    assert sum(len(members) for _, members in groups) == len(items)


@dataclass
class FakeState:
    steps: int
    done_steps: int = 0

    @property
    def finished(self) -> bool:
        return self.done_steps >= self.steps


def test_run_until_done_retires_each_state_when_it_finishes():
    states = [FakeState(3), FakeState(1), FakeState(5)]
    batch_sizes = []

    def step(active):
        batch_sizes.append(len(active))
        for state in active:
            assert not state.finished, "a finished state was stepped again"
            state.done_steps += 1

    assert run_until_done(states, step) == 5
    assert batch_sizes == [3, 2, 2, 1, 1]
    assert [s.done_steps for s in states] == [3, 1, 5]


def test_run_until_done_with_nothing_to_do():
    assert run_until_done([FakeState(0)], lambda active: pytest.fail("stepped")) == 0


def test_queued_wait_is_measured_from_enqueue():
    queued = Queued("x", enqueued_at=10.0)
    assert queued.queue_wait_ms(10.25) == pytest.approx(250.0)
    assert queued.queue_wait_ms(9.0) == 0.0


@pytest.mark.parametrize("field,value", [("max_batch_size", 0), ("batch_wait_timeout_s", -1), ("torch_threads", 0), ("bogus", 1)])
def test_batch_settings_reject_bad_values(field, value):
    with pytest.raises(ValidationError, match=field):
        BatchSettings.model_validate({field: value})
