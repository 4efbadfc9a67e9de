"""Shared fixtures: one tiny checkpoint and (for integration/e2e) one Ray instance per session."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Metrics reach the node's exporter every 10 s by default; tests poll for them.
os.environ.setdefault("RAY_metrics_report_interval_ms", "500")

APP_NAME = "kandinsky"

# Small, fast deployment options for tests: logical CPUs only, one intra-op thread,
# a short batch window so concurrent test requests do share batches.
TEST_DEPLOYMENT_OPTIONS = {
    name: {
        "num_replicas": 1,
        "max_ongoing_requests": 16,
        "ray_actor_options": {"num_cpus": 0.25},
        "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02, "torch_threads": 1},
    }
    for name in ("TextEncoder", "Prior", "Denoiser", "MovqDecoder")
}
TEST_DEPLOYMENT_OPTIONS["Ingress"] = {"ray_actor_options": {"num_cpus": 0.1}}


def pytest_collection_modifyitems(session, config, items):
    """tests/multinode starts Ray clusters of its own after shutting the shared instance
    down, so it runs last (a stable sort keeps every other test's order)."""
    items.sort(key=lambda item: "multinode" in item.path.parts)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(prior_path, decoder_path) of a tiny checkpoint written for this session."""
    from serve.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    if ray.is_initialized():  # tests/multinode may have shut it down already
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def served_app(ray_session, tiny_checkpoint):
    """The full graph on the tiny checkpoint: (base_url, ingress handle)."""
    from ray import serve

    from serve.graph import build_graph

    prior, decoder = tiny_checkpoint
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"models": {"prior_path": str(prior), "decoder_path": str(decoder)}}
    handle = serve.run(build_graph(args, TEST_DEPLOYMENT_OPTIONS), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}", handle
