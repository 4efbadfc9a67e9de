"""configs/cluster.yaml on a simulated multi-node cluster: placement, independent
autoscaling, node loss.

One head and three worker "nodes" (one small-gpu, two denoiser-gpu; a third denoiser-gpu
joins for the node-loss test) of the node types in cluster/node-types.yaml run as
processes on this machine (serve.tools.cluster.LocalCluster), each declaring its type's CPUs,
logical GPUs and custom resource; the config is deployed unchanged but for the tiny
checkpoint on CPU and, for the autoscaling test, short delays. The tests run in file
order on one deployment; they start their own Ray cluster, so tests/conftest.py runs
this directory last and the shared single-node instance is shut down first.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve.graph.service import start_service
from serve.tools.cluster import LocalCluster, load_shape, node_type_of, on_cpu, replica_nodes
from serve.tools.loadtest import LoadTest, RequestMix, Scenario
from deployments.registry import DEFAULT_FAMILY, STAGES
from serve.settings import load_config
from tests.conftest import _free_port
from tests.promtext import total

# configs/cluster.yaml serves the default family (another family's stages deploy only with its checkpoints).
STAGE_NAMES = tuple(stage.name for stage in STAGES if stage.family == DEFAULT_FAMILY)

ROOT = Path(__file__).parents[2]
APP = "kandinsky"
WORKERS = {"small-gpu": 1, "denoiser-gpu": 2}
# Node death noticed in ~5 s instead of Ray's default ~15 s (health checks 3 s x 5); not
# faster, or a raylet starved of CPU on a busy machine would be declared dead too.
FAST_NODE_FAILURE = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5, "health_check_timeout_ms": 1000}
# Replicas and handles report load every 0.5 s instead of 10 s, so short delays mean something.
FAST_METRICS_ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}
# Short delays for the test; the text encoder gets the denoiser's target, so only load differs.
FAST_AUTOSCALING = {"upscale_delay_s": 1.0, "downscale_delay_s": 4.0, "look_back_period_s": 2.0, "metrics_interval_s": 0.5}
TEST_AUTOSCALING = {
    "Denoiser": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2},
    "TextEncoder": {"target_ongoing_requests": 2},
}
# Most of a request's time is in the U-Net loop: the denoiser carries the load.
BODY = {"prompt": "a red circle", "width": 64, "height": 64, "prior_steps": 2, "steps": 100}


def wait_for(condition, what: str, timeout_s: float, interval_s: float = 0.5):
    """Poll ``condition()`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)  # polling interval, not a wait for readiness


def _shut_down_shared_instance() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def _with_autoscaling(config, changes: dict[str, dict]):
    options = copy.deepcopy(config.deployment_options)
    for name, change in changes.items():
        options[name]["autoscaling_config"] = {**options[name]["autoscaling_config"], **change}
    return config.model_copy(update={"deployment_options": options})


def _deploy(config) -> str:
    return start_service(config, port=_free_port())


@pytest.fixture(scope="module")
def cluster():
    _shut_down_shared_instance()
    shape = load_shape(ROOT / "cluster" / "node-types.yaml")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAST_METRICS_ENV.items():
            patch.setenv(key, value)
        with LocalCluster(shape, WORKERS, system_config=FAST_NODE_FAILURE, dashboard_port=_free_port()) as local:
            yield local


@pytest.fixture(scope="module")
def deployed(cluster, tiny_checkpoint):
    """(config, base URL) of configs/cluster.yaml on the local cluster, with test autoscaling."""
    config = on_cpu(load_config(ROOT / "configs" / "cluster.yaml"), *map(str, tiny_checkpoint))
    config = _with_autoscaling(config, {name: FAST_AUTOSCALING for name in STAGE_NAMES})
    config = _with_autoscaling(config, TEST_AUTOSCALING)
    return config, _deploy(config)


def _expected_type(config, shape, deployment: str) -> str:
    return node_type_of(config.deployment_options[deployment], shape).name


def _placement_by_type(cluster) -> dict[str, list[str]]:
    return {name: [cluster.node_types.get(node, "unknown") for node in nodes] for name, nodes in replica_nodes(APP).items()}


def _assert_placement(cluster, config) -> dict[str, list[str]]:
    placed = _placement_by_type(cluster)
    assert set(placed) == set(config.deployment_options), placed
    for deployment, types in placed.items():
        expected = _expected_type(config, cluster.shape, deployment)
        assert types and set(types) == {expected}, f"{deployment} replicas on {types}, expected only {expected}"
    return placed


class Replicas:
    """Samples serve.status() in the background: per deployment, RUNNING and all replicas."""

    def __init__(self, deployments: tuple[str, ...], interval_s: float = 0.5) -> None:
        self.deployments = deployments
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._origin = time.monotonic()

    @staticmethod
    def now() -> dict[str, tuple[int, int]]:
        from ray import serve

        app = serve.status().applications[APP]
        return {
            name: (status.replica_states.get("RUNNING", 0), sum(status.replica_states.values()))
            for name, status in app.deployments.items()
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            counts = self.now()
            self.samples.append((time.monotonic() - self._origin, {n: counts.get(n, (0, 0)) for n in self.deployments}))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "Replicas":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def latest(self, name: str) -> tuple[int, int]:
        return self.samples[-1][1][name] if self.samples else (0, 0)

    def changes(self) -> list[str]:
        """The timeline, one line per change: t, then RUNNING/all per deployment."""
        lines, last = [], None
        for t, counts in self.samples:
            if counts != last:
                lines.append(f"t={t:5.1f}s " + " ".join(f"{n}={r}/{a}" for n, (r, a) in counts.items()))
                last = counts
        return lines


class Load:
    """A closed-loop LoadTest in a background thread until stop()."""

    def __init__(self, url: str, clients: int, ramp_s: float = 0.0, timeout_s: float = 120.0) -> None:
        scenario = Scenario(
            target=url, mix=[RequestMix(body=BODY)],
            arrival={"process": "closed", "concurrency": [clients], "ramp_s": ramp_s},
            duration_s=600, timeout_s=timeout_s, scrape_metrics=False,
        )
        self.test = LoadTest(scenario, progress=False)
        self.result = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.result = asyncio.run(self.test.run())

    def succeeded(self) -> int:
        return sum(1 for r in list(self.test.records) if r.outcome == "success")

    def __enter__(self) -> "Load":
        self._origin = time.monotonic()
        self._thread.start()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self._origin

    def __exit__(self, *exc_info) -> None:
        self.test.stop()
        self._thread.join(timeout=self.test.scenario.timeout_s + 60)
        assert not self._thread.is_alive(), "the load generator did not finish: a request hung"

    def outcomes(self) -> dict:
        [step] = self.result.steps
        return {"sent": step.sent, "succeeded": step.succeeded, "failed": step.failed, "lost": step.lost}


def test_each_stage_runs_only_on_its_node_type(cluster, deployed):
    config, url = deployed
    placed = _assert_placement(cluster, config)
    assert {t for types in placed.values() for t in types} == {"head", "small-gpu", "denoiser-gpu"}
    assert httpx.post(f"{url}/v1/text2img", json={**BODY, "steps": 5}, timeout=120).status_code == 200


def test_denoiser_scales_out_and_back_while_the_text_encoder_stays_at_one(cluster, deployed):
    config, url = deployed
    with Replicas(STAGE_NAMES) as replicas:
        # Clients join over 4 s, as users do: no artificial burst of 8 at the first stage at t=0.
        with Load(url, clients=8, ramp_s=4.0) as busy:
            wait_for(lambda: replicas.latest("Denoiser")[0] >= 3, "the denoiser to reach 3 running replicas", 180)
            peak = _assert_placement(cluster, config)  # the new replicas too: denoiser nodes only
            scaled_at = busy.elapsed()
        # One client keeps requests in flight while the extra replicas drain and go.
        stopped_at = time.monotonic()
        with Load(url, clients=1) as trickle:
            wait_for(lambda: replicas.latest("Denoiser")[1] == 1, "the denoiser to return to 1 replica", 120)
            back_after = time.monotonic() - stopped_at
            served = trickle.succeeded()
            wait_for(lambda: trickle.succeeded() > served, "a request served by the remaining replica", 60)
    outcomes = {"8 clients": busy.outcomes(), "then 1 client": trickle.outcomes()}
    print("\nautoscaling: replica counts (RUNNING/all) over time", *replicas.changes(), sep="\n  ")
    print(f"  denoiser >= 3 running after {scaled_at:.1f} s of load; back to 1 replica {back_after:.1f} s after the load dropped")
    print(f"  placement at peak: {peak}")
    print(f"  requests: {outcomes}")
    for phase in outcomes.values():
        assert phase["sent"] > 0 and phase["succeeded"] == phase["sent"] and phase["lost"] == 0, outcomes
    assert max(counts["TextEncoder"][1] for _, counts in replicas.samples) == 1, "the text encoder scaled too"
    assert max(counts["Denoiser"][0] for _, counts in replicas.samples) >= 3


def test_losing_a_denoiser_node_under_load_fails_no_request_and_recovers(cluster, deployed):
    config, url = deployed
    # Two replicas, on two of three denoiser nodes (Serve's SPREAD placement alone does not
    # promise one per node): losing one node leaves a node with room for the replacement.
    cluster.add_node("denoiser-gpu")
    config = _with_autoscaling(config, {"Denoiser": {"min_replicas": 2, "max_replicas": 2}})
    options = copy.deepcopy(config.deployment_options)
    options["Denoiser"]["max_replicas_per_node"] = 1
    _deploy(config.model_copy(update={"deployment_options": options}))
    deadline_s = 180  # generous: the 2-core CI machine may be shared

    def two_denoisers_on_two_nodes():
        nodes = replica_nodes(APP).get("Denoiser", [])
        return nodes if len(nodes) == 2 and len(set(nodes)) == 2 and Replicas.now()["Denoiser"] == (2, 2) else None

    nodes = wait_for(two_denoisers_on_two_nodes, "two denoiser replicas on two denoiser nodes", deadline_s)
    victim = next(node for node in cluster.nodes("denoiser-gpu") if node.node_id == nodes[0])
    retries_before = _retries(url)
    with Load(url, clients=6) as load:
        wait_for(lambda: load.succeeded() >= 6, "steady load", deadline_s)
        killed_at = time.monotonic()
        cluster.kill(victim)

        def recovered():
            nodes = replica_nodes(APP).get("Denoiser", [])
            return len(nodes) == 2 and victim.node_id not in nodes and Replicas.now()["Denoiser"] == (2, 2)

        wait_for(recovered, "two running denoiser replicas on the remaining nodes", deadline_s)
        recovery_s = time.monotonic() - killed_at
        served = load.succeeded()
        wait_for(lambda: load.succeeded() >= served + 2, "requests served after recovery", deadline_s)
    outcomes = load.outcomes()
    try:  # Ray exports the ingress's counter every 0.5 s here; a full test run's busy machine can take far longer
        retries = wait_for(lambda: _retries(url) - retries_before, "the ingress's retry counter", 120)
    except TimeoutError:
        retries = 0.0
    print(f"\nnode loss: {outcomes}, denoiser calls retried: {retries:g}, recovered to 2 replicas in {recovery_s:.1f} s")
    assert outcomes["lost"] == 0, outcomes
    # Every request ends in success or an explicit HTTP error, never a timeout (a hang).
    assert all(kind.startswith("http_5") for kind in outcomes["failed"]), outcomes
    assert outcomes["succeeded"] > 0 and outcomes["succeeded"] + sum(outcomes["failed"].values()) == outcomes["sent"]
    assert retries >= 1, "no request was in flight on the lost replica: the test proved nothing"


def _retries(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return total(text, "ray_kandinsky_serve_stage_retries_total", deployment="Denoiser")
