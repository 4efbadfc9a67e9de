"""The job store, the progress tracker and the runner, without Ray or HTTP."""

from __future__ import annotations

import asyncio

import pytest

from serve.jobs.progress import DECODE_SHARE, LoopProgress, StageTracker
from serve.jobs.store import AsyncJobStore, JobLimitError, JobStore
from serve.jobs.runner import JobRunner, Submission
from serve.settings import JobSettings
from serve.http.schemas import request_models
from serve.settings import ApiLimits
from tests.jobfakes import FakeJobBackend

MODELS = request_models(ApiLimits())


def spec(**params):
    return MODELS["text2img"].model_validate({"prompt": "a cat", "width": 64, "height": 64, "seed": 1,
                                              "prior_steps": 3, "steps": 5, **params}).to_spec()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def new_store(clock=None, **settings) -> JobStore:
    return JobStore(JobSettings(**settings), clock=clock or Clock())


def test_lifecycle_events_are_numbered_and_the_last_one_is_the_final_view():
    store = new_store()
    store.create("a", "c1", "text2img", 64, 64, [7])
    assert store.start("a", "replica-1")
    store.report("a", "prior", 1, 3, 0.1)
    store.report("a", "prior", 1, 3, 0.05)  # a lower progress is clamped
    store.succeed("a", [b"png"], "image/png", [7], {"movq": {"queue_ms": 1.0}})
    events, finished = store.events_after("a", 0)
    assert finished
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    progress = [e["data"]["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert [e["data"]["state"] for e in events if e["event"] == "state"] == ["queued", "running", "succeeded"]
    assert events[-1]["data"] == store.view("a")
    assert store.image("a", 0) == (b"png", "image/png") and store.image("a", 1) is None
    assert store.view("a")["images"][0]["url"] == "/v1/jobs/a/images/0"


def test_cancel_outcomes():
    store = new_store()
    assert store.cancel("nope") == ("unknown", None)
    store.create("q", "c", "text2img", 64, 64, [1])
    outcome, view = store.cancel("q")
    assert outcome == "cancelled" and view["state"] == "cancelled"
    assert not store.start("q", "r")  # a cancelled queued job never starts
    store.create("r", "c", "text2img", 64, 64, [1])
    store.start("r", "owner")
    outcome, view = store.cancel("r")
    assert outcome == "cancelling" and view["state"] == "running" and view["cancel_requested"]
    assert store.report("r", "prior", 1, 3, 0.2) is True  # the runner hears of it at its next report
    store.mark_cancelled("r")
    assert store.view("r")["state"] == "cancelled"
    assert store.cancel("r")[0] == "finished"


def test_caps_per_client_in_total_and_stored_with_retry_after():
    clock = Clock()
    store = new_store(clock, max_active_jobs_per_client=2, max_active_jobs=3, max_stored_jobs=4, ttl_s=60,
                      max_stored_jobs_per_client=4)
    store.create("a", "c1", "text2img", 64, 64, [1])
    store.create("b", "c1", "text2img", 64, 64, [1])
    with pytest.raises(JobLimitError, match="max_active_jobs_per_client=2") as error:
        store.create("c", "c1", "text2img", 64, 64, [1])
    assert error.value.retry_after_s >= 1
    store.create("c", "c2", "text2img", 64, 64, [1])
    with pytest.raises(JobLimitError, match="max_active_jobs=3"):
        store.create("d", "c3", "text2img", 64, 64, [1])
    for job in ("a", "b", "c"):
        store.start(job, "r")
        store.succeed(job, [b"x"], "image/png", [1], {})
    store.create("d", "c3", "text2img", 64, 64, [1])
    clock.now += 10
    with pytest.raises(JobLimitError, match="max_stored_jobs=4") as error:
        store.create("e", "c3", "text2img", 64, 64, [1])
    assert error.value.retry_after_s == 50  # until the oldest finished job expires
    clock.now += 51
    store.create("e", "c3", "text2img", 64, 64, [1])
    assert store.view("a") is None and store.view("d") is not None


def _finished(store, job_id, client, image=b"x"):
    store.create(job_id, client, "text2img", 64, 64, [1])
    store.start(job_id, "r")
    store.succeed(job_id, [image], "image/png", [1], {})


def test_stored_bytes_are_capped_and_a_client_makes_room_from_its_own_finished_jobs():
    store = new_store(max_stored_bytes=6000, max_stored_bytes_per_client=100_000)
    _finished(store, "a", "c1", b"0" * 5000)
    with pytest.raises(JobLimitError, match="max_stored_bytes=6000"):
        store.create("b", "c2", "text2img", 64, 64, [1])  # c2 cannot make room from c1's jobs
    store.create("b", "c1", "text2img", 64, 64, [1])  # c1 can: its own oldest finished job goes
    assert store.view("a") is None and store.view("b")["state"] == "queued"


def test_one_client_cannot_fill_the_store_for_everyone():
    clock = Clock()
    store = new_store(clock, max_stored_jobs=10, max_stored_jobs_per_client=4, max_active_jobs_per_client=2, ttl_s=3600)
    for index in range(40):  # a flood of tiny jobs from one client
        clock.now += 1
        _finished(store, f"flood-{index}", "hog")
    held = [job_id for job_id in (f"flood-{i}" for i in range(40)) if store.view(job_id) is not None]
    assert held == [f"flood-{i}" for i in range(36, 40)], "the hog keeps only its newest jobs"
    for index in range(6):
        _finished(store, f"other-{index}", f"client-{index}")  # everyone else still gets in
    assert len(store) == 10
    with pytest.raises(JobLimitError, match="max_stored_jobs=10") as error:
        store.create("late", "client-new", "text2img", 64, 64, [1])
    assert error.value.retry_after_s == 3600 - 3  # when the oldest stored job (flood-36, finished 3 s ago) expires
    store.create("mine", "client-0", "text2img", 64, 64, [1])  # a client with a finished job makes room
    assert store.view("other-0") is None


def test_a_clients_bytes_are_capped_and_events_and_previews_count():
    store = new_store(max_stored_bytes_per_client=20_000)
    store.create("a", "c", "text2img", 64, 64, [1])
    store.start("a", "r")
    empty = store._jobs["a"].stored_bytes
    assert empty > 0, "its events count"
    for step in range(1, 11):
        store.report("a", "denoise", step, 10, step / 10)
        store.add_preview("a", step, 10, b"p" * 3000, "image/jpeg")
    previews = [event for event in store.events_after("a", 0)[0] if event["event"] == "preview"]
    assert len(previews) == 10 and [p["data"]["image"] is not None for p in previews] == [False] * 9 + [True]
    held = store._jobs["a"].stored_bytes
    assert 4000 < held - empty < 20_000, "one preview image is held, and the events"
    store.succeed("a", [b"0" * 20_000], "image/png", [1], {})
    store.create("b", "c", "text2img", 64, 64, [1])  # over its bytes: its finished job made room
    assert store.view("a") is None


def test_a_fetched_job_is_kept_for_the_shorter_ttl():
    clock = Clock()
    store = new_store(clock, ttl_s=3600, fetched_ttl_s=300)
    _finished(store, "read", "c")
    _finished(store, "unread", "c")
    assert store.image("read", 0) is not None
    clock.now += 301
    assert store.view("read") is None and store.view("unread") is not None
    clock.now += 3300
    assert store.view("unread") is None


def test_stored_jobs_per_client_must_hold_its_active_jobs():
    with pytest.raises(ValueError, match="max_stored_jobs_per_client"):
        JobSettings(max_stored_jobs_per_client=2, max_active_jobs_per_client=8)
    assert JobSettings(max_stored_image_bytes=5).max_stored_bytes == 5, "the old name still reads"


def test_job_settings_come_from_the_application_args():
    from serve.settings import ConfigError, parse_service_settings

    settings = parse_service_settings({"jobs": {"ttl_s": 60, "max_running_jobs": 2}})
    assert settings.jobs.ttl_s == 60 and settings.jobs.max_running_jobs == 2
    with pytest.raises(ConfigError, match="args.jobs.ttl_s"):
        parse_service_settings({"jobs": {"ttl_s": 0}})
    with pytest.raises(ConfigError, match="args.jobs.colour"):
        parse_service_settings({"jobs": {"colour": 1}})


def test_finished_jobs_expire_after_the_ttl_and_lost_runners_fail_their_jobs():
    clock = Clock()
    store = new_store(clock, ttl_s=30, lease_s=10)
    store.create("done", "c", "text2img", 64, 64, [1])
    store.start("done", "r")
    store.succeed("done", [b"x"], "image/png", [1], {})
    store.create("orphan", "c", "text2img", 64, 64, [1])
    store.start("orphan", "r")
    clock.now += 9
    store.report("orphan", "prior", 1, 3, 0.1)
    clock.now += 9
    assert store.view("orphan")["state"] == "running"  # reported 9 s ago: within the lease
    clock.now += 2
    assert store.view("done")["state"] == "succeeded"
    clock.now += 9.5
    lost = store.view("orphan")
    assert lost["state"] == "failed" and lost["error"]["type"] == "runner_lost"
    clock.now += 1
    assert store.view("done") is None  # 31.5 s after it finished


def test_tracker_moves_through_the_stages_and_never_back():
    tracker = StageTracker(prior_steps=4, decoder_steps=10)
    seen = [tracker.update(LoopProgress())]
    for done in range(5):
        seen.append(tracker.update(LoopProgress(prior=(done, 4))))
    seen.append(tracker.update(LoopProgress()))  # the prior is done, the denoiser has not admitted it yet
    for done in range(11):
        seen.append(tracker.update(LoopProgress(denoise=(2 * done, 20))))
    seen.append(tracker.update(LoopProgress(prior=(1, 4))))  # a stale poll changes nothing
    seen.append(tracker.update(LoopProgress()))
    stages = [report.stage for report in seen]
    assert stages[0] == "encode" and stages[-1] == "decode"
    order = ["encode", "prior", "denoise", "decode"]
    assert [order.index(s) for s in stages] == sorted(order.index(s) for s in stages)
    progress = [report.progress for report in seen]
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1 - DECODE_SHARE)
    denoise = [r for r in seen if r.stage == "denoise"]
    assert denoise[-1].step == 10 and denoise[-1].steps == 10


async def _settled(condition, timeout_s=10.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)  # polling interval


def test_runner_runs_a_job_to_success_with_forward_progress():
    async def scenario():
        backend = FakeJobBackend(step_s=0.01)
        store = AsyncJobStore(JobSettings(progress_interval_s=0.005))
        runner = JobRunner(store, backend, store.store.settings)
        view = await runner.submit(Submission(spec(num_images=2), "text2img", "c"))
        final = await runner.wait(view["id"])
        events, finished = await store.wait_events(view["id"], 0, 0)
        return backend, final, events, finished

    backend, final, events, finished = asyncio.run(scenario())
    assert final["state"] == "succeeded" and finished
    assert [image["seed"] for image in final["images"]] == [1, 2]
    assert backend.steps_run[final["id"]] == 3 + 5
    progress = [e["data"]["progress"] for e in events if e["event"] != "preview"]
    assert progress == sorted(progress)
    stages = {e["data"]["stage"] for e in events}
    assert {"prior", "denoise"} <= stages  # per-step progress from the loops, not only stage changes
    assert events[-1]["data"] == final


def test_cancelling_a_running_job_stops_it_within_a_step_and_frees_its_slot():
    async def scenario():
        backend = FakeJobBackend(step_s=0.01)
        store = AsyncJobStore(JobSettings(progress_interval_s=0.005, max_running_jobs=1))
        runner = JobRunner(store, backend, store.store.settings)
        long = await runner.submit(Submission(spec(steps=150), "text2img", "c"))
        queued = await runner.submit(Submission(spec(), "text2img", "c"))
        await _settled(lambda: backend.steps_run.get(long["id"], 0) >= 5)
        assert (await store.view(queued["id"]))["state"] == "queued"  # one slot, taken
        outcome, view = await runner.cancel(long["id"])
        at_cancel = backend.steps_run[long["id"]]
        final_queued = await runner.wait(queued["id"])
        return outcome, view, at_cancel, backend.steps_run[long["id"]], final_queued, backend

    outcome, view, at_cancel, later, final_queued, backend = asyncio.run(scenario())
    assert outcome == "cancelling" and view["state"] == "cancelled"
    assert later == at_cancel < 3 + 150  # nothing ran after the cancel returned
    assert final_queued["state"] == "succeeded"  # the freed slot ran the next job


def test_a_cancelled_queued_job_never_starts():
    async def scenario():
        backend = FakeJobBackend()
        backend.gate = asyncio.Event()
        store = AsyncJobStore(JobSettings(max_running_jobs=1))
        runner = JobRunner(store, backend, store.store.settings)
        first = await runner.submit(Submission(spec(), "text2img", "c"))
        second = await runner.submit(Submission(spec(), "text2img", "c"))
        await _settled(lambda: first["id"] in backend.started)
        outcome, view = await runner.cancel(second["id"])
        backend.gate.set()
        await runner.wait(first["id"])
        await runner.wait(second["id"])
        return outcome, view, backend, second["id"]

    outcome, view, backend, second = asyncio.run(scenario())
    assert outcome == "cancelled" and view["state"] == "cancelled"
    assert second not in backend.started


def test_a_cancel_recorded_by_another_replica_reaches_the_runner():
    async def scenario():
        backend = FakeJobBackend(step_s=0.01)
        store = AsyncJobStore(JobSettings(progress_interval_s=0.005))
        runner = JobRunner(store, backend, store.store.settings)
        other = JobRunner(store, FakeJobBackend(), store.store.settings)  # another replica: same store
        job = await runner.submit(Submission(spec(steps=150), "text2img", "c"))
        await _settled(lambda: backend.steps_run.get(job["id"], 0) >= 2)
        outcome, view = await other.cancel(job["id"])
        final = await runner.wait(job["id"])
        return outcome, view, final

    outcome, view, final = asyncio.run(scenario())
    assert outcome == "cancelling" and view["state"] == "running" and view["cancel_requested"]
    assert final["state"] == "cancelled"


def test_a_failed_generation_fails_the_job_without_internals():
    async def scenario():
        runner = JobRunner(AsyncJobStore(), FakeJobBackend(fail=True))
        job = await runner.submit(Submission(spec(), "text2img", "c"))
        return await runner.wait(job["id"])

    final = asyncio.run(scenario())
    assert final["state"] == "failed"
    assert final["error"] == {"type": "generation_failed", "message": "generation failed: RuntimeError"}


def test_previews_every_n_steps_when_asked():
    async def scenario():
        backend = FakeJobBackend(step_s=0.01)
        store = AsyncJobStore(JobSettings(progress_interval_s=0.005))
        runner = JobRunner(store, backend, store.store.settings)
        job = await runner.submit(Submission(spec(steps=20), "text2img", "c", preview_every=5))
        await runner.wait(job["id"])
        events, _ = await store.wait_events(job["id"], 0, 0)
        return [e["data"] for e in events if e["event"] == "preview"]

    previews = asyncio.run(scenario())
    assert previews, "no preview event"
    steps = [p["step"] for p in previews]
    assert steps == sorted(steps) and all(b - a >= 5 for a, b in zip(steps, steps[1:]))
    assert previews[0]["media_type"] == "image/jpeg"


# Ray Serve's ingress wrapper defines an async __del__; garbage collection calls it too, unawaited.
@pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited:RuntimeWarning")
def test_a_stopping_ingress_replica_lets_its_jobs_finish():
    """Ray Serve's graceful stop calls the ingress's ``__del__`` once its requests are done;
    jobs run outside any request, so ``__del__`` itself waits for them (and admits nothing new)."""
    from serve.http.admission import AdmissionGate
    from serve.graph.ingress import Ingress

    async def scenario():
        backend = FakeJobBackend(step_s=0.01)
        store = AsyncJobStore(JobSettings(progress_interval_s=0.005, max_running_jobs=1))
        ingress = object.__new__(Ingress.func_or_class)  # the class without its Ray constructor
        ingress.gate, ingress.jobs = AdmissionGate(4), JobRunner(store, backend, store.store.settings)
        views = [await ingress.jobs.submit(Submission(spec(), "text2img", "c")) for _ in range(2)]  # one queued
        await ingress.__del__()
        return ingress, [await store.view(view["id"]) for view in views]

    ingress, finals = asyncio.run(scenario())
    assert [final["state"] for final in finals] == ["succeeded", "succeeded"]
    assert ingress.gate.draining and ingress.jobs.running == 0


def test_actor_proxy_forwards_exactly_the_stores_calls():
    """ActorJobStore is an AsyncJobStore over Ray: every coroutine of the store, nothing else."""
    import inspect

    from serve.jobs.actor import RUNNER_METHODS, ActorJobStore, JobStoreActor

    class Method:
        def __init__(self, function):
            self.function = function

        def remote(self, *args, **kwargs):  # Ray returns an awaitable ObjectRef
            return self.function(*args, **kwargs)

    class Actor:
        def __init__(self, store):
            self.store = store

        def __getattr__(self, name):
            return Method(getattr(self.store, name))

    public = {name for name, _ in inspect.getmembers(AsyncJobStore, inspect.iscoroutinefunction) if not name.startswith("_")}
    assert public <= ActorJobStore.METHODS and "configure" in ActorJobStore.METHODS
    assert RUNNER_METHODS <= public, "every runner call named for its concurrency group exists"

    async def scenario():
        actor = JobStoreActor({"persist": False})
        proxy = ActorJobStore(Actor(actor))
        created = await proxy.create("j1", "client", "text2img", 64, 64, [7])
        return created, await proxy.view("j1"), await actor.view("j1"), proxy

    created, through_proxy, direct, proxy = asyncio.run(scenario())
    assert created["id"] == "j1" and created["state"] == "queued"
    assert through_proxy == direct
    with pytest.raises(AttributeError):
        proxy.store  # not a store method: never forwarded
