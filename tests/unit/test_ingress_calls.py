"""How the ingress calls a stage: retry on a lost replica, 503 on a full queue. Fake handles, no Ray instance."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError

from serve.api import ServiceOverloaded
from serve.ingress import call_stage


class FakeMethod:
    """A stage method handle whose calls end in the given outcomes, in order."""

    deployment_name = "Denoiser"

    def __init__(self, *outcomes) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple] = []

    def remote(self, *args):
        self.calls.append(args)
        outcome = self.outcomes.pop(0)

        async def result():
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return result()


def _call(method, attempts=2):
    retried: list[str] = []
    result = asyncio.run(call_stage(method, "latents", attempts=attempts, request_id="r1", on_retry=retried.append))
    return result, retried


@pytest.mark.parametrize("lost", [ActorUnavailableError("node gone", b"0" * 16), ActorDiedError()], ids=lambda e: type(e).__name__)
def test_a_call_whose_replica_is_lost_is_retried_with_the_same_arguments(lost):
    method = FakeMethod(lost, "image")
    result, retried = _call(method)
    assert result == "image"
    assert method.calls == [("latents",), ("latents",)]
    assert retried == ["Denoiser"]


def test_retries_stop_at_the_configured_attempts():
    method = FakeMethod(ActorDiedError(), ActorDiedError(), "never reached")
    with pytest.raises(ActorDiedError):
        _call(method, attempts=2)
    assert len(method.calls) == 2


def test_one_attempt_means_no_retry():
    method = FakeMethod(ActorDiedError(), "never reached")
    with pytest.raises(ActorDiedError):
        _call(method, attempts=1)
    assert len(method.calls) == 1


def test_an_error_raised_by_the_stage_is_not_retried():
    method = FakeMethod(ValueError("bad latents"), "never reached")
    with pytest.raises(ValueError):
        _call(method)
    assert len(method.calls) == 1


def test_a_full_stage_queue_is_reported_as_overload():
    method = FakeMethod(BackPressureError(num_queued_requests=8, max_queued_requests=8, retry_after_s=3.0))
    with pytest.raises(ServiceOverloaded) as error:
        _call(method)
    assert error.value.retry_after_s == 3.0 and "Denoiser" in str(error.value)
    assert len(method.calls) == 1
