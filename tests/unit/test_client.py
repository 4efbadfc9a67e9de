"""The typed client (sync and async) against the app with a fake backend. No Ray, no models."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve.http.app import create_app
from serve.client import AsyncClient, Client, JobFailed, KandinskyError, _SseParser, progress_line
from serve.jobs.store import AsyncJobStore
from serve.jobs.runner import JobRunner
from serve.settings import JobSettings
from serve.settings import ApiLimits
from tests.jobfakes import FakeJobBackend
from tests.unit.test_api import FakeBackend
from tests.unit.test_jobs_api import PARAMS, make_client


def test_sse_parser_handles_comments_multi_field_events_and_ends():
    parser = _SseParser()
    events = [parser.feed(line) for line in [": keep-alive", "", "id: 3", "event: progress", 'data: {"a": 1}', ""]]
    assert events[:-1] == [None] * 5
    assert (events[-1].id, events[-1].event, events[-1].data) == (3, "progress", {"a": 1})


def test_sync_client_generates_with_progress_and_raises_on_errors():
    http, _ = make_client(FakeJobBackend(step_s=0.005))
    seen = []
    with http, Client(http=http) as client:
        job, images = client.generate(on_progress=seen.append, **{**PARAMS, "num_images": 2})
        assert job.state == "succeeded" and images == [b"img0", b"img1"] and job.seeds == [3, 4]
        progress = [j.progress for j in seen]
        assert progress == sorted(progress) and seen[-1].finished
        with pytest.raises(KandinskyError) as error:
            client.submit(**{**PARAMS, "steps": 0})
        assert error.value.status == 422 and "params.steps" in error.value.message
        with pytest.raises(KandinskyError) as error:
            client.cancel(job.id)
        assert error.value.status == 409
        running = client.submit(**{**PARAMS, "steps": 150})
        assert client.cancel(running.id).state == "cancelled"
    failing, _ = make_client(FakeJobBackend(fail=True))
    with failing, Client(http=failing) as client:
        with pytest.raises(JobFailed) as failed:
            client.generate(**PARAMS)
    assert failed.value.job.state == "failed" and failed.value.kind == "generation_failed"


def test_async_client_streams_events_and_generates():
    async def scenario():
        job_settings = JobSettings(progress_interval_s=0.005)
        store = AsyncJobStore(job_settings)
        runner = JobRunner(store, FakeJobBackend(step_s=0.005), job_settings)
        app = create_app(ApiLimits(), FakeBackend(), jobs=runner)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http, AsyncClient(http=http) as client:
            job, images = await client.generate(**PARAMS)
            events = [event async for event in client.events(job.id)]
            return job, images, events

    job, images, events = asyncio.run(scenario())
    assert job.state == "succeeded" and images == [b"img0"]
    assert [e.id for e in events] == list(range(1, len(events) + 1)) and events[-1].job.state == "succeeded"


def test_progress_line():
    from serve.client import Job

    job = Job("j", "text2img", "running", "denoise", 5, 10, 0.5, 2.0, [1], [], None, {})
    assert progress_line(job, width=10) == "[#####.....]  50.0% denoise 5/10 ETA 2.0s"
