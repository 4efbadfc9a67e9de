"""The job-store actor on Ray: clients' long-polls cannot starve the runners' calls."""

from __future__ import annotations

import asyncio
import time
import uuid

import ray

from serve.jobs.actor import ActorJobStore, job_store_actor
from serve.settings import JobSettings


def test_long_polls_filling_the_default_group_leave_runners_their_own(ray_session):
    settings = JobSettings(store_name=f"test-store-{uuid.uuid4().hex[:8]}")
    actor = job_store_actor(settings, max_concurrency=4)
    store = ActorJobStore(actor)

    async def scenario():
        await store.create("j1", "client", "text2img", 64, 64, [1])
        assert await store.start("j1", "runner-1")
        # Four long-polls for events that will not come: every place of the default group.
        polls = [asyncio.ensure_future(store.wait_events("j1", 10**6, 20.0)) for _ in range(4)]
        await asyncio.sleep(0.5)  # let them reach the actor (they are meant to block there)
        started = time.monotonic()
        cancel_asked = await asyncio.wait_for(store.heartbeat("j1"), 10.0)
        took = time.monotonic() - started
        for poll in polls:
            poll.cancel()
        return cancel_asked, took

    try:
        cancel_asked, took = asyncio.run(scenario())
    finally:
        ray.kill(actor)
    assert cancel_asked is False and took < 5.0, f"a heartbeat waited {took:.1f} s behind long-polls"
