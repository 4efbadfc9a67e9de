"""The image-understanding routes on a fake backend: shapes, 422s naming the field, 404 when unconfigured."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deployments.messages import StageTiming, UnderstandingAnswer
from serve.graph.ingress import unconfigured_understanding
from serve.http.app import create_app
from serve.settings import ApiLimits


class FakeBackend:
    def __init__(self, refuse: str | None = None) -> None:
        self.calls = []
        self.refuse = refuse

    async def readiness(self):
        return {}

    async def understand(self, mode, image, task, text, request_id):
        self.calls.append((mode, image.shape, task, text))
        if self.refuse:
            raise ValueError(self.refuse)
        stage = "kosmos2" if mode == "grounded-caption" else "florence2"
        return UnderstandingAnswer(self._answer(mode, image, task, text), {stage: StageTiming(1.5, 20.25, 3)})

    def _answer(self, mode, image, task, text):
        height, width = image.shape[:2]
        if mode == "grounded-caption":
            return {"text": "An image of a cat", "entities": [{"phrase": "a cat", "span": [12, 17], "boxes": [[0.0, 0.0, width, height]]}]}
        if task == "<OD>":
            return {"task": task, "bboxes": [[1.0, 2.0, 3.0, 4.0]], "labels": ["cat"]}
        if task == "<CAPTION_TO_PHRASE_GROUNDING>":
            return {"task": task, "bboxes": [[1.0, 2.0, 3.0, 4.0]], "labels": [text]}
        if task == "<OCR_WITH_REGION>":
            return {"task": task, "quad_boxes": [[1.0] * 8], "labels": ["hello"]}
        return {"task": task, "text": f"text of {task}"}


def png(width: int = 32, height: int = 24) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def client(backend):
    return TestClient(create_app(ApiLimits(max_image_pixels=64 * 64), backend))


@pytest.mark.parametrize("route, body, task, expected", [
    ("caption", {}, "<CAPTION>", {"text": "text of <CAPTION>"}),
    ("caption", {"detail": "more_detailed"}, "<MORE_DETAILED_CAPTION>", {"text": "text of <MORE_DETAILED_CAPTION>"}),
    ("detect", {}, "<OD>", {"objects": [{"label": "cat", "box": [1.0, 2.0, 3.0, 4.0]}]}),
    ("ground", {"phrase": "a cat"}, "<CAPTION_TO_PHRASE_GROUNDING>", {"boxes": [[1.0, 2.0, 3.0, 4.0]]}),
    ("ocr", {}, "<OCR>", {"text": "text of <OCR>", "regions": None}),
    ("ocr", {"regions": True}, "<OCR_WITH_REGION>", {"text": "hello", "regions": [{"text": "hello", "quad": [1.0] * 8}]}),
    ("grounded-caption", {}, "", {"text": "An image of a cat",
                                  "entities": [{"phrase": "a cat", "span": [12, 17], "boxes": [[0.0, 0.0, 32.0, 24.0]]}]}),
])
def test_each_route_answers_its_shape_from_the_decoded_image(client, backend, route, body, task, expected):
    response = client.post(f"/v1/{route}", json={"image": png(), **body})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer.pop("request_id")
    stage = "kosmos2" if route == "grounded-caption" else "florence2"
    assert answer.pop("timings") == {stage: {"queue_ms": 1.5, "compute_ms": 20.25, "batch_size": 3}}
    assert answer == expected
    header = response.headers["Server-Timing"]
    assert f"{stage}-queue;dur=1.50" in header and f"{stage}-compute;dur=20.25" in header and header.startswith("total;dur=")
    sent_route, shape, sent_task, _ = backend.calls[0]
    assert (sent_route, shape, sent_task) == (route, (24, 32, 3), task)


@pytest.mark.parametrize("route, body, field", [
    ("caption", {}, "image"),
    ("caption", {"image": 5}, "image"),
    ("caption", {"image": "not base64!"}, "image"),
    ("caption", {"image": png(128, 128)}, "image"),
    ("caption", {"image": png(), "detail": "epic"}, "detail"),
    ("ground", {"image": png()}, "phrase"),
    ("ground", {"image": png(), "phrase": "x" * 100_000}, "phrase"),
    ("ocr", {"image": png(), "regions": "yes"}, "regions"),
    ("grounded-caption", {"image": png(), "prompt": ""}, "prompt"),
    ("detect", {"image": png(), "extra": 1}, "extra"),
])
def test_bad_input_is_a_422_naming_the_field_before_any_model_runs(client, backend, route, body, field):
    response = client.post(f"/v1/{route}", json=body)
    assert response.status_code == 422, response.text
    assert field in response.text
    assert backend.calls == []


def test_a_models_refusal_is_a_422_naming_the_text_field():
    client = TestClient(create_app(ApiLimits(), FakeBackend(refuse="text of task X is too long")))
    response = client.post("/v1/ground", json={"image": png(), "phrase": "a cat"})
    assert response.status_code == 422 and "phrase" in response.text and "too long" in response.text


def test_an_unconfigured_stage_answers_404_naming_its_setting(backend):
    client = TestClient(create_app(ApiLimits(), backend, unavailable=unconfigured_understanding({"Kosmos2"})))
    for route in ("caption", "detect", "ground", "ocr"):
        response = client.post(f"/v1/{route}", json={"image": png()})
        assert response.status_code == 404 and response.json()["error"]["type"] == "mode_not_configured"
        assert "florence2_path" in response.text and "KANDINSKY_FLORENCE2_PATH" in response.text
    assert client.post("/v1/grounded-caption", json={"image": png()}).status_code == 200
    assert unconfigured_understanding(set())["grounded-caption"].count("kosmos2_path") == 1


def test_routes_are_typed_in_openapi(client):
    schema = client.get("/openapi.json").json()
    for route, response in (("caption", "CaptionResponse"), ("grounded-caption", "GroundedCaptionResponse")):
        assert response in str(schema["paths"][f"/v1/{route}"]["post"]["responses"]["200"])
    assert set(schema["components"]["schemas"]["CaptionRequest"]["properties"]["detail"]["enum"]) == {
        "brief", "detailed", "more_detailed"}
