"""Stopping without dropping accepted work: the drain policy with fake replicas, and the
API's draining state with a fake backend. No Ray, no models."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import httpx
import pytest
from fastapi.testclient import TestClient

from serve.http.app import create_app
from serve.cli import _StopSignals
from serve.jobs.store import AsyncJobStore
from serve.jobs.runner import JobRunner
from serve.settings import JobSettings
from serve.settings import ApiLimits
from serve.graph.shutdown import drain
from tests.jobfakes import FakeJobBackend
from tests.unit.test_api import GOOD, FakeBackend


class FakeReplicas:
    """Ingress replicas behind a handle: each call lands on a random one, which drains and
    reports; a replica's work finishes ``finish_after`` polls after it was first reached."""

    def __init__(self, busy: dict[str, int], finish_after: int = 3, seed: int = 0, dead: set[str] = frozenset()):
        self.busy = dict(busy)
        self.draining: set[str] = set()
        self.polls = {name: 0 for name in busy}
        self.finish_after = finish_after
        self.dead = dead
        self.rng = random.Random(seed)

    async def call(self) -> dict:
        name = self.rng.choice(sorted(self.busy))
        if name in self.dead:
            raise RuntimeError(f"replica {name} died")
        self.draining.add(name)
        self.polls[name] += 1
        if self.polls[name] > self.finish_after:
            self.busy[name] = 0
        return {"replica": name, "draining": True, "requests": self.busy[name], "jobs": 0}


def test_drain_reaches_every_replica_and_waits_until_none_holds_work():
    replicas = FakeReplicas({"a": 2, "b": 1, "c": 0})
    progress = []
    state = asyncio.run(drain(replicas.call, 3, timeout_s=10, poll_s=0.001, on_progress=lambda s: progress.append(s.busy)))
    assert not state.timed_out and state.busy == 0 and set(state.reports) == {"a", "b", "c"}
    assert replicas.draining == {"a", "b", "c"}
    assert all(polls > replicas.finish_after for name, polls in replicas.polls.items() if name != "c")
    assert progress and progress[0] > 0  # told the operator what it waited for


def test_drain_gives_up_at_the_deadline_and_says_what_is_left():
    replicas = FakeReplicas({"a": 1, "b": 0}, finish_after=10**9)
    state = asyncio.run(drain(replicas.call, 2, timeout_s=0.2, poll_s=0.01))
    assert state.timed_out and state.busy == 1


def test_a_dead_replica_does_not_stop_the_drain_of_the_others():
    replicas = FakeReplicas({"a": 1, "b": 0}, dead={"b"})
    state = asyncio.run(drain(replicas.call, 2, timeout_s=0.3, poll_s=0.01))
    # It waits for the dead one until the deadline (it cannot tell dead from slow), then stops
    # with the live one drained.
    assert state.timed_out and set(state.reports) == {"a"} and state.busy == 0


def test_a_second_signal_ends_the_wait():
    replicas = FakeReplicas({"a": 1}, finish_after=10**9)
    calls = []
    state = asyncio.run(drain(replicas.call, 1, timeout_s=60, poll_s=0.001, abort=lambda: len(calls.append(1) or calls) > 3))
    assert state.timed_out and len(calls) == 4


def test_stop_signals_first_then_second():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        signals = _StopSignals()
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.first.wait(5) and not signals.second.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.second.wait(5)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class HeldBackend(FakeBackend):
    """Generations wait until released."""

    def __init__(self):
        super().__init__()
        self.release = asyncio.Event()
        self.entered = 0

    async def generate(self, spec, request_id, timeout_s=None):
        self.entered += 1
        await self.release.wait()
        return await super().generate(spec, request_id, timeout_s)


def test_draining_refuses_new_work_and_finishes_what_is_in_flight():
    async def scenario():
        backend = HeldBackend()
        settings = JobSettings(progress_interval_s=0.005)
        runner = JobRunner(AsyncJobStore(settings), FakeJobBackend(step_s=0.005), settings)
        app = create_app(ApiLimits(), backend, jobs=runner)
        gate = app.state.admission_gate
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            in_flight = asyncio.create_task(client.post("/v1/text2img", json=GOOD))
            while not backend.entered:  # until the request is inside
                await asyncio.sleep(0.001)
            assert gate.inside == 1
            gate.draining = True
            refused = {
                path: await client.post(path, json=body)
                for path, body in [
                    ("/v1/text2img", GOOD), ("/v1/jobs", {"mode": "text2img", "params": GOOD}),
                    ("/v1/images/generations", {"prompt": "a red circle"}), ("/sdapi/v1/txt2img", {"prompt": "x"}),
                ]
            }
            ready = await client.get("/readyz")
            health = await client.get("/healthz")
            backend.release.set()
            finished = await in_flight
        return backend, gate, refused, ready, health, finished

    backend, gate, refused, ready, health, finished = asyncio.run(scenario())
    for path, response in refused.items():
        assert response.status_code == 503, (path, response.text)
        error = response.json()["error"]
        assert error.get("code" if path.startswith("/v1/images/") else "type") == "shutting_down", (path, error)
        assert int(response.headers["Retry-After"]) >= 1
    assert backend.entered == 1 and len(backend.calls) == 1  # nothing refused reached a model
    assert ready.status_code == 503 and ready.json()["draining"] is True
    assert health.status_code == 200
    assert finished.status_code == 200 and len(finished.json()["images"]) == 1
    assert gate.inside == 0


def test_not_draining_admits_as_before():
    client = TestClient(create_app(ApiLimits(), FakeBackend()))
    assert client.post("/v1/text2img", json=GOOD).status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.app.state.admission_gate.draining is False


@pytest.mark.parametrize("inside", [0, 3])
def test_gate_refuses_every_entry_while_draining(inside):
    from serve.http.admission import AdmissionGate

    gate = AdmissionGate(limit=4)
    for client in range(inside):
        assert gate.try_enter(str(client))
    gate.draining = True
    assert not gate.try_enter() and gate.inside == inside
