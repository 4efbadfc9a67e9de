"""Schema-driven fuzzing (schemathesis): every route, every generated body — never a 5xx.

Breadth on the Ray-free app with a fake backend (fast); then fewer examples per route against
the live guarded app (real stages, tight cost caps), which must also keep every replica alive.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from deployments.messages import EncodedImages, StageTiming
from serve.http.app import create_app
from serve.settings import ApiLimits
from tests.chaos.test_faults import replica_actors


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
"""A real image: /v1/sweep decodes the cells' images to draw its grid."""


class FuzzBackend:
    async def generate(self, spec, request_id, timeout_s=None):
        return EncodedImages([PNG] * len(spec.seeds), "image/png", list(spec.seeds), {"prior": StageTiming(1, 1, 1)})

    async def embeddings(self, texts, images, request_id):
        return np.ones((len(texts), 4), np.float32), np.ones((len(images), 4), np.float32)

    async def readiness(self):
        return {"Prior": "ready"}

    async def metrics_text(self):
        return "# none\n"


def offline_app():
    """The whole API (jobs, OpenAI and A1111 routes too) on fakes."""
    from serve.jobs.runner import JobRunner
    from serve.jobs.store import AsyncJobStore
    from serve.settings import JobSettings
    from tests.jobfakes import FakeJobBackend

    settings = JobSettings(progress_interval_s=0.005)
    runner = JobRunner(AsyncJobStore(settings), FakeJobBackend(step_s=0.0), settings)
    return create_app(ApiLimits(max_body_bytes=256 * 1024), FuzzBackend(), jobs=runner)


offline = schemathesis.openapi.from_asgi("/openapi.json", offline_app())


@offline.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_route_answers_5xx_to_anything_the_schema_allows(case):
    response = case.call()
    assert response.status_code < 500, (case.path, response.text[:300])
    if response.status_code >= 400:  # every refusal in the one envelope, naming what is wrong
        envelope = {"error"} if case.path.startswith("/v1/images/") else {"error", "request_id"}  # OpenAI's there
        assert set(response.json()) == envelope and response.json()["error"]["message"], response.text[:300]


STAGES = ("Ingress", "TextEncoder", "ImageEncoder", "Prior", "Denoiser", "MovqDecoder")


def test_the_live_service_never_answers_5xx_nor_restarts(guarded_app):
    from hypothesis import given

    url, keys = guarded_app
    auth = {"Authorization": f"Bearer {keys['load']}"}
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json", headers=auth, timeout=30).json())
    before = {name: replica_actors(name) for name in STAGES}
    statuses: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call(base_url=url, headers=auth, timeout=60)
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])

        check()
    print(f"\nlive fuzzing, status codes seen per route: {statuses}")
    assert len(statuses) == len(list(schema.get_all_operations()))
    assert {name: replica_actors(name) for name in STAGES} == before, "a replica restarted during fuzzing"
