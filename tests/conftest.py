"""Shared fixtures: one tiny checkpoint and (for integration/e2e) one Ray instance per session."""

from __future__ import annotations

import os
import socket

import pytest

from deployments.registry import DEFAULT_FAMILY, INGRESS_NAME, STAGE_NAMES, STAGES, UNDERSTANDING_STAGES

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Replicas accept fault injection (StageReplica.inject_fault) in this test session only.
os.environ.setdefault("KANDINSKY_CHAOS", "1")
# Metrics reach the node's exporter every 10 s by default; tests poll for them.
os.environ.setdefault("RAY_metrics_report_interval_ms", "500")

APP_NAME = "kandinsky"
FINE_TUNED_PRIOR = "tiny-finetune"
"""The session's fine-tuned prior (model id), served beside the tiny 2.2 prior."""

# Small, fast deployment options for tests: logical CPUs only, one intra-op thread,
# a short batch window so concurrent test requests do share batches.
TEST_DEPLOYMENT_OPTIONS = {
    name: {
        "num_replicas": 1,
        "max_ongoing_requests": 16,
        "ray_actor_options": {"num_cpus": 0.25},
        "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02, "torch_threads": 1},
    }
    for name in STAGE_NAMES
}
TEST_DEPLOYMENT_OPTIONS[INGRESS_NAME] = {"ray_actor_options": {"num_cpus": 0.1}}
for _stage in UNDERSTANDING_STAGES:  # tiny models beside the graph, on the same 4 logical CPUs
    TEST_DEPLOYMENT_OPTIONS[_stage.name] = {**TEST_DEPLOYMENT_OPTIONS[STAGE_NAMES[0]], "ray_actor_options": {"num_cpus": 0.02}}
for _stage in STAGES:  # the session's second family: placed beside the first on the same 4 logical CPUs
    if _stage.family != DEFAULT_FAMILY:
        TEST_DEPLOYMENT_OPTIONS[_stage.name]["ray_actor_options"] = {"num_cpus": 0.02}


TIERS = ("unit", "integration", "e2e", "chaos", "security", "multinode", "quality")
"""One marker per test folder (``pytest -m unit``); registered in pyproject.toml."""


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(session, config, items):
    """Mark each test with its folder's tier. tests/multinode starts Ray clusters of its own
    after shutting the shared instance down, so it runs last (a stable sort keeps every
    other test's order); it is also ``slow`` (minutes of cluster start-ups), so the default
    run leaves it out: ``pytest -m multinode`` runs it."""
    for item in items:
        parts = item.path.relative_to(config.rootpath).parts
        if len(parts) > 2 and parts[0] == "tests" and parts[1] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[1]))
            if parts[1] == "multinode":
                item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: "multinode" in item.path.parts)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny checkpoint written for this session: (prior, decoder, inpaint_decoder, controlnet_decoder)."""
    from serve.training.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_finetuned_prior(tiny_checkpoint, tmp_path_factory):
    """The tiny prior with its PriorTransformer's weights moved (seeded), its CLIP encoders kept:
    what ``kandinsky-serve train prior`` writes, in its layout."""
    import shutil

    import torch
    from diffusers import PriorTransformer

    out = tmp_path_factory.mktemp("finetuned") / "prior"
    shutil.copytree(tiny_checkpoint.prior, out)
    prior = PriorTransformer.from_pretrained(out, subfolder="prior", use_safetensors=True, local_files_only=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in prior.parameters():
            parameter.add_(0.2 * parameter.std().nan_to_num(0.02) * torch.randn(parameter.shape, generator=generator))
    shutil.rmtree(out / "prior")
    prior.save_pretrained(out / "prior", safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint_21(tmp_path_factory):
    """A tiny Kandinsky 2.1 checkpoint: (prior, decoder, inpaint_decoder), the published layout."""
    from serve.training.tiny import make_tiny_21

    return make_tiny_21(tmp_path_factory.mktemp("tiny21"), seed=0)


@pytest.fixture(scope="session")
def tiny_kosmos2(tmp_path_factory):
    """A tiny random-weight Kosmos-2 checkpoint in the layout of microsoft/kosmos-2-patch14-224."""
    from serve.training.tiny_kosmos2 import make_tiny_kosmos2

    return make_tiny_kosmos2(tmp_path_factory.mktemp("kosmos2"), seed=0)


@pytest.fixture(scope="session")
def tiny_florence2(tmp_path_factory):
    """A tiny random-weight Florence-2 checkpoint (model and processor), the published layout."""
    from serve.training.tiny_florence2 import make_tiny_florence2

    return make_tiny_florence2(tmp_path_factory.mktemp("florence2"), seed=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray
    from ray import serve

    # address="local": always a fresh instance, never a cluster that `ray start` left running.
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    if ray.is_initialized():  # tests/multinode may have shut it down already
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def jobs_database(tmp_path_factory):
    """The job store's SQLite file for this session (never the user's cache directory)."""
    return tmp_path_factory.mktemp("jobs") / "jobs.sqlite3"


@pytest.fixture(scope="session")
def served_app(ray_session, tiny_checkpoint, tiny_checkpoint_21, tiny_finetuned_prior, tiny_florence2, tiny_kosmos2,
               jobs_database):
    """The full graph on the tiny checkpoint, with the tiny Kandinsky 2.1 family and the tiny
    Florence-2 and Kosmos-2 beside it (model ``kandinsky-2-1``): (base_url, ingress handle). Webhooks may call 127.0.0.1 (a
    receiver in the test process), and no other private address."""
    from ray import serve

    from serve.graph.build import build_graph

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"models": {
        "prior_path": str(tiny_checkpoint.prior),
        "decoder_path": str(tiny_checkpoint.decoder),
        "inpaint_decoder_path": str(tiny_checkpoint.inpaint_decoder),
        "controlnet_decoder_path": str(tiny_checkpoint.controlnet_decoder),
        "prior_21_path": str(tiny_checkpoint_21.prior),
        "decoder_21_path": str(tiny_checkpoint_21.decoder),
        "inpaint_decoder_21_path": str(tiny_checkpoint_21.inpaint_decoder),
        "priors": [{"id": FINE_TUNED_PRIOR, "family": "2.2", "path": str(tiny_finetuned_prior)}],
        "florence2_path": str(tiny_florence2),
        "kosmos2_path": str(tiny_kosmos2),
    }, "jobs": {"database_path": str(jobs_database)}, "webhooks": {"allowed_hosts": ["127.0.0.1"]}}
    handle = serve.run(build_graph(args, TEST_DEPLOYMENT_OPTIONS), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}", handle


GUARDED_APP = "chaos"


@pytest.fixture(scope="session")
def guarded_app(served_app, tiny_checkpoint, tmp_path_factory, jobs_database):
    """A second application with API keys, a small in-flight limit, a short timeout, tight cost
    caps and 1 s health checks, for tests/chaos and tests/security: (base_url, {key name: key})."""
    from ray import serve

    from serve.http.auth import add_key, revoke_key
    from serve.graph.build import build_graph

    url, _ = served_app
    keys_path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys = {
        name: add_key(keys_path, name, **extra)
        for name, extra in (
            ("load", {"requests_per_s": 1000, "images_per_min": 1_000_000}),
            ("normal", {"requests_per_s": 100, "images_per_min": 1_000_000}),
            ("flood", {"requests_per_s": 0.2}),
            ("revoked", {}),
        )
    }
    revoke_key(keys_path, "revoked")
    args = {
        "models": {"prior_path": str(tiny_checkpoint.prior), "decoder_path": str(tiny_checkpoint.decoder)},
        "limits": {"max_side": 64, "max_steps": 8, "max_prior_steps": 4, "max_num_images": 2, "max_mix_items": 2,
                   "max_embedding_items": 4, "max_image_pixels": 256 * 256},
        "admission": {"max_inflight_requests": 2, "max_inflight_per_client": 2, "request_timeout_s": 30,
                      "body_read_timeout_s": 2},
        "auth": {"api_keys_file": str(keys_path)},
        "jobs": {"database_path": str(jobs_database)},
    }
    options = {
        name: {**opts, "health_check_period_s": 1, "health_check_timeout_s": 10, "max_queued_requests": 64,
               "ray_actor_options": {"num_cpus": 0.05}}
        for name, opts in TEST_DEPLOYMENT_OPTIONS.items()
    }
    # Two of the stages the chaos tests kill: the survivor serves while the other restarts.
    for name in ("Denoiser", "MovqDecoder"):
        options[name]["num_replicas"] = 2
    _GUARDED_DEPLOYMENT.update(args=args, options=options)
    deploy_guarded()
    return f"{url}/{GUARDED_APP}", keys


_GUARDED_DEPLOYMENT: dict = {}


def deploy_guarded(**admission) -> None:
    """(Re)deploy the guarded app, with ``admission`` settings overriding its own. Ray restarts
    every replica of an app that ``serve.run`` deploys again, unchanged stages too (checked on
    Ray 2.60): about 35 s on 2 cores, so use it sparingly."""
    from ray import serve

    from serve.graph.build import build_graph

    args = {**_GUARDED_DEPLOYMENT["args"]}
    args["admission"] = {**args["admission"], **admission}
    serve.run(build_graph(args, _GUARDED_DEPLOYMENT["options"]), name=GUARDED_APP, route_prefix=f"/{GUARDED_APP}")
