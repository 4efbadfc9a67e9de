"""The HTTP layer with a fake backend: validation, errors, ids, readiness. No Ray, no models."""

import base64
import json

import pytest
from fastapi.testclient import TestClient

from deployments.messages import EncodedImages, StageTiming
from serve.http.app import create_app
from serve.errors import Overloaded
from serve.settings import AdmissionSettings, ApiLimits

GOOD = {"prompt": "a red circle", "width": 64, "height": 64}


class FakeBackend:
    def __init__(self, fail: bool | BaseException = False, stages=None):
        self.calls = []
        self.fail = fail
        self.stages = stages if stages is not None else {"TextEncoder": "ready", "Prior": "ready", "Denoiser": "ready", "MovqDecoder": "ready"}

    async def generate(self, spec, request_id, timeout_s=None):
        self.calls.append((spec, request_id))
        if isinstance(self.fail, BaseException):
            raise self.fail
        if self.fail:
            raise RuntimeError("replica exploded\nTraceback: secret internals")
        timing = StageTiming(1.0, 2.0, 1)
        return EncodedImages([b"img%d" % i for i in range(len(spec.seeds))], "image/png", list(spec.seeds), {"prior": timing},
                             call_ms={"prior": 3.5})

    async def readiness(self):
        return self.stages


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def client(backend):
    return TestClient(create_app(ApiLimits(max_body_bytes=4096), backend))


def test_generates_and_returns_seeds_timings_and_request_id(client, backend):
    response = client.post("/v1/text2img", json={**GOOD, "num_images": 3, "seed": 40})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["seeds"] == [40, 41, 42]
    assert [base64.b64decode(image) for image in body["images"]] == [b"img0", b"img1", b"img2"]
    assert body["timings"]["prior"] == {"queue_ms": 1.0, "compute_ms": 2.0, "batch_size": 1}
    assert body["request_id"] == response.headers["X-Request-ID"]
    spec = backend.calls[0][0]
    assert (spec.prior_steps, spec.steps, spec.guidance_scale, spec.prior_guidance_scale) == (25, 50, 4.0, 4.0)
    assert spec.negative_prompt is None and spec.output_format == "png"


def test_server_timing_header_breaks_the_request_into_stage_calls(client):
    response = client.post("/v1/text2img", json=GOOD)
    entries = dict(entry.split(";dur=") for entry in response.headers["Server-Timing"].split(", "))
    assert {name: float(value) for name, value in entries.items() if name != "total"} == {
        "prior-call": 3.5, "prior-queue": 1.0, "prior-compute": 2.0}
    assert abs(float(entries["total"]) - response.json()["total_ms"]) < 0.01


def test_random_seeds_when_none_given(client):
    first = client.post("/v1/text2img", json={**GOOD, "num_images": 2}).json()["seeds"]
    second = client.post("/v1/text2img", json=GOOD).json()["seeds"]
    assert first[1] == first[0] + 1 and second[0] != first[0]


def test_request_id_header_is_echoed(client, backend):
    response = client.post("/v1/text2img", json=GOOD, headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123" and response.json()["request_id"] == "abc-123"
    again = client.post("/v1/text2img", json=GOOD, headers={"X-Request-ID": "abc-123"})
    assert again.status_code == 200
    internal = [request_id for _, request_id in backend.calls]
    # The client's id labels the stages' work (their logs carry it) but never keys it: two
    # requests with one X-Request-ID must not share progress or previews in a stage.
    assert all(request_id.startswith("abc-123.") for request_id in internal) and len(set(internal)) == 2


@pytest.mark.parametrize(
    "body,field,words",
    [
        ({**GOOD, "prompt": ""}, "prompt", "at least 1 character"),
        ({**GOOD, "prompt": "   "}, "prompt", "non-whitespace"),
        ({"width": 64}, "prompt", "required"),
        ({**GOOD, "width": 100}, "width", "multiple of 64"),
        ({**GOOD, "height": 2048}, "height", "less than or equal to 1024"),
        ({**GOOD, "steps": 0}, "steps", "greater than or equal to 1"),
        ({**GOOD, "steps": 151}, "steps", "less than or equal to 150"),
        ({**GOOD, "prior_steps": 101}, "prior_steps", "less than or equal to 100"),
        ({**GOOD, "prior_steps": 1}, "prior_steps", "greater than or equal to 2"),
        ({**GOOD, "num_images": 9}, "num_images", "less than or equal to 8"),
        ({**GOOD, "width": "64"}, "width", "valid integer"),
        ({**GOOD, "seed": -1}, "seed", "greater than or equal to 0"),
        ({**GOOD, "guidance_scale": 51}, "guidance_scale", "less than or equal to 50"),
        ({**GOOD, "output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
        ({**GOOD, "prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
        ({**GOOD, "nsfw": True}, "nsfw", "Extra inputs are not permitted"),
    ],
)
def test_bad_input_is_422_naming_the_field_before_any_stage(client, backend, body, field, words):
    response = client.post("/v1/text2img", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    assert any(d["field"] == field and words in d["message"] for d in error["details"]), error
    assert field in error["message"] and words in error["message"]
    assert backend.calls == []


def test_seed_range_overflow_is_422(client, backend):
    response = client.post("/v1/text2img", json={**GOOD, "seed": 2**63 - 1, "num_images": 2})
    assert response.status_code == 422 and "seed" in response.json()["error"]["message"]
    assert backend.calls == []


def test_malformed_json_is_422(client, backend):
    response = client.post("/v1/text2img", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and backend.calls == []


def test_oversized_body_is_413(client, backend):
    response = client.post("/v1/text2img", json={**GOOD, "negative_prompt": "x" * 5000})
    assert response.status_code == 413
    assert "4096 bytes" in response.json()["error"]["message"]
    assert backend.calls == []


def test_bad_request_id_header_is_422(client, backend):
    response = client.post("/v1/text2img", json=GOOD, headers={"X-Request-ID": "x" * 200})
    assert response.status_code == 422 and "X-Request-ID" in response.json()["error"]["message"]
    assert backend.calls == []


def test_a_full_stage_queue_is_503_with_retry_after():
    overloaded = Overloaded("a stage is at capacity: Denoiser queue full")
    client = TestClient(create_app(ApiLimits(), FakeBackend(fail=overloaded)))
    response = client.post("/v1/text2img", json=GOOD, headers={"X-Request-ID": "r2"})
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    body = response.json()
    assert body["error"]["type"] == "overloaded" and "Denoiser" in body["error"]["message"] and body["request_id"] == "r2"


def test_stage_failure_is_explicit_500_without_internals():
    client = TestClient(create_app(ApiLimits(), FakeBackend(fail=True)))
    response = client.post("/v1/text2img", json=GOOD, headers={"X-Request-ID": "r1"})
    assert response.status_code == 500
    body = response.json()
    assert body["error"]["type"] == "generation_failed" and body["request_id"] == "r1"
    assert "Traceback" not in response.text and "secret" not in response.text


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True}, "probes learn nothing of the topology"
    status = client.get("/v1/status")
    assert status.status_code == 200 and status.json()["stages"] and status.json()["ready"] is True


def test_not_ready_while_a_stage_has_no_replica():
    stages = {"TextEncoder": "ready", "Denoiser": "UPDATING: no running replica"}
    client = TestClient(create_app(ApiLimits(), FakeBackend(stages=stages)))
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json() == {"ready": False}
    status = client.get("/v1/status")
    assert status.status_code == 503 and status.json()["stages"]["Denoiser"].startswith("UPDATING")


def test_limits_are_configurable_and_documented():
    app = create_app(ApiLimits(max_num_images=2, max_side=256), FakeBackend())
    schema = TestClient(app).get("/openapi.json").json()["components"]["schemas"]["Text2ImgRequest"]["properties"]
    assert schema["num_images"]["maximum"] == 2 and schema["width"]["maximum"] == 256
    assert schema["width"]["multipleOf"] == 64
    response = TestClient(app).post("/v1/text2img", json={**GOOD, "num_images": 3})
    assert response.status_code == 422 and "less than or equal to 2" in response.text


class RecordingMetrics:
    def __init__(self):
        self.http, self.generations, self.rejections = [], [], []

    def http_request(self, route, status, request_bytes, response_bytes):
        self.http.append((route, status, request_bytes, response_bytes))

    def generation(self, mode, width, height, seconds, model=""):
        self.generations.append((mode, width, height))

    def rejection(self, reason):
        self.rejections.append(reason)


def test_metrics_count_requests_generations_and_rejections():
    metrics, backend = RecordingMetrics(), FakeBackend()
    client = TestClient(create_app(ApiLimits(max_body_bytes=2048), backend, metrics=metrics))
    for _ in range(3):
        assert client.post("/v1/text2img", json=GOOD).status_code == 200
    assert client.post("/v1/text2img", json={**GOOD, "width": 100}).status_code == 422
    assert client.post("/v1/text2img", json={**GOOD, "prompt": "x" * 4000}).status_code == 413
    assert client.get("/nope").status_code == 404
    ok = [h for h in metrics.http if h[:2] == ("/v1/text2img", 200)]
    assert len(ok) == 3 and all(request > 0 and response > 0 for _, _, request, response in ok)
    assert ("/v1/text2img", 422) in [h[:2] for h in metrics.http]
    assert ("/v1/text2img", 413) in [h[:2] for h in metrics.http]
    assert ("other", 404) in [h[:2] for h in metrics.http]  # unknown paths never become labels
    assert metrics.generations == [("text2img", 64, 64)] * 3
    assert sorted(metrics.rejections) == ["payload_too_large", "validation"]
    assert len(backend.calls) == 3


def test_metrics_route_serves_the_backend_exposition():
    backend = FakeBackend()
    backend.metrics_text = lambda: _async("# TYPE ray_kandinsky_serve_x_total counter\nray_kandinsky_serve_x_total 1.0\n")
    response = TestClient(create_app(ApiLimits(), backend)).get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "ray_kandinsky_serve_x_total 1.0" in response.text


async def _async(value):
    return value


def test_configured_caps_reach_nested_fields_and_defaults():
    from serve.http.schemas import MixRequest, Text2ImgRequest, bind_limits

    limits = ApiLimits(max_side=128, default_side=64, max_prompt_chars=5, max_guidance_scale=2.0)
    text2img = bind_limits(Text2ImgRequest, limits)
    assert text2img.__name__ == "Text2ImgRequest" and text2img.__doc__ == Text2ImgRequest.__doc__
    spec = text2img.model_validate({"prompt": "a"}).to_spec()
    assert (spec.width, spec.height) == (64, 64)  # default_side
    assert spec.guidance_scale == 2.0  # the declared 4.0, lowered to the cap
    mix = bind_limits(MixRequest, limits)
    with pytest.raises(Exception, match="at most 5 characters"):
        mix.model_validate({"items": [{"text": "too long"}], "weights": [1.0]})
    assert Text2ImgRequest.model_validate({"prompt": "a", "width": 1024}).width == 1024  # the declared class is unbound


def test_unknown_routes_and_methods_answer_in_the_error_envelope(client):
    missing = client.get("/nope", headers={"X-Request-ID": "r9"})
    assert missing.status_code == 404
    assert missing.json() == {"error": {"type": "not_found", "message": "Not Found", "details": []}, "request_id": "r9"}
    wrong = client.get("/v1/text2img")
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "method_not_allowed"


@pytest.mark.parametrize("fail, status", [(False, 200), (True, 500), (Overloaded("full"), 503)])
def test_the_generation_slot_is_given_back_however_the_request_ends(fail, status):
    app = create_app(ApiLimits(), FakeBackend(fail=fail))
    client = TestClient(app)
    for _ in range(3):
        assert client.post("/v1/text2img", json=GOOD).status_code == status
        assert client.post("/v1/text2img", json={**GOOD, "width": 100}).status_code == 422
    assert app.state.admission_gate.inside == 0


def test_a_chunked_body_over_the_cap_is_413_in_the_envelope(client, backend):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 100  # 10 kB against a 4 kB cap, with no Content-Length
        yield b'"}'

    response = client.post("/v1/text2img", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["type"] == "payload_too_large"
    assert backend.calls == []


@pytest.mark.parametrize("body", ['{"prompt": "a", "seed": ' + "9" * 5000 + "}", '{"prompt": ' + "[" * 3000 + "]" * 3000 + "}"])
def test_a_body_json_cannot_parse_is_400_naming_the_body(backend, body):
    client = TestClient(create_app(ApiLimits(), backend))
    response = client.post("/v1/text2img", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["details"][0]["field"] == "body"


def _asgi_post(app, chunks, gaps_s):
    """POST /v1/text2img straight through the ASGI app, the body in ``chunks`` with a pause
    before each; then the client waits (never disconnects). Returns (status, body, seconds)."""
    import asyncio
    import time

    async def scenario():
        queue = [({"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}, gap)
                 for index, (chunk, gap) in enumerate(zip(chunks, gaps_s))]

        async def receive():
            if queue:
                message, gap = queue.pop(0)
                await asyncio.sleep(gap)
                return message
            await asyncio.Event().wait()  # a client that neither sends nor leaves

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/text2img", "raw_path": b"/v1/text2img", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"100000")],
                 "client": ("10.0.0.9", 1), "server": ("test", 80)}
        started = time.perf_counter()
        await asyncio.wait_for(app(scope, receive, send), 10)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return status, json.loads(body), time.perf_counter() - started

    return asyncio.run(scenario())


def test_a_body_trickled_past_the_read_deadline_is_408_without_reaching_a_route():
    backend = FakeBackend()
    app = create_app(ApiLimits(), backend, admission=AdmissionSettings(body_read_timeout_s=0.3))
    status, body, seconds = _asgi_post(app, [b"{", b'"prompt"'], [0.0, 5.0])
    assert status == 408 and body["error"]["type"] == "body_timeout"
    assert body["error"]["details"][0]["field"] == "body" and "0.3 s" in body["error"]["message"]
    assert seconds < 2.0 and backend.calls == [] and app.state.admission_gate.inside == 0


def test_a_body_that_arrives_in_pieces_within_the_deadline_is_served():
    backend = FakeBackend()
    app = create_app(ApiLimits(), backend, admission=AdmissionSettings(body_read_timeout_s=2.0))
    text = json.dumps(GOOD).encode()
    status, body, _ = _asgi_post(app, [text[:10], text[10:20], text[20:]], [0.0, 0.05, 0.05])
    assert status == 200 and body["images"] and len(backend.calls) == 1
