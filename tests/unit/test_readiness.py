"""Readiness: one computation per interval however many probes ask (plain asyncio)."""

from __future__ import annotations

import asyncio

from serve.http.readiness import ReadinessCache, is_ready


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_a_probe_flood_shares_one_computation():
    async def scenario():
        release = asyncio.Event()

        async def compute():
            await release.wait()
            return {"Denoiser": "ready"}

        cache = ReadinessCache(compute, ttl_s=1.5, clock=Clock())
        askers = [asyncio.ensure_future(cache.stages()) for _ in range(200)]
        await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(*askers), cache.computations

    answers, computations = run(scenario())
    assert computations == 1
    assert all(answer == {"Denoiser": "ready"} for answer in answers)


def test_the_answer_is_kept_for_the_interval_then_recomputed():
    async def scenario():
        states = iter(["ready", "UPDATING: no running replica"])

        async def compute():
            return {"Denoiser": next(states)}

        clock = Clock()
        cache = ReadinessCache(compute, ttl_s=1.5, clock=clock)
        first = await cache.stages()
        clock.now += 1.0
        cached = await cache.stages()
        clock.now += 1.0
        fresh = await cache.stages()
        return first, cached, fresh, cache.computations

    first, cached, fresh, computations = run(scenario())
    assert first == cached == {"Denoiser": "ready"} and computations == 2
    assert fresh == {"Denoiser": "UPDATING: no running replica"} and not is_ready(fresh)


def test_a_failed_check_is_not_ready_and_names_no_detail(caplog):
    async def compute():
        raise TimeoutError("/secret/path/to/checkpoint")

    stages = run(ReadinessCache(compute, clock=Clock()).stages())
    assert not is_ready(stages)
    assert "secret" not in str(stages) and "TimeoutError" in str(stages)
    assert "secret" in caplog.text, "the detail goes to the log"


def test_an_asker_that_gives_up_does_not_cancel_the_others():
    async def scenario():
        release = asyncio.Event()

        async def compute():
            await release.wait()
            return {"Prior": "ready"}

        cache = ReadinessCache(compute, clock=Clock())
        quitter, stayer = asyncio.ensure_future(cache.stages()), asyncio.ensure_future(cache.stages())
        await asyncio.sleep(0)
        quitter.cancel()
        await asyncio.sleep(0)
        release.set()
        return await stayer

    assert run(scenario()) == {"Prior": "ready"}


def test_no_stage_is_not_ready():
    assert not is_ready({}) and is_ready({"A": "ready", "B": "ready"})
