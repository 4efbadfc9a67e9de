"""An image-understanding batch: a request the model refuses fails alone, not its batch."""

from __future__ import annotations

import asyncio

from deployments.batching import run_isolated


class Thread:
    async def run(self, fn, *args):
        return fn(*args)


def check(request: str) -> None:
    if request == "invalid":
        raise ValueError("invalid request")


def run(requests: list[str]) -> list[str]:
    if "too-long" in requests:
        raise ValueError("too long")
    return [request.upper() for request in requests]


def test_invalid_and_refused_requests_fail_alone():
    answers = asyncio.run(run_isolated(Thread(), run, check, ["a", "invalid", "too-long", "b"]))
    assert answers[0] == "A" and answers[3] == "B"
    assert [str(answers[1]), str(answers[2])] == ["invalid request", "too long"]
