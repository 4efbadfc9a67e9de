"""Cluster files: node types, the rendered KubeRay manifest (no drift), the launcher YAML. No Ray instance."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from serve.cli import main
from serve.tools.cluster import ClusterShape, fit_problems, load_shape, on_cpu, render_rayservice
from deployments.registry import STAGE_NAMES
from serve.settings import ConfigError, load_config

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs" / "cluster.yaml"
NODES = ROOT / "cluster" / "node-types.yaml"
MANIFEST = ROOT / "cluster" / "kuberay-rayservice.yaml"
LAUNCHER = ROOT / "cluster" / "aws-launcher.yaml"


@pytest.fixture(scope="module")
def shape():
    return load_shape(NODES)


@pytest.fixture(scope="module")
def config():
    return load_config(CONFIG)


@pytest.fixture(scope="module")
def manifest():
    """The RayService (the file's first document; tests/security/test_manifest.py checks the rest)."""
    return next(yaml.safe_load_all(MANIFEST.read_text()))


def test_checked_in_manifest_is_what_render_writes(tmp_path):
    out = tmp_path / "rayservice.yaml"
    assert main(["cluster", "render", "--config", "configs/cluster.yaml", "--nodes", "cluster/node-types.yaml", "-o", str(out)]) == 0
    assert out.read_text() == MANIFEST.read_text(), "run `kandinsky-serve cluster render` and commit the result"


def test_serve_config_is_the_cluster_config_listening_on_the_pod_network_with_api_keys(manifest, config, shape):
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    expected = copy.deepcopy(config.raw)
    expected["http_options"]["host"] = "0.0.0.0"
    keys_file = f"{shape.kubernetes.api_keys_mount_path}/keys.yaml"
    for app in expected["applications"]:
        app["args"].setdefault("auth", {})["api_keys_file"] = keys_file
    assert serve_config == expected


def _group_resources(group: dict) -> dict[str, int]:
    # KubeRay's format: a JSON object inside a quoted string, '"{\"name\": 1000}"'.
    return json.loads(json.loads(group["rayStartParams"]["resources"]))


def _limits(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_one_worker_group_per_node_type_with_its_gpus_and_resources(manifest, shape):
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"} and cluster["enableInTreeAutoscaling"] is True
    assert _group_resources(cluster["headGroupSpec"]) == shape.head.resources
    assert "nvidia.com/gpu" not in _limits(cluster["headGroupSpec"])
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    assert set(groups) == {t.name for t in shape.workers}
    for node_type in shape.workers:
        group = groups[node_type.name]
        assert _group_resources(group) == node_type.resources
        assert _limits(group)["nvidia.com/gpu"] == str(node_type.gpus) and _limits(group)["cpu"] == str(node_type.cpus)
        assert (group["minReplicas"], group["maxReplicas"]) == (node_type.min_workers, node_type.max_workers)


def test_every_deployment_asks_for_a_resource_one_group_offers(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    offered = {name for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]] for name in _group_resources(group)}
    deployments = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    for deployment in deployments:
        asked = set(deployment["ray_actor_options"]["resources"])
        assert asked and asked <= offered, deployment["name"]


def test_the_cluster_config_fits_its_node_types(config, shape):
    assert fit_problems(config, shape) == []


def _mutated(tmp_path, deployment: str, mutate):
    raw = yaml.safe_load(CONFIG.read_text())
    entry = next(d for d in raw["applications"][0]["deployments"] if d["name"] == deployment)
    mutate(entry)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.mark.parametrize(
    "deployment,mutate,expected",
    [
        ("Denoiser", lambda d: d["ray_actor_options"].update(num_gpus=5), "Denoiser: one replica needs 4 CPUs and 5 GPUs"),
        ("Prior", lambda d: d["ray_actor_options"].pop("resources"), "Prior: ray_actor_options.resources {} selects no single node type"),
        ("TextEncoder", lambda d: d["ray_actor_options"].update(resources={"kandinsky_gpu": 1}), "selects no single node type"),
        ("Denoiser", lambda d: d["autoscaling_config"].update(max_replicas=13), "node type denoiser-gpu: its deployments at max_replicas need 68 CPUs and 17 GPUs"),
    ],
)
def test_a_deployment_that_does_not_fit_is_named(tmp_path, shape, deployment, mutate, expected):
    problems = fit_problems(_mutated(tmp_path, deployment, mutate), shape)
    assert any(expected in line for line in problems), problems
    with pytest.raises(ConfigError):
        render_rayservice(_mutated(tmp_path, deployment, mutate), shape)


def test_render_refuses_a_config_that_does_not_fit(tmp_path, capsys):
    _mutated(tmp_path, "Denoiser", lambda d: d["ray_actor_options"].update(num_gpus=8))
    out = tmp_path / "out.yaml"
    assert main(["cluster", "render", "--config", str(tmp_path / "cluster.yaml"), "-o", str(out)]) == 2
    assert "Denoiser: one replica needs" in capsys.readouterr().err and not out.exists()


def test_launcher_declares_the_same_node_types(shape):
    launcher = yaml.safe_load(LAUNCHER.read_text())
    types = launcher["available_node_types"]
    assert set(types) == {t.name for t in shape.node_types} and launcher["head_node_type"] == shape.head.name
    for node_type in shape.node_types:
        declared = types[node_type.name]
        assert declared["resources"] == {"CPU": node_type.cpus, "GPU": node_type.gpus, **node_type.resources}, node_type.name
        if node_type is not shape.head:
            assert (declared["min_workers"], declared["max_workers"]) == (node_type.min_workers, node_type.max_workers)
    assert launcher["max_workers"] == sum(t.max_workers for t in shape.workers)
    assert "--dashboard-host=127.0.0.1" in " ".join(launcher["head_start_ray_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(launcher[key]) for key in ("head_start_ray_commands", "worker_start_ray_commands"))


def test_node_types_refuse_a_resource_that_selects_two_types(shape):
    raw = shape.model_dump()
    raw["workers"][1]["resources"] = dict(raw["workers"][0]["resources"])
    with pytest.raises(ValueError, match="select one node type"):
        ClusterShape.model_validate(raw)


def test_on_cpu_keeps_placement_and_scaling(config):
    from deployments.registry import UNDERSTANDING_STAGES

    tiny = {stage.path_field: f"/tiny/{stage.checkpoint}" for stage in UNDERSTANDING_STAGES}
    local = on_cpu(config, "/tiny/prior", "/tiny/decoder", "/tiny/inpaint", "/tiny/controlnet", understanding=tiny)
    models = local.raw["applications"][0]["args"]["models"]
    assert models == {**models, "prior_path": "/tiny/prior", "device": "cpu", "dtype": "float32", **tiny}
    for name, options in config.deployment_options.items():
        changed = local.deployment_options[name]
        assert changed["ray_actor_options"] == options["ray_actor_options"]
        assert changed["autoscaling_config"] == options["autoscaling_config"]
        if name in STAGE_NAMES:
            assert changed["user_config"]["torch_threads"] == 1
    assert config.raw["applications"][0]["args"]["models"]["device"] == "cuda", "the original is left alone"


def test_local_cluster_refuses_bad_worker_counts(capsys):
    assert main(["cluster", "local", "--workers", "denoiser-gpu=100"]) == 2
    assert "--workers denoiser-gpu=100" in capsys.readouterr().err


def test_a_bad_node_types_file_names_the_field(tmp_path):
    raw = yaml.safe_load(NODES.read_text())
    raw["workers"][0]["gpus"] = -1
    path = tmp_path / "node-types.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"{path}: workers.0.gpus: Input should be greater than or equal to 0"):
        load_shape(path)


def test_on_cpu_drops_a_variant_without_a_checkpoint(config):
    local = on_cpu(config, "/tiny/prior", "/tiny/decoder", None, "/tiny/controlnet")
    assert "InpaintDenoiser" not in local.deployment_options and "ControlnetDenoiser" in local.deployment_options
    names = [d["name"] for d in local.raw["applications"][0]["deployments"]]
    assert "InpaintDenoiser" not in names


def test_on_cpu_stands_the_tiny_checkpoint_in_for_a_list_of_models(config):
    import copy

    raw = copy.deepcopy(config.raw)
    raw["applications"][0]["args"]["models"] = [
        {"id": "k22", "prior_path": "/real/prior", "decoder_path": "/real/decoder", "default": True},
        {"id": "style", "prior_path": "/real/style-prior"},
    ]
    listed = config.model_copy(update={"raw": raw})
    local = on_cpu(listed, "/tiny/prior", "/tiny/decoder", None, None)
    models = local.raw["applications"][0]["args"]["models"]
    assert models["prior_path"] == "/tiny/prior" and models["device"] == "cpu" and "catalog" not in models
    assert raw["applications"][0]["args"]["models"][0]["prior_path"] == "/real/prior", "the original is left alone"


def test_on_cpu_runs_the_understanding_stages_on_the_given_tiny_checkpoints_or_drops_them(config):
    from deployments.registry import UNDERSTANDING_STAGES

    florence2, _ = UNDERSTANDING_STAGES
    assert florence2.name in config.deployment_options, "cluster.yaml deploys Florence-2"
    kept = on_cpu(config, "/tiny/prior", "/tiny/decoder", "/tiny/inpaint", "/tiny/controlnet",
                  understanding={florence2.path_field: "/tiny/florence2"})
    assert kept.raw["applications"][0]["args"]["models"][florence2.path_field] == "/tiny/florence2"
    assert florence2.name in kept.deployment_options
    dropped = on_cpu(config, "/tiny/prior", "/tiny/decoder", "/tiny/inpaint", "/tiny/controlnet")
    assert dropped.raw["applications"][0]["args"]["models"][florence2.path_field] is None
    assert florence2.name not in dropped.deployment_options
    assert florence2.name not in [d["name"] for d in dropped.raw["applications"][0]["deployments"]]
