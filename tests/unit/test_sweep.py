"""``POST /v1/sweep`` with a fake backend: cells, validation and caps before anything runs, the
grid, and a failing cell. No Ray, no models."""

import asyncio
import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deployments.messages import EncodedImages
from serve.errors import RequestTimedOut
from serve.http.app import create_app
from serve.http.grid import GridAxis, grid_layout
from serve.http.schemas import MAX_SEED, SCHEDULER_NAMES
from serve.settings import ApiLimits
from tests.unit.test_api import FakeBackend
from tests.unit.test_api_modes import IMAGE

BASE = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 4, "prior_steps": 2}
SPEC_FIELDS = ("prompt", "negative_prompt", "width", "height", "seeds", "prior_steps", "prior_guidance_scale", "steps",
               "guidance_scale", "output_format", "mode", "scheduler", "strength", "model", "family", "prior_model")


def png(seed: int, size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 40 % 256, 80, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageBackend(FakeBackend):
    """Real PNGs, a colour per seed; ``fail_steps``: cells with those steps fail, ``hang_steps``: never finish."""

    def __init__(self, fail_steps=(), hang_steps=(), error=None):
        super().__init__()
        self.fail_steps, self.hang_steps, self.error = fail_steps, hang_steps, error
        self.cancelled = 0

    async def generate(self, spec, request_id, timeout_s=None):
        self.calls.append((spec, request_id))
        if spec.steps in self.hang_steps:
            try:
                await asyncio.sleep(60)  # stands for a cell still denoising
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if spec.steps in self.fail_steps:
            raise self.error or RuntimeError("denoiser exploded")
        return EncodedImages([png(seed, (spec.width, spec.height)) for seed in spec.seeds], "image/png", list(spec.seeds))


@pytest.fixture
def backend():
    return ImageBackend()


@pytest.fixture
def client(backend):
    return TestClient(create_app(ApiLimits(max_image_pixels=512 * 512), backend))


def sweep(client, axes, base=BASE, **extra):
    return client.post("/v1/sweep", json={"base": base, "axes": axes, **extra})


def spec_fields(spec):
    return {name: getattr(spec, name) for name in SPEC_FIELDS}


def test_cells_are_the_product_axis_0_fastest_each_the_same_as_its_own_request(client, backend):
    axes = [{"field": "steps", "values": [2, 3]}, {"field": "guidance_scale", "values": [1.5, 7]}]
    response = sweep(client, axes, {**BASE, "seed": 9})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [cell["index"] for cell in body["cells"]] == [[0, 0], [1, 0], [0, 1], [1, 1]]
    assert [cell["values"] for cell in body["cells"]] == [
        {"steps": 2, "guidance_scale": 1.5}, {"steps": 3, "guidance_scale": 1.5},
        {"steps": 2, "guidance_scale": 7}, {"steps": 3, "guidance_scale": 7}]
    assert all(cell["seeds"] == [9] for cell in body["cells"])
    assert base64.b64decode(body["cells"][0]["images"][0]) == png(9)
    swept = [spec_fields(spec) for spec, _ in backend.calls]
    assert len({request_id for _, request_id in backend.calls}) == 4  # each cell keyed apart in the stages
    backend.calls.clear()
    for cell in body["cells"]:  # the same requests, one at a time
        assert client.post("/v1/text2img", json={**BASE, "seed": 9, **cell["values"]}).status_code == 200
    assert [spec_fields(spec) for spec, _ in backend.calls] == swept


def test_without_a_seed_every_cell_shares_one(client):
    body = sweep(client, [{"field": "prompt", "values": ["a cat", "a dog", "a cow"]}], {**BASE, "prompt": "x"}).json()
    assert len({tuple(cell["seeds"]) for cell in body["cells"]}) == 1
    again = sweep(client, [{"field": "prompt", "values": ["a cat"]}]).json()
    assert again["cells"][0]["seeds"] != body["cells"][0]["seeds"]  # drawn per sweep


def test_seed_axis_and_num_images(client):
    body = sweep(client, [{"field": "seed", "values": [10, 20]}], {**BASE, "num_images": 2}).json()
    assert [cell["seeds"] for cell in body["cells"]] == [[10, 11], [20, 21]]
    assert all(len(cell["images"]) == 2 for cell in body["cells"])


def test_every_scheduler_name_is_accepted_on_an_axis(client, backend):
    response = sweep(client, [{"field": "scheduler", "values": list(SCHEDULER_NAMES)}])
    assert response.status_code == 200, response.text
    assert [spec.scheduler for spec, _ in backend.calls] == list(SCHEDULER_NAMES)


def test_img2img_sweeps_strength_with_the_image_decoded(client, backend):
    base = {"image": IMAGE, "prompt": "a cat", "steps": 10, "seed": 1}
    response = sweep(client, [{"field": "strength", "values": [0.2, 0.9]}], base, mode="img2img")
    assert response.status_code == 200, response.text
    assert [(spec.mode, spec.strength, spec.image.shape) for spec, _ in backend.calls] == [
        ("img2img", 0.2, (64, 64, 3)), ("img2img", 0.9, (64, 64, 3))]


def test_the_grid_is_labelled_and_sized_by_its_axes(client):
    axes = [{"field": "steps", "values": [2, 3, 4]}, {"field": "seed", "values": [1, 2]}]
    body = sweep(client, axes).json()
    grid = Image.open(io.BytesIO(base64.b64decode(body["grid"])), formats=["PNG"])
    layout = grid_layout((64, 64), [GridAxis("steps", ("2", "3", "4")), GridAxis("seed", ("1", "2"))])
    assert grid.size == layout.size == (body["grid_width"], body["grid_height"])
    x, y = layout.cell_origin(4)  # steps 3, seed 2
    assert grid.getpixel((x + 5, y + 5)) == Image.open(io.BytesIO(png(2))).getpixel((0, 0))
    assert sweep(client, axes, grid=False).json()["grid"] is None


@pytest.mark.parametrize(
    "axes,base,extra,field,words",
    [
        ([{"field": "steps", "values": [1, 2, 3, 4, 5]}, {"field": "seed", "values": [1, 2, 3, 4]}], BASE, {},
         "axes", "5 x 4 = 20 cells exceeds the limit of 16 cells (max_sweep_cells)"),
        ([{"field": "seed", "values": list(range(17))}], BASE, {}, "axes.0.values", "at most 16 items"),
        ([{"field": f, "values": [1]} for f in ("seed", "steps", "guidance_scale", "prompt")], BASE, {},
         "axes", "at most 3 items"),
        ([], BASE, {}, "axes", "at least 1 item"),
        ([{"field": "steps", "values": [1]}, {"field": "steps", "values": [2]}], BASE, {},
         "axes.1.field", "steps is swept by axes.0 already"),
        ([{"field": "strength", "values": [0.5]}], BASE, {}, "axes.0.field", "text2img has no strength; sweep it with mode img2img"),
        ([{"field": "width", "values": [64]}], BASE, {}, "axes.0.field", "'seed', 'steps'"),
        ([{"field": "steps", "values": [4, 151]}], BASE, {}, "axes.0.values.1", "less than or equal to 150"),
        ([{"field": "steps", "values": [4]}, {"field": "guidance_scale", "values": [1.0, "high"]}], BASE, {},
         "axes.1.values.1", "valid number"),
        ([{"field": "scheduler", "values": ["ddim", "euler-magic"]}], BASE, {}, "axes.0.values.1", "'ddpm'"),
        ([{"field": "prompt", "values": ["a cat", "   "]}], BASE, {}, "axes.0.values.1", "non-whitespace"),
        ([{"field": "seed", "values": [1, MAX_SEED]}], {**BASE, "num_images": 2}, {}, "axes.0.values.1",
         "seed + num_images - 1"),
        ([{"field": "seed", "values": [1]}], {**BASE, "nsfw": True}, {}, "base.nsfw", "Extra inputs are not permitted"),
        ([{"field": "seed", "values": [1]}], {"width": 64}, {}, "base.prompt", "Field required"),
        ([{"field": "seed", "values": list(range(9))}], {**BASE, "num_images": 4}, {}, "base.num_images",
         "9 cells x num_images 4 = 36 images exceeds the limit of 32 images per sweep (max_sweep_images)"),
        ([{"field": "steps", "values": [1, 10]}], {"image": IMAGE, "prompt": "a cat", "strength": 0.3},
         {"mode": "img2img"}, "axes.0.values.0", "strength 0.3 x steps 1 leaves no denoising step"),
        ([{"field": "seed", "values": [1]}], {"image": "bm90IGFuIGltYWdl", "prompt": "a cat"},
         {"mode": "img2img"}, "base.image", ""),
        ([{"field": "seed", "values": [1]}], BASE, {"mode": "inpaint"}, "mode", "'text2img' or 'img2img'"),
    ],
)
def test_bad_sweeps_are_422_naming_the_field_before_any_cell_runs(client, backend, axes, base, extra, field, words):
    response = sweep(client, axes, base, **extra)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert any(d["field"] == field and words in d["message"] for d in error["details"]), error
    assert backend.calls == []


def test_one_bad_value_is_named_once_however_many_cells_hold_it(client):
    axes = [{"field": "steps", "values": [4, 999]}, {"field": "seed", "values": [1, 2, 3]}]
    details = sweep(client, axes).json()["error"]["details"]
    assert [d["field"] for d in details] == ["axes.0.values.1"]


def test_the_caps_are_the_configured_ones(backend):
    client = TestClient(create_app(ApiLimits(max_sweep_cells=4, max_sweep_values=3, max_sweep_images=6), backend))
    too_many = sweep(client, [{"field": "seed", "values": [1, 2]}, {"field": "steps", "values": [1, 2, 3]}])
    assert "limit of 4 cells (max_sweep_cells)" in too_many.json()["error"]["message"]
    long_axis = sweep(client, [{"field": "seed", "values": [1, 2, 3, 4]}])
    assert long_axis.json()["error"]["details"][0]["field"] == "axes.0.values"
    images = sweep(client, [{"field": "seed", "values": [1, 2]}], {**BASE, "num_images": 4})
    assert "exceeds the limit of 6 images" in images.json()["error"]["message"]
    assert backend.calls == []
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["SweepAxis-Input"]["properties"]["values"]["maxItems"] == 3


def test_a_failing_cell_fails_the_sweep_naming_it_and_cancels_the_others():
    backend = ImageBackend(fail_steps=(3,), hang_steps=(2, 4))
    client = TestClient(create_app(ApiLimits(), backend))
    response = sweep(client, [{"field": "steps", "values": [2, 3, 4]}])
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "generation_failed" and error["details"][0]["field"] == "cells.1"
    assert "steps 3" in error["message"] and "RuntimeError" in error["message"]
    assert "exploded" not in response.text  # no internals
    assert backend.cancelled == 2


def test_a_cell_past_its_deadline_is_a_504_for_the_sweep():
    backend = ImageBackend(fail_steps=(3,), error=RequestTimedOut(1.0))
    client = TestClient(create_app(ApiLimits(), backend))
    response = sweep(client, [{"field": "steps", "values": [2, 3]}])
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"


def test_openapi_documents_the_route_and_its_base_bodies(client):
    spec = client.get("/openapi.json").json()
    route = spec["paths"]["/v1/sweep"]["post"]
    assert route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SweepResponse")
    base = spec["components"]["schemas"]["SweepRequest"]["properties"]["base"]
    for ref in base["anyOf"]:
        assert ref["$ref"].rsplit("/", 1)[1] in spec["components"]["schemas"]


def test_cells_run_at_once():
    """Every cell is in the backend before any finishes: the loop stages can batch them."""
    class Barrier(ImageBackend):
        arrived = 0

        async def generate(self, spec, request_id, timeout_s=None):
            self.arrived += 1
            while self.arrived < 4:
                await asyncio.sleep(0.001)  # yields until the other cells arrive (a hang fails the test's timeout)
            return await super().generate(spec, request_id, timeout_s)

    backend = Barrier()
    response = sweep(TestClient(create_app(ApiLimits(), backend)), [{"field": "seed", "values": [1, 2, 3, 4]}])
    assert response.status_code == 200 and backend.arrived == 4


class CheckingBackend(ImageBackend):
    """Answers ``caption_check`` with one check per image, naming the cell's seed and steps."""

    async def generate(self, spec, request_id, timeout_s=None):
        from dataclasses import replace

        from deployments.messages import CaptionCheck

        result = await super().generate(spec, request_id, timeout_s)
        if not spec.caption_check:
            return result
        return replace(result, checks=[CaptionCheck(f"seed {seed} steps {spec.steps}", seed / 100) for seed in spec.seeds])


def test_caption_check_reaches_every_cell_and_comes_back_per_cell():
    client = TestClient(create_app(ApiLimits(max_image_pixels=512 * 512), CheckingBackend()))
    body = {"mode": "text2img", "base": {**BASE, "seed": 3, "caption_check": True},
            "axes": [{"field": "steps", "values": [2, 4]}], "grid": False}
    cells = client.post("/v1/sweep", json=body).json()["cells"]
    assert [cell["checks"] for cell in cells] == [[{"caption": f"seed 3 steps {steps}", "clip_similarity": 0.03}]
                                                 for steps in (2, 4)]
    plain = client.post("/v1/sweep", json={**body, "base": {**BASE, "seed": 3}}).json()["cells"]
    assert [cell["checks"] for cell in plain] == [None, None]
