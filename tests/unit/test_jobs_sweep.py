"""Sweeps as jobs (``POST /v1/jobs`` mode ``sweep``) with fake backends and an in-process store:
validation, the cells run and their result, progress over the cells, failure, cancellation,
the job options, and the records on disk. No Ray, no models."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time

import pytest
from fastapi.testclient import TestClient

from serve.http.admission import generation_cost
from serve.http.app import create_app
from serve.http.auth import add_key
from serve.http.job_routes import JobOut
from serve.jobs.database import JobDatabase
from serve.jobs.progress import CombinedTracker, LoopProgress, StageTracker
from serve.jobs.runner import JobRunner
from serve.jobs.store import AsyncJobStore, JobStore
from serve.settings import ApiLimits, AuthSettings, JobSettings
from tests.jobfakes import FakeJobBackend
from tests.unit.test_job_options import Receiver, verify
from tests.unit.test_job_options import make_client as make_options_client
from tests.unit.test_jobs_api import read_events, wait_for
from tests.unit.test_sweep import ImageBackend, png, spec_fields

BASE = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 4, "prior_steps": 2, "seed": 9}
AXES = [{"field": "steps", "values": [2, 3]}, {"field": "guidance_scale", "values": [1.5, 7]}]
SWEEP = {"base": BASE, "axes": AXES}


def drawn(seed, spec) -> bytes:
    """The image the synchronous sweep's fake draws for the same seed and size."""
    return png(seed, (spec.width, spec.height))


def make_client(backend=None, unavailable=None, database=None, **settings):
    """An app whose jobs run on ``backend`` and whose /v1/sweep runs on an ImageBackend."""
    backend = backend or FakeJobBackend(image=drawn)
    job_settings = JobSettings(**{"progress_interval_s": 0.005, **settings})
    runner = JobRunner(AsyncJobStore(job_settings, database=database), backend, job_settings)
    sync = ImageBackend()
    app = create_app(ApiLimits(max_image_pixels=512 * 512), sync, unavailable=unavailable, jobs=runner)
    return TestClient(app), backend, sync


def submit(client, params, headers=None, **fields):
    return client.post("/v1/jobs", json={"mode": "sweep", "params": params, **fields}, headers=headers or {})


def test_a_sweep_job_has_the_cells_and_grid_of_the_same_synchronous_sweep():
    client, backend, sync = make_client()
    with client:
        submitted = submit(client, SWEEP)
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()
        assert job["mode"] == "sweep" and job["seeds"] == [9] * 4 and (job["width"], job["height"]) == (64, 64)
        assert [cell["values"] for cell in job["sweep"]["cells"]] == [
            {"steps": 2, "guidance_scale": 1.5}, {"steps": 3, "guidance_scale": 1.5},
            {"steps": 2, "guidance_scale": 7}, {"steps": 3, "guidance_scale": 7}]
        assert all(cell["images"] == [] for cell in job["sweep"]["cells"]) and job["sweep"]["grid"] is None
        final = wait_for(client, job["id"], {"succeeded"})
        expected = client.post("/v1/sweep", json=SWEEP).json()
        cell_images = [[client.get(image["url"]).content for image in cell["images"]] for cell in final["sweep"]["cells"]]
        grid = client.get(final["sweep"]["grid"]["url"])
    JobOut.model_validate(final)  # the schema documents what GET answers
    got, want = final["sweep"], expected
    assert got["axes"] == want["axes"] and got["mode"] == "text2img"
    for cell, images, expected_cell in zip(got["cells"], cell_images, want["cells"], strict=True):
        for field in ("index", "values", "seeds", "warnings"):
            assert cell[field] == expected_cell[field], field
        assert images == [base64.b64decode(image) for image in expected_cell["images"]]
        assert cell["total_ms"] >= 0
    assert grid.content == base64.b64decode(want["grid"]) and grid.headers["content-type"] == "image/png"
    assert (got["grid"]["width"], got["grid"]["height"]) == (want["grid_width"], want["grid_height"])
    # The top level lists the cells' images in cell order (the grid has no seed: it is not among them).
    assert [image["url"] for image in final["images"]] == [i["url"] for cell in got["cells"] for i in cell["images"]]
    assert final["seeds"] == [9] * 4 and final["progress"] == 1.0
    # The same requests as the synchronous sweep's, each under a request id of its own.
    assert [spec_fields(spec) for spec in backend.specs] == [spec_fields(spec) for spec, _ in sync.calls]
    assert backend.started == [f"{job['id']}.{number}" for number in range(4)]


def test_without_a_seed_the_cells_share_the_one_drawn_at_submit():
    client, _, _ = make_client()
    with client:
        job = submit(client, {"base": {**BASE, "seed": None}, "axes": AXES, "grid": False}).json()
        final = wait_for(client, job["id"], {"succeeded"})
    assert len(set(final["seeds"])) == 1 and final["seeds"] == job["seeds"]
    assert final["sweep"]["grid"] is None and len(final["images"]) == 4


@pytest.mark.parametrize(
    "params,field,words",
    [
        ({"base": BASE, "axes": [{"field": "steps", "values": [4, 151]}]}, "params.axes.0.values.1",
         "less than or equal to 150"),
        ({"base": BASE, "axes": [{"field": "steps", "values": [1, 2, 3, 4, 5]}, {"field": "seed", "values": [1, 2, 3, 4]}]},
         "params.axes", "5 x 4 = 20 cells exceeds the limit of 16 cells (max_sweep_cells)"),
        ({"base": BASE, "axes": [{"field": "strength", "values": [0.5]}]}, "params.axes.0.field",
         "text2img has no strength; sweep it with mode img2img"),
        ({"base": {**BASE, "num_images": 4}, "axes": [{"field": "seed", "values": list(range(9))}]},
         "params.base.num_images", "36 images exceeds the limit of 32 images per sweep (max_sweep_images)"),
        ({"base": {**BASE, "nsfw": True}, "axes": AXES}, "params.base.nsfw", "Extra inputs are not permitted"),
        ({"base": BASE, "axes": AXES, "colour": "red"}, "params.colour", "Extra inputs are not permitted"),
        ({"axes": AXES}, "params.base", "Field required"),
        ({"base": BASE, "axes": AXES, "mode": "inpaint"}, "params.mode", "'text2img' or 'img2img'"),
    ],
)
def test_a_bad_sweep_is_a_422_naming_the_params_field_and_the_limit_before_anything_is_created(params, field, words):
    client, backend, _ = make_client()
    with client:
        response = submit(client, params)
        assert response.status_code == 422, response.text
        details = response.json()["error"]["details"]
        assert any(d["field"] == field and words in d["message"] for d in details), details
        assert client.get("/v1/jobs").json()["jobs"] == [] and backend.started == []


def test_an_unknown_model_or_unconfigured_mode_is_a_404_naming_it():
    client, backend, _ = make_client(unavailable={"img2img": "img2img is not configured"})
    with client:
        unknown = submit(client, {"base": {**BASE, "model": "kandinsky-9"}, "axes": AXES})
        assert unknown.status_code == 404 and unknown.json()["error"]["details"][0]["field"] == "params.base.model"
        off = submit(client, {"mode": "img2img", "base": BASE, "axes": AXES})
        assert off.status_code == 404 and off.json()["error"]["type"] == "mode_not_configured"
    assert backend.started == []


class FailingCell(FakeJobBackend):
    """Cells with 3 steps fail a moment after they start."""

    async def generate_job(self, spec, job_id):
        if spec.steps == 3:
            await asyncio.sleep(0.05)
            raise RuntimeError("denoiser exploded\nTraceback: secret internals")
        return await super().generate_job(spec, job_id)


def test_a_failing_cell_fails_the_job_naming_the_cell_and_stops_the_others():
    client, backend, _ = make_client(FailingCell(step_s=0.01, image=drawn))
    with client:
        job = submit(client, {"base": {**BASE, "steps": 150}, "axes": [{"field": "steps", "values": [150, 3, 149]}]})
        final = wait_for(client, job.json()["id"], {"failed"})
    assert final["error"] == {"type": "generation_failed", "message": "cell 1 (steps 3): generation failed: RuntimeError"}
    assert backend.where == {}, "no cell still runs"
    assert all(steps < 150 for steps in backend.steps_run.values())
    assert final["images"] == [] and all(cell["images"] == [] for cell in final["sweep"]["cells"])


def test_cancelling_a_running_sweep_job_stops_every_cell():
    client, backend, _ = make_client(FakeJobBackend(step_s=0.01))
    with client:
        job = submit(client, {"base": {**BASE, "steps": 150}, "axes": [{"field": "seed", "values": [1, 2, 3]}]}).json()
        wait_for(client, job["id"], {"running"})
        deadline = time.monotonic() + 10
        while len(backend.where) < 3:
            assert time.monotonic() < deadline, "the cells never started"
            time.sleep(0.01)  # polling interval
        response = client.delete(f"/v1/jobs/{job['id']}")
        assert response.status_code == 200 and response.json()["state"] == "cancelled"
        steps = dict(backend.steps_run)
        time.sleep(0.05)  # several steps' time: none of them runs
    assert backend.where == {} and backend.steps_run == steps and len(steps) == 3


def test_progress_moves_forward_with_each_loop_stage_counting_every_cells_steps():
    client, _, _ = make_client(FakeJobBackend(step_s=0.003, image=drawn))
    params = {"base": {**BASE, "prior_steps": 5}, "axes": [{"field": "steps", "values": [20, 30]}]}
    with client:
        job = submit(client, params).json()
        events = read_events(client, job["id"])
    progress = [e["data"]["progress"] for e in events if e["event"] != "preview"]
    assert progress == sorted(progress) and progress[-1] == 1.0
    by_stage = {e["data"]["stage"]: e["data"]["steps"] for e in events if e["event"] == "progress"}
    assert by_stage.get("prior", 10) == 10 and by_stage["denoise"] == 50, by_stage  # 5 + 5 prior, 20 + 30 U-Net steps
    denoise = [e["data"]["step"] for e in events if e["event"] == "progress" and e["data"]["stage"] == "denoise"]
    assert denoise == sorted(denoise) and len(set(denoise)) > 3, denoise
    assert events[-1]["data"]["state"] == "succeeded"


def test_combined_progress_is_each_cells_own_for_one_and_their_sum_and_weighted_mean_for_several():
    polls = [LoopProgress(prior=(1, 4)), LoopProgress(prior=(4, 4)), LoopProgress(denoise=(3, 10)), LoopProgress()]
    alone, combined = StageTracker(4, 10), CombinedTracker([StageTracker(4, 10)])
    assert [combined.update([poll]) for poll in polls] == [alone.update(poll) for poll in polls]

    short, long = StageTracker(2, 2), StageTracker(2, 38)
    tracker = CombinedTracker([short, long])
    first = tracker.update([LoopProgress(prior=(2, 2)), LoopProgress(prior=(1, 2))])
    assert (first.stage, first.step, first.steps) == ("prior", 3, 4)
    short.finish()  # its images came back between two polls
    second = tracker.update([None, LoopProgress(denoise=(19, 38))])
    assert (second.stage, second.step, second.steps) == ("denoise", 21, 40)
    # Weighted by each cell's work: the long cell half done is most of the job left.
    expected = (2.5 * short.report().progress + 38.5 * long.report().progress) / 41
    assert second.progress == pytest.approx(expected) and first.progress < second.progress < 0.6
    long.finish()
    last = tracker.update([None, None])
    assert (last.stage, last.step, last.steps, last.progress) == ("decode", 40, 40, pytest.approx(0.95))


def test_idempotency_key_replays_a_sweep_job_and_refuses_a_different_one():
    client, _, _ = make_options_client()
    body = {**SWEEP, "grid": False}
    with client:
        first = submit(client, body, {"Idempotency-Key": "sweep-1"})
        again = submit(client, body, {"Idempotency-Key": "sweep-1"})
        other = submit(client, {**body, "axes": AXES[:1]}, {"Idempotency-Key": "sweep-1"})
    assert first.status_code == again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert other.status_code == 409 and other.json()["error"]["type"] == "idempotency_key_reused"


def test_a_sweep_jobs_webhook_carries_its_cells_and_its_priority_is_capped_as_any_jobs():
    receiver = Receiver()
    client, _, _ = make_options_client(receiver=receiver, max_priority=2)
    with client:
        refused = submit(client, SWEEP, priority=3)
        assert refused.status_code == 422 and refused.json()["error"]["details"][0]["field"] == "priority"
        job = submit(client, {**SWEEP, "grid": False}, priority=2, webhook_url="https://hooks.example.com/done").json()
        assert job["priority"] == 2
        final = wait_for(client, job["id"], {"succeeded"})
        deadline = time.monotonic() + 10
        while not receiver.calls:
            assert time.monotonic() < deadline, "the webhook was never called"
            time.sleep(0.01)  # polling interval
    payload = verify(receiver.calls[0])
    assert payload == {"event": "job.succeeded", "job": final} and len(payload["job"]["sweep"]["cells"]) == 4


def test_a_sweep_job_is_charged_each_cell_as_the_synchronous_sweep_is(tmp_path):
    path = tmp_path / "keys.yaml"
    one_cell = generation_cost(1, 64, 64, 4, 2)
    key = add_key(path, "budget", requests_per_s=1000, images_per_min=2.5 * one_cell)
    job_settings = JobSettings(progress_interval_s=0.005)
    runner = JobRunner(AsyncJobStore(job_settings), FakeJobBackend(), job_settings)
    client = TestClient(create_app(ApiLimits(), ImageBackend(), jobs=runner, auth=AuthSettings(api_keys_file=path)))
    bearer = {"Authorization": f"Bearer {key}"}
    seeds = {"base": BASE, "axes": [{"field": "seed", "values": [1, 2]}], "grid": False}
    with client:
        assert submit(client, seeds, bearer).status_code == 202  # two cells: two of the 2.5 allowed
        alone = client.post("/v1/jobs", json={"mode": "text2img", "params": BASE}, headers=bearer)
        assert alone.status_code == 429 and alone.json()["error"]["type"] == "rate_limited"


def test_sweep_jobs_survive_the_database_round_trip_and_old_records_still_load(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    client, _, _ = make_client(database=JobDatabase(path), max_running_jobs=1)
    with client:
        done = submit(client, SWEEP).json()
        final = wait_for(client, done["id"], {"succeeded"})
        queued_view = submit(client, {**SWEEP, "grid": False}).json()
        grid = client.get(final["sweep"]["grid"]["url"]).content
        plain = client.post("/v1/jobs", json={"mode": "text2img", "params": BASE}).json()
        for job in (queued_view, plain):
            wait_for(client, job["id"], {"succeeded"})
    # An older version wrote records without the field: drop it from the plain job's record.
    db = sqlite3.connect(path)
    record = json.loads(db.execute("SELECT record FROM jobs WHERE id = ?", (plain["id"],)).fetchone()[0])
    del record["sweep"]
    db.execute("UPDATE jobs SET record = ? WHERE id = ?", (json.dumps(record), plain["id"]))
    db.commit()
    db.close()

    again = JobStore(JobSettings(), database=JobDatabase(path))
    assert again.view(done["id"]) == final
    assert again.image(done["id"], final["sweep"]["grid"]["index"]) == (grid, "image/png")
    assert [cell["values"] for cell in again.view(queued_view["id"])["sweep"]["cells"]] == [
        cell["values"] for cell in queued_view["sweep"]["cells"]]
    old = again.view(plain["id"])
    assert old["state"] == "succeeded" and old["sweep"] is None and len(old["images"]) == 1
