"""API keys, rate limits and admission at the HTTP layer, with a fake backend (no Ray, no models)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from serve.http.app import create_app
from serve.http.auth import add_key, revoke_key
from serve.settings import AdmissionSettings, ApiLimits, AuthSettings
from tests.unit.test_api import GOOD, FakeBackend


class SlowBackend(FakeBackend):
    def __init__(self, release: asyncio.Event | None = None, **kwargs):
        super().__init__(**kwargs)
        self.release = release
        self.entered = 0

    async def generate(self, spec, request_id, timeout_s=None):
        self.entered += 1
        if self.release is not None:
            await self.release.wait()
        return await super().generate(spec, request_id, timeout_s)

    async def metrics_text(self):
        return "# nothing\n"


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys.yaml"
    found = {name: add_key(path, name, **extra) for name, extra in
             (("a", {}), ("b", {}), ("slow", {"requests_per_s": 0.5}), ("few-images", {"images_per_min": 3}), ("gone", {}))}
    revoke_key(path, "gone")
    return path, found


@pytest.fixture
def backend():
    return SlowBackend()


@pytest.fixture
def client(keys, backend):
    path, _ = keys
    return TestClient(create_app(ApiLimits(), backend, auth=AuthSettings(api_keys_file=path, requests_per_s=50, burst_requests=50)))


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers, status, kind", [
    ({}, 401, "missing_api_key"),
    ({"Authorization": "Basic abc"}, 401, "malformed_authorization"),
    ({"Authorization": "Bearer"}, 401, "malformed_authorization"),
    ({"Authorization": "Bearer two words"}, 401, "malformed_authorization"),
    ({"Authorization": "Bearer ks-not-a-real-key"}, 401, "invalid_api_key"),
])
def test_requests_without_a_valid_key_are_refused_before_anything_runs(client, backend, headers, status, kind):
    for path, method in (("/v1/text2img", "post"), ("/metrics", "get"), ("/openapi.json", "get"), ("/v1/embeddings", "post"),
                         ("/v1/status", "get")):
        response = getattr(client, method)(path, json=GOOD, headers=headers) if method == "post" else client.get(path, headers=headers)
        assert response.status_code == status, (path, response.text)
        assert response.json()["error"]["type"] == kind
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert backend.calls == []


def test_http_basic_with_the_key_as_password_is_the_same_key(client, keys, backend):
    """A1111 clients (webuiapi, Open WebUI) send HTTP Basic: the key is the password."""
    import base64

    _, found = keys

    def basic(user: str, password: str) -> dict:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert client.post("/v1/text2img", json=GOOD, headers=basic("anyone", found["a"])).status_code == 200
    assert client.post("/v1/text2img", json=GOOD, headers=basic(found["a"], "")).status_code == 200
    assert client.post("/v1/text2img", json=GOOD, headers=basic("anyone", "ks-wrong")).status_code == 401
    assert client.post("/v1/text2img", json=GOOD, headers=basic("anyone", found["gone"])).status_code == 403
    assert client.get("/v1/status", headers=basic("x", found["b"])).status_code == 200


def test_a_revoked_key_is_403_and_revocation_needs_no_restart(client, keys, backend):
    path, found = keys
    assert client.post("/v1/text2img", json=GOOD, headers=bearer(found["gone"])).status_code == 403
    assert client.post("/v1/text2img", json=GOOD, headers=bearer(found["a"])).status_code == 200
    revoke_key(path, "a")
    deadline_calls = 0
    while client.post("/v1/text2img", json=GOOD, headers=bearer(found["a"])).status_code != 403:
        deadline_calls += 1  # the store re-reads the file at most once a second
        assert deadline_calls < 10_000
    assert len(backend.calls) >= 1


def test_health_routes_stay_open(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_per_key_request_rate_gives_429_with_retry_after_and_spares_other_keys(client, keys):
    _, found = keys
    assert client.post("/v1/text2img", json=GOOD, headers=bearer(found["slow"])).status_code == 200
    limited = client.post("/v1/text2img", json=GOOD, headers=bearer(found["slow"]))
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert "requests per second" in limited.json()["error"]["message"]
    assert client.post("/v1/text2img", json=GOOD, headers=bearer(found["b"])).status_code == 200


def _raw_post(app, path: str, headers: dict, body: bytes) -> tuple[int, int]:
    """POST through the app's ASGI interface: (status, how many times the body was asked for)."""
    asked = 0
    sent: list[dict] = []

    async def receive():
        nonlocal asked
        asked += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in
                         {**headers, "content-type": "application/json", "content-length": str(len(body))}.items()],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), asked


def test_refused_keys_and_rate_limited_requests_are_answered_before_the_body_is_read(keys):
    """A flood of rate-limited requests with large bodies costs no body transfer or parse."""
    import json

    path, found = keys
    app = create_app(ApiLimits(), SlowBackend(), auth=AuthSettings(api_keys_file=path))
    body = json.dumps(GOOD).encode()
    for headers, status in (({}, 401), (bearer("ks-not-a-real-key"), 401), (bearer(found["gone"]), 403)):
        assert _raw_post(app, "/v1/text2img", headers, body) == (status, 0)
    assert _raw_post(app, "/v1/text2img", bearer(found["slow"]), body)[0] == 200  # read, and charged once
    assert _raw_post(app, "/v1/embeddings", bearer(found["slow"]), body) == (429, 0)


def test_a_request_with_a_body_is_charged_to_the_rate_once(tmp_path):
    path = tmp_path / "keys.yaml"
    key = add_key(path, "two-per-s", requests_per_s=2)
    client = TestClient(create_app(ApiLimits(), SlowBackend(), auth=AuthSettings(api_keys_file=path, burst_requests=2)))
    statuses = [client.post("/v1/text2img", json=GOOD, headers=bearer(key)).status_code for _ in range(2)]
    assert statuses == [200, 200]


def test_a_rate_limit_refusal_is_held_until_a_retry_could_succeed(tmp_path):
    """A client looping on 429s is held to its key's rate: the refusal comes when the bucket
    refills (0.5 s at 2 requests/s), with a Retry-After for what is left."""
    import time

    path = tmp_path / "keys.yaml"
    key = add_key(path, "two-per-s")
    client = TestClient(create_app(ApiLimits(), SlowBackend(),
                                   auth=AuthSettings(api_keys_file=path, requests_per_s=2, burst_requests=1)))
    # Timed from before the first request: its token was taken at its admission, at or after
    # this, so the bucket cannot refill (and the refusal be sent) before 0.5 s from here.
    started = time.perf_counter()
    assert client.post("/v1/text2img", json=GOOD, headers=bearer(key)).status_code == 200
    refused = client.post("/v1/text2img", json=GOOD, headers=bearer(key))
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert time.perf_counter() - started >= 0.45


def test_refusals_held_at_once_are_capped_and_the_rest_answered_at_once():
    from serve.http.admission import AdmissionGate, RateLimiter
    from serve.http.errors import ApiError
    from serve.http.guards import Guards

    class OneKey:
        def lookup(self, token):
            from serve.http.auth import ApiKey
            return ApiKey(name="k", digest=b"")

    async def scenario():
        guards = Guards(OneKey(), RateLimiter(0.1, 1, 60.0), AdmissionGate(4),
                        AdmissionSettings(refusal_pace_s=30.0, max_paced_refusals=1))
        await guards.check_key("Bearer any")  # the burst
        held = asyncio.ensure_future(guards.check_key("Bearer any"))
        for _ in range(100):  # let it reach its hold
            await asyncio.sleep(0)
        assert guards._paced == 1 and not held.done()
        with pytest.raises(ApiError) as at_once:
            await asyncio.wait_for(guards.check_key("Bearer any"), 5.0)  # not held 30 s: the cap is taken
        assert at_once.value.status == 429
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        assert guards._paced == 0

    asyncio.run(scenario())


def test_per_key_budget_charges_the_requests_cost(client, keys, backend):
    """few-images: 3 standard images (512x512, 50 + 25 steps) per minute."""
    _, found = keys
    standard = {"prompt": "a red circle", "width": 512, "height": 512, "steps": 50, "prior_steps": 25}
    assert client.post("/v1/text2img", json={**standard, "num_images": 3}, headers=bearer(found["few-images"])).status_code == 200
    refused = client.post("/v1/text2img", json={**standard, "num_images": 1}, headers=bearer(found["few-images"]))
    assert refused.status_code == 429 and "standard images per minute" in refused.json()["error"]["message"]
    assert len(backend.calls) == 1


def test_small_requests_cost_little_and_big_ones_much(keys, backend):
    path, found = keys
    client = TestClient(create_app(ApiLimits(max_side=1024), backend,
                                   auth=AuthSettings(api_keys_file=path, requests_per_s=1000, burst_requests=1000)))
    tiny = {"prompt": "a dot", "width": 64, "height": 64, "steps": 1, "prior_steps": 2}
    for _ in range(100):  # 100 tiny images fit a budget of 3 standard images
        assert client.post("/v1/text2img", json=tiny, headers=bearer(found["few-images"])).status_code == 200
    big = {"prompt": "a dot", "width": 1024, "height": 1024, "steps": 150, "prior_steps": 25, "num_images": 8}
    refused = client.post("/v1/text2img", json=big, headers=bearer(found["few-images"]))
    assert refused.status_code == 429 and "can ever hold" in refused.json()["error"]["message"]


def test_the_budget_is_charged_on_jobs_and_compat_routes_too(keys, backend):
    from serve.jobs.runner import JobRunner
    from serve.jobs.store import AsyncJobStore
    from serve.settings import JobSettings
    from tests.jobfakes import FakeJobBackend

    path, found = keys
    settings = JobSettings(progress_interval_s=0.005)
    runner = JobRunner(AsyncJobStore(settings), FakeJobBackend(step_s=0.0), settings)
    app = create_app(ApiLimits(), backend, jobs=runner,
                     auth=AuthSettings(api_keys_file=path, requests_per_s=1000, burst_requests=1000))
    standard = {"prompt": "a red circle", "width": 512, "height": 512, "steps": 50, "prior_steps": 25}
    with TestClient(app) as client:
        headers = bearer(found["few-images"])
        assert client.post("/v1/jobs", json={"mode": "text2img", "params": {**standard, "num_images": 2}},
                           headers=headers).status_code == 202
        openai = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "512x512", "n": 1,
                                                              "steps": 50, "prior_steps": 25}, headers=headers)
        assert openai.status_code == 200, openai.text
        for path_, body in (("/v1/jobs", {"mode": "text2img", "params": standard}),
                            ("/v1/images/generations", {"prompt": "a cat", "size": "512x512", "steps": 50, "prior_steps": 25}),
                            ("/sdapi/v1/txt2img", {"prompt": "a cat", "width": 512, "height": 512, "steps": 50})):
            refused = client.post(path_, json=body, headers=headers)
            error = refused.json()["error"]
            kind = error["code"] if path_.startswith("/v1/images/") else error["type"]  # OpenAI's error shape there
            assert refused.status_code == 429 and kind == "rate_limited", (path_, refused.text)


def test_one_client_gets_429_past_its_share_of_the_gate_while_another_still_gets_in():
    import httpx

    async def scenario():
        release = asyncio.Event()
        backend = SlowBackend(release)
        app = create_app(ApiLimits(), backend, admission=AdmissionSettings(max_inflight_requests=4, retry_after_s=3))

        def client_at(address: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 1234)), base_url="http://test")

        async with client_at("10.0.0.1") as hog, client_at("10.0.0.2") as other:
            held = [asyncio.create_task(hog.post("/v1/text2img", json=GOOD)) for _ in range(2)]
            while backend.entered < 2:
                await asyncio.sleep(0)
            refused = await hog.post("/v1/text2img", json=GOOD)
            served = asyncio.create_task(other.post("/v1/text2img", json=GOOD))
            while backend.entered < 3:
                await asyncio.sleep(0)
            release.set()
            return refused, await served, await asyncio.gather(*held)

    refused, served, held = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "3"
    assert refused.json()["error"]["type"] == "too_many_inflight"
    assert served.status_code == 200 and [r.status_code for r in held] == [200, 200]


def test_over_the_inflight_limit_is_503_at_once_with_retry_after():
    import httpx

    async def scenario():
        release = asyncio.Event()
        backend = SlowBackend(release)
        app = create_app(ApiLimits(), backend,
                         admission=AdmissionSettings(max_inflight_requests=2, max_inflight_per_client=2, retry_after_s=3))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = [asyncio.create_task(client.post("/v1/text2img", json=GOOD)) for _ in range(2)]
            while len(backend.calls) < 0 or not all(not t.done() for t in held):
                await asyncio.sleep(0)
            for _ in range(50):  # let both enter the backend
                await asyncio.sleep(0)
            refused = await client.post("/v1/text2img", json=GOOD)
            assert client.get is not None
            health = await client.get("/healthz")  # not counted against the limit
            release.set()
            done = await asyncio.gather(*held)
            after = await client.post("/v1/text2img", json=GOOD)
            return refused, health, done, after, backend

    refused, health, done, after, backend = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "3"
    assert refused.json()["error"]["type"] == "overloaded"
    assert health.status_code == 200
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200
    assert len(backend.calls) == 3  # the refused one never reached the backend


def test_client_deadline_header_is_capped_by_the_configured_limit(keys):
    seen = []

    class Recording(FakeBackend):
        async def generate(self, spec, request_id, timeout_s=None):
            seen.append(timeout_s)
            return await super().generate(spec, request_id)

    client = TestClient(create_app(ApiLimits(), Recording(), admission=AdmissionSettings(request_timeout_s=30)))
    client.post("/v1/text2img", json=GOOD, headers={"X-Request-Timeout": "2.5"})
    client.post("/v1/text2img", json=GOOD, headers={"X-Request-Timeout": "999"})
    client.post("/v1/text2img", json=GOOD)
    assert seen == [2.5, 30, 30]
    bad = client.post("/v1/text2img", json=GOOD, headers={"X-Request-Timeout": "soon"})
    assert bad.status_code == 422 and "X-Request-Timeout" in bad.json()["error"]["message"]


def test_stage_failures_map_to_explicit_errors():
    from serve.errors import Overloaded, RequestTimedOut, StageUnavailable

    for error, status, kind in (
        (RequestTimedOut(5), 504, "timeout"),
        (StageUnavailable("a stage replica died and 1 retry failed"), 503, "stage_unavailable"),
        (Overloaded("full"), 503, "overloaded"),
        (RuntimeError("boom\nTraceback: internals"), 500, "generation_failed"),
    ):
        class Failing(FakeBackend):
            async def generate(self, spec, request_id, timeout_s=None, error=error):
                raise error

        response = TestClient(create_app(ApiLimits(), Failing())).post("/v1/text2img", json=GOOD)
        assert response.status_code == status and response.json()["error"]["type"] == kind
        assert "Traceback" not in response.text
        if status == 503:
            assert int(response.headers["Retry-After"]) >= 1


def test_no_code_path_trusts_remote_code_and_local_configs_stay_on_localhost():
    import pathlib

    import yaml

    root = pathlib.Path(__file__).resolve().parents[2]
    for path in [*root.glob("serve/**/*.py"), *root.glob("deployments/**/*.py")]:
        text = path.read_text()
        assert "trust_remote_code=True" not in text and "use_safetensors=False" not in text, path
    for name in ("local.yaml", "gpu.yaml"):
        http = yaml.safe_load((root / "configs" / name).read_text())["http_options"]
        assert http["host"] == "127.0.0.1", name
    # The service starts Ray (when not joining a cluster RAY_ADDRESS names) with its dashboard on localhost only.
    assert "connect_ray(" in (root / "serve" / "graph" / "service.py").read_text()
    assert "dashboard_host=LOOPBACK" in (root / "serve" / "graph" / "local_ray.py").read_text()


def test_jobs_are_seen_only_by_their_key_and_an_admin_key(tmp_path):
    from serve.jobs.runner import JobRunner
    from serve.jobs.store import AsyncJobStore
    from serve.settings import JobSettings
    from tests.jobfakes import FakeJobBackend

    path = tmp_path / "keys.yaml"
    owner, other, admin = add_key(path, "owner"), add_key(path, "other"), add_key(path, "root", admin=True)
    settings = JobSettings(progress_interval_s=0.005)
    runner = JobRunner(AsyncJobStore(settings), FakeJobBackend(step_s=0.001), settings)
    app = create_app(ApiLimits(), SlowBackend(), auth=AuthSettings(api_keys_file=path), jobs=runner)
    with TestClient(app) as client:
        job = client.post("/v1/jobs", json={"mode": "text2img", "params": GOOD}, headers=bearer(owner))
        assert job.status_code == 202, job.text
        url = f"/v1/jobs/{job.json()['id']}"
        assert client.get(url, headers=bearer(owner)).status_code == 200
        assert client.get(url, headers=bearer(other)).status_code == 404
        assert client.get(url, headers=bearer(admin)).status_code == 200, "an admin key sees every job"
        assert client.get(url).status_code == 401
