"""A stage whose model fails to load stays up and says why, instead of crash-looping."""

from __future__ import annotations

import shutil
import time

import pytest
from ray import serve

from deployments.denoiser import Denoiser
from deployments.messages import DenoiseParams, ImageEmbeddings
from deployments.runtime import StageNotReady


def test_a_broken_checkpoint_keeps_the_replica_up_reporting_the_reason(ray_session, served_app, tiny_checkpoint, tmp_path):
    import numpy as np

    broken = tmp_path / "decoder"
    shutil.copytree(tiny_checkpoint.decoder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    app = "broken-denoiser"
    handle = serve.run(
        Denoiser.options(num_replicas=1, health_check_period_s=0.5, ray_actor_options={"num_cpus": 0.05}).bind(str(broken)),
        name=app, route_prefix=f"/{app}",
    )
    try:
        state = handle.load_state.remote().result(timeout_s=60)
        assert state.startswith("model failed to load:") and "unet" in state, state
        started = time.monotonic()
        embeddings = ImageEmbeddings(np.zeros((1, 32), "float32"), np.zeros((1, 32), "float32"), [0])
        with pytest.raises(Exception) as error:
            handle.generate.remote(embeddings, DenoiseParams(64, 64, 2, 4.0)).result(timeout_s=60)
        assert isinstance(getattr(error.value, "cause", error.value), StageNotReady) or "model not loaded" in str(error.value)
        assert time.monotonic() - started < 10  # fails fast
        # Several health-check periods later it is the same, running replica: no crash loop.
        replica = serve.status().applications[app].deployments["Denoiser"]
        first = handle.load_state.remote().result(timeout_s=30)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            status = serve.status().applications[app].deployments["Denoiser"]
            assert status.replica_states.get("RUNNING", 0) == 1, status
            time.sleep(0.25)  # polling interval
        assert handle.load_state.remote().result(timeout_s=30) == first
        assert replica.replica_states.get("RUNNING", 0) == 1
    finally:
        serve.delete(app)
