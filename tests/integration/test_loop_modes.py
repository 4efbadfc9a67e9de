"""The denoiser's loop policies on the shared Ray instance: same images, cancellation."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from ray import serve

from deployments.messages import DenoiseParams, ImageEmbeddings
from deployments.movq import MovqModel
from serve.tools.bench import deploy_denoiser
from tests.conftest import APP_NAME
from tests.reference import MAX_PIXEL_DIFF, max_diff


def _embeddings(seed: int) -> ImageEmbeddings:
    rng = np.random.default_rng(seed)
    return ImageEmbeddings(rng.standard_normal((1, 32)).astype("float32"), rng.standard_normal((1, 32)).astype("float32"), [seed])


REQUESTS = [
    (_embeddings(1), DenoiseParams(64, 64, 6, 4.0)),
    (_embeddings(2), DenoiseParams(64, 64, 3, 1.0)),
    (_embeddings(3), DenoiseParams(128, 64, 5, 4.0)),
    (_embeddings(4), DenoiseParams(64, 64, 4, 7.5)),
]


async def _run_all(handle):
    return await asyncio.gather(*(handle.generate.remote(e, p) for e, p in REQUESTS))


@pytest.fixture(scope="module")
def movq(tiny_checkpoint):
    return MovqModel.from_pretrained(tiny_checkpoint[1])


@pytest.mark.parametrize("mode", ["request", "request-when-idle"])
def test_every_loop_policy_draws_the_same_images(served_app, tiny_checkpoint, movq, mode):
    step_handle = serve.get_deployment_handle("Denoiser", app_name=APP_NAME)
    step_results = asyncio.run(_run_all(step_handle))
    app = f"loop-{mode}"
    handle = deploy_denoiser(tiny_checkpoint[1], mode, max_batch=4, app_name=app)
    try:
        results = asyncio.run(_run_all(handle))
        stats = handle.loop_stats.remote().result(timeout_s=30)
    finally:
        serve.delete(app)
    assert stats["batching"] == mode and stats["steps"] > 0
    for ours, theirs in zip(results, step_results, strict=True):
        assert max_diff(movq.decode(ours.latents), movq.decode(theirs.latents)) <= MAX_PIXEL_DIFF


def test_cancelled_request_leaves_the_loop_and_frees_its_slot(served_app):
    handle = serve.get_deployment_handle("Denoiser", app_name=APP_NAME)
    before = handle.loop_stats.remote().result(timeout_s=30)
    response = handle.generate.remote(_embeddings(9), DenoiseParams(64, 64, 150, 4.0, "doomed"))

    def poll(condition, what, timeout_s=60.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats = handle.loop_stats.remote().result(timeout_s=30)
            if condition(stats):
                return stats
            time.sleep(0.05)  # polling interval, not a wait for readiness
        raise AssertionError(f"timed out waiting for {what}")

    poll(lambda s: s["active"] == 1 and s["steps"] > before["steps"] + 2, "the request to be denoising")
    assert handle.request_progress.remote("doomed").result(timeout_s=30)["done"] > 0
    response.cancel()
    stopped = poll(lambda s: s["active"] == 0 and s["waiting"] == 0, "the slot to be freed")
    assert stopped["steps"] - before["steps"] < 150, "the cancelled request ran to completion"
    assert handle.request_progress.remote("doomed").result(timeout_s=30) is None
