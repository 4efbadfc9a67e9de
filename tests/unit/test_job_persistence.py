"""Job records on disk, idempotency keys and priorities in the store, the priority queue of
the runner, and the store proxy finding a dead store again. No Ray."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from serve.jobs.database import JobDatabase
from serve.jobs.runner import PrioritySlots
from serve.jobs.store import AsyncJobStore, IdempotencyConflict, JobStore
from serve.settings import JobSettings


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reopened(path, clock, settings=None) -> JobStore:
    return JobStore(settings or JobSettings(), clock=clock, database=JobDatabase(path))


def test_a_store_reopened_on_its_file_has_every_job_with_its_state_and_images(tmp_path):
    path, clock = tmp_path / "jobs.sqlite3", Clock()
    store = reopened(path, clock)
    store.create("done", "alice", "text2img", 64, 64, [1, 2])
    store.start("done", "runner-1")
    store.succeed("done", [b"png-one", b"png-two"], "image/png", [1, 2], {"decode": {"run_s": 0.1}})
    store.create("failed", "alice", "text2img", 64, 64, [3])
    store.start("failed", "runner-1")
    store.fail("failed", "generation_failed", "boom")
    store.create("waiting", "bob", "img2img", 64, 128, [4], priority=2)
    final = store.view("done")
    last_seq = store.events_after("done", 0)[0][-1]["seq"]
    store.database.close()

    clock.now += 5
    again = reopened(path, clock)
    assert len(again) == 3
    assert again.view("done") == final
    assert again.image("done", 1) == (b"png-two", "image/png")
    assert again.view("failed")["error"] == {"type": "generation_failed", "message": "boom"}
    waiting = again.view("waiting")
    assert (waiting["state"], waiting["priority"], waiting["height"], waiting["position"]) == ("queued", 2, 128, 0)
    # The history restarts with the current state, numbered after what clients already saw.
    events, finished = again.events_after("done", last_seq)
    assert finished and [e["event"] for e in events] == ["state"] and events[0]["seq"] == last_seq + 1
    assert events[0]["data"] == final


def test_an_unfinished_job_gets_a_fresh_lease_after_a_reload_and_is_lost_only_after_it(tmp_path):
    path, clock = tmp_path / "jobs.sqlite3", Clock()
    settings = JobSettings(lease_s=30)
    store = reopened(path, clock, settings)
    store.create("j", "alice", "text2img", 64, 64, [1])
    store.start("j", "runner-1")
    store.database.close()

    clock.now += 25  # the store was down for most of a lease
    again = reopened(path, clock, settings)
    clock.now += 20  # a runner that is alive reports within a lease of the restart
    assert again.view("j")["state"] == "running"
    assert again.report("j", "denoise", 3, 10, 0.5) is False
    clock.now += 31  # and one that is not is declared lost
    assert again.view("j")["error"]["type"] == "runner_lost"


def test_expired_and_evicted_jobs_leave_the_file_too(tmp_path):
    path, clock = tmp_path / "jobs.sqlite3", Clock()
    store = reopened(path, clock, JobSettings(ttl_s=60))
    store.create("old", "alice", "text2img", 64, 64, [1])
    store.start("old", "r")
    store.succeed("old", [b"x" * 100], "image/png", [1], {})
    clock.now += 61
    store.sweep()
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    images = sqlite3.connect(path).execute("SELECT COUNT(*) FROM images").fetchone()[0]
    assert (rows, images) == (0, 0)
    assert len(reopened(path, clock)) == 0


def test_the_database_runs_in_wal_mode(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    JobDatabase(path)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_file_of_an_unknown_schema_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    sqlite3.connect(path).execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="schema 99.*move the file away"):
        JobDatabase(path)


def test_an_idempotency_key_returns_the_same_job_and_refuses_a_different_request():
    store = JobStore(JobSettings(), clock=Clock())
    store.create("j1", "alice", "text2img", 64, 64, [1], idempotency_key="k", fingerprint="f1")
    assert store.find_idempotent("alice", "k", "f1")["id"] == "j1"
    assert store.find_idempotent("bob", "k", "f1") is None, "keys are per client"
    assert store.find_idempotent("alice", "other", "f1") is None
    with pytest.raises(IdempotencyConflict, match="different request"):
        store.find_idempotent("alice", "k", "f2")


def test_the_async_store_answers_a_replay_without_creating_a_job():
    async def scenario():
        store = AsyncJobStore()
        first = await store.create("j1", "alice", "text2img", 64, 64, [1], idempotency_key="k", fingerprint="f")
        again = await store.create("j2", "alice", "text2img", 64, 64, [1], idempotency_key="k", fingerprint="f")
        conflict = await store.create("j3", "alice", "text2img", 64, 64, [1], idempotency_key="k", fingerprint="g")
        return first, again, conflict, len(store.store)

    first, again, conflict, count = asyncio.run(scenario())
    assert again == {"replayed": first} and "different request" in conflict["conflict"] and count == 1


def test_an_idempotency_key_survives_a_reload(tmp_path):
    path, clock = tmp_path / "jobs.sqlite3", Clock()
    reopened(path, clock).create("j1", "alice", "text2img", 64, 64, [1], idempotency_key="k", fingerprint="f")
    assert reopened(path, clock).find_idempotent("alice", "k", "f")["id"] == "j1"


def test_queue_positions_put_higher_priority_first_then_first_come_first_served():
    clock = Clock()
    store = JobStore(JobSettings(), clock=clock)
    for job_id, priority in (("a", 0), ("b", 0), ("c", 5), ("d", -1), ("e", 5)):
        clock.now += 1
        store.create(job_id, "alice", "text2img", 64, 64, [1], priority=priority)
    positions = {job["id"]: job["position"] for job in store.list_jobs("alice")["jobs"]}
    assert positions == {"c": 0, "e": 1, "a": 2, "b": 3, "d": 4}


def test_a_repeated_create_of_the_same_job_answers_with_it():
    store = JobStore(JobSettings(), clock=Clock())
    first = store.create("j1", "alice", "text2img", 64, 64, [1])
    assert store.create("j1", "alice", "text2img", 64, 64, [1]) == first and len(store) == 1
    with pytest.raises(ValueError):
        store.create("j1", "mallory", "text2img", 64, 64, [1])


def test_priority_slots_serve_the_highest_priority_first_and_equals_in_order():
    async def scenario():
        slots = PrioritySlots(1)
        order: list[str] = []
        await slots.acquire()  # the one slot is busy

        async def job(name: str, priority: int) -> None:
            async with slots.held(priority):
                order.append(name)

        tasks = [asyncio.ensure_future(job(name, priority))
                 for name, priority in (("low", -1), ("a", 0), ("high", 3), ("b", 0), ("high2", 3))]
        await asyncio.sleep(0)  # all of them wait
        assert slots.waiting == 5
        slots.release()
        await asyncio.gather(*tasks)
        return order, slots.in_use

    order, in_use = asyncio.run(scenario())
    assert order == ["high", "high2", "a", "b", "low"] and in_use == 0


def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on():
    async def scenario():
        slots = PrioritySlots(1)
        await slots.acquire()
        first = asyncio.ensure_future(slots.acquire(5))
        second = asyncio.ensure_future(slots.acquire(0))
        await asyncio.sleep(0)
        slots.release()  # handed to ``first`` ...
        first.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, 1)
        return slots.in_use, slots.waiting

    assert asyncio.run(scenario()) == (1, 0)


def test_the_store_proxy_finds_a_dead_store_again_and_retries_the_call(monkeypatch):
    from ray.exceptions import ActorDiedError

    import serve.jobs.actor as actor_module
    from serve.jobs.actor import ActorJobStore

    monkeypatch.setattr(actor_module, "RECONNECT_WAITS_S", (0.0, 0.0))

    class Method:
        def __init__(self, function):
            self.function = function

        def options(self, **_):
            return self

        def remote(self, *args, **kwargs):
            return self.function(*args, **kwargs)

    class DeadActor:
        def __getattr__(self, name):
            async def died(*args, **kwargs):
                raise ActorDiedError()
            return Method(died)

    class LiveActor:
        def __init__(self, store):
            self.store = store

        def __getattr__(self, name):
            return Method(getattr(self.store, name))

    store = AsyncJobStore()
    found_again = []

    def reconnect():
        found_again.append(True)
        return LiveActor(store)

    async def scenario():
        await store.create("j1", "alice", "text2img", 64, 64, [1])
        proxy = ActorJobStore(DeadActor(), reconnect=reconnect)
        view = await proxy.view("j1")
        without = ActorJobStore(DeadActor())
        with pytest.raises(ActorDiedError):
            await without.view("j1")
        return view

    assert asyncio.run(scenario())["id"] == "j1" and found_again == [True]
