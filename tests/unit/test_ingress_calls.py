"""How the ingress calls a stage (serve.graph.ingress.HandleCalls): a call whose replica died is
retried with the same arguments, nothing else is; a full queue and a dead stage map to 503.
Fake handles, no Ray instance."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError

from deployments.runtime import StageNotReady
from serve.graph.ingress import HandleCalls, classify_stage_error
from serve.errors import Overloaded, StageUnavailable
from serve.graph.resilience import run_resilient


class Params:
    request_id = "r1"

    def __eq__(self, other):
        return isinstance(other, Params)


class FakeResponse:
    def __init__(self, outcome) -> None:
        self.outcome = outcome
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self):
        async def result():
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return result().__await__()


class FakeMethod:
    def __init__(self, *outcomes) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple] = []

    def remote(self, *args):
        self.calls.append(args)
        return FakeResponse(self.outcomes.pop(0))


class FakeHandle:
    def __init__(self, **methods) -> None:
        self.__dict__.update(methods)


def _decode(outcomes, retries=1):
    method = FakeMethod(*outcomes)
    retried: list[str] = []
    calls = HandleCalls({"MovqDecoder": FakeHandle(decode=method)}, retries, retried.append)
    result = asyncio.run(calls.decode("latents", Params()))
    return result, method, retried, calls


@pytest.mark.parametrize("lost", [ActorUnavailableError("node gone", b"0" * 16), ActorDiedError()], ids=lambda e: type(e).__name__)
def test_a_call_whose_replica_died_is_retried_with_the_same_arguments(lost):
    result, method, retried, _ = _decode([lost, "images"])
    assert result == "images"
    assert method.calls == [("latents", Params())] * 2
    assert retried == ["MovqDecoder"]


def test_retries_stop_at_the_configured_count():
    with pytest.raises(ActorDiedError):
        _decode([ActorDiedError(), ActorDiedError(), "never"], retries=1)
    with pytest.raises(ActorDiedError):
        _decode([ActorDiedError(), "never"], retries=0)


def test_an_error_raised_by_the_stage_is_not_retried():
    with pytest.raises(ValueError):
        _decode([ValueError("bad latents"), "never"])


def test_every_issued_call_can_be_cancelled():
    _, _, _, calls = _decode([ActorDiedError(), "images"])
    calls.cancel_all()
    assert len(calls.issued) == 2 and all(response.cancelled for response in calls.issued)


@pytest.mark.parametrize("error, expected", [
    (BackPressureError(num_queued_requests=8, max_queued_requests=8), Overloaded),
    (StageNotReady("stage denoiser: model not loaded: CheckpointError"), StageUnavailable),
    (ActorDiedError(), StageUnavailable),  # its retries were used up in HandleCalls
])
def test_stage_errors_become_explicit_503s(error, expected):
    async def attempt():
        raise error

    with pytest.raises(expected):
        asyncio.run(run_resilient(attempt, timeout_s=5, classify=classify_stage_error))


@pytest.mark.parametrize("error, secret", [
    (BackPressureError(num_queued_requests=8, max_queued_requests=8), "8"),
    (StageNotReady("stage denoiser: model not loaded: OSError: /secret/ckpt/unet missing"), "/secret"),
])
def test_clients_get_a_generic_reason_and_the_log_gets_the_details(error, secret, caplog):
    async def attempt():
        raise error

    with pytest.raises((Overloaded, StageUnavailable)) as raised:
        asyncio.run(run_resilient(attempt, timeout_s=5, classify=classify_stage_error))
    assert secret not in str(raised.value) and "retry later" in str(raised.value)
    assert secret in caplog.text
