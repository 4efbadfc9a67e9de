"""Node types, the KubeRay manifest rendered from a config, and a cluster on one machine.

* :class:`ClusterShape` (``cluster/node-types.yaml``): the node types a cluster config
  runs on; each offers a custom resource that deployments ask for to be placed on it.
* :func:`fit_problems`: does every deployment of a config fit a node type, and can the
  types' ``max_workers`` hold every deployment at its ``max_replicas``?
* :func:`render_rayservice`: a KubeRay ``RayService`` whose ``serveConfigV2`` is the
  config (API keys on, from a Secret) and whose worker groups are the node types, every
  container locked down (non-root, read-only root filesystem, no capabilities, seccomp),
  the image pinned by digest, and a ``NetworkPolicy`` that admits only the peers each
  port is for (:class:`KubernetesSecurity`).
* :class:`LocalCluster`: a head and worker "nodes" of those types as processes on this
  machine (Ray's ``cluster_utils``), for ``kandinsky-serve cluster local`` and the
  multi-node tests. GPUs there are logical: stages run on CPU (:func:`on_cpu`).

Everything reads deployment names from the config, never from a list here.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.registry import INGRESS_NAME, OPTIONAL_STAGES, STAGE_NAMES, UNDERSTANDING_STAGES
from serve.settings import CACHE_DIR_ENV, ConfigError, LoadedConfig, _format_errors

DEFAULT_NODE_TYPES = "cluster/node-types.yaml"
DEFAULT_CLUSTER_CONFIG = "configs/cluster.yaml"
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
# Serve's default for a replica that does not set num_cpus.
DEFAULT_REPLICA_CPUS = 1.0


class NodeType(BaseModel):
    """One kind of machine: what Ray sees on it and how many of it the cluster may have."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=40)
    """Worker group / node type name (a Kubernetes name)."""
    cpus: int = Field(ge=1, le=1024)
    memory: str = Field(pattern=r"^[1-9][0-9]*(Mi|Gi)$")
    """Kubernetes quantity, e.g. ``32Gi``."""
    gpus: int = Field(default=0, ge=0, le=16)
    resources: dict[str, int] = Field(min_length=1)
    """Custom resources the node offers; a deployment asking for one lands only on this type."""
    min_workers: int = Field(default=0, ge=0)
    max_workers: int = Field(default=1, ge=0, le=1000)
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Kubernetes nodeSelector of the group's pods (e.g. an accelerator label)."""

    @model_validator(mode="after")
    def _check(self) -> "NodeType":
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers {self.min_workers} is above max_workers {self.max_workers}")
        reserved = sorted(set(self.resources) & set(RESERVED_RESOURCES))
        if reserved:
            raise ValueError(f"resources: {reserved} are Ray's own; set cpus/gpus/memory instead")
        return self


class ModelsVolume(BaseModel):
    model_config = ConfigDict(extra="forbid")

    claim: str
    """PersistentVolumeClaim (ReadOnlyMany) holding the checkpoints, mounted read-only on every pod."""
    mount_path: str = "/models"


K8S_NAME = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
IMAGE_DIGEST = re.compile(r"^[^\s@]+@sha256:[0-9a-f]{64}$")
"""An image reference pinned by digest: ``name[:tag]@sha256:<64 hex digits>``."""


class PeerSelector(BaseModel):
    """The pods a NetworkPolicy rule admits: those whose labels match ``pods``, in the
    namespaces whose labels match ``namespace`` (each a ``matchLabels`` map)."""

    model_config = ConfigDict(extra="forbid")

    namespace: dict[str, str] = Field(min_length=1)
    pods: dict[str, str] = Field(min_length=1)

    def peer(self) -> dict[str, Any]:
        return {
            "namespaceSelector": {"matchLabels": dict(self.namespace)},
            "podSelector": {"matchLabels": dict(self.pods)},
        }


def _peer(namespace: str, name: str) -> PeerSelector:
    return PeerSelector(namespace={"kubernetes.io/metadata.name": namespace}, pods={"app.kubernetes.io/name": name})


class KubernetesSecurity(BaseModel):
    """``kubernetes:`` in ``cluster/node-types.yaml``: how the KubeRay render locks the pods down."""

    model_config = ConfigDict(extra="forbid")

    run_as_user: int = Field(default=1000, ge=1)
    """Every container runs as this uid (``ray`` in the rayproject/ray images), never root."""
    run_as_group: int = Field(default=100, ge=1)
    """Its gid and the pod's fsGroup (``users`` in the rayproject/ray images): the group that
    may read the API keys file."""
    api_keys_secret: str | None = Field(default=None, pattern=K8S_NAME, max_length=253)
    """The Secret (key ``keys.yaml``) holding the API keys file; default ``<RayService name>-api-keys``.
    Created by the operator, never rendered: the manifest holds no key."""
    api_keys_mount_path: str = Field(default="/etc/kandinsky-serve/api-keys", pattern=r"^/[^:]*$")
    """Where it is mounted (read-only, mode 0400) on the pods that run the Ingress."""
    ingress_from: PeerSelector = Field(default_factory=lambda: _peer("ingress-nginx", "ingress-nginx"))
    """The ingress controller: the only peer that reaches the Serve HTTP port."""
    operator_from: PeerSelector = Field(default_factory=lambda: _peer("kuberay-system", "kuberay-operator"))
    """The KubeRay operator: the only peer (Ray pods aside) that reaches the dashboard port,
    through which it deploys serveConfigV2 and checks the applications."""
    metrics_from: PeerSelector = Field(default_factory=lambda: _peer("monitoring", "prometheus"))
    """Prometheus: the only peer (Ray pods aside) that reaches the metrics port."""


class RuntimeEnv(BaseModel):
    """``runtime_env:`` in ``cluster/node-types.yaml`` (or ``cluster render --runtime-env``): the
    alternative to an image with the package in it. The pods run a stock ``rayproject/ray`` image
    and Ray installs the package into the application's workers from these (Ray's ``runtime_env``,
    written into ``serveConfigV2``); the pods then need egress to where they point."""

    model_config = ConfigDict(extra="forbid")

    pip: list[str] = Field(default_factory=list, max_length=64)
    """Requirements Ray pip-installs, e.g. ``kandinsky-serve @ https://example.com/kandinsky_serve-0.1.0-py3-none-any.whl``."""
    working_dir: str | None = Field(default=None, pattern=r"^(https|s3|gs)://\S+\.zip$")
    """A zip of the source tree at a remote URI (a pod has no local copy of this checkout)."""
    env_vars: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "RuntimeEnv":
        if not self.pip and self.working_dir is None:
            raise ValueError("runtime_env needs pip requirements or a working_dir that bring the package")
        return self

    def as_ray(self) -> dict[str, Any]:
        """Ray's ``runtime_env`` mapping (only the fields set)."""
        return self.model_dump(exclude_defaults=True)


class ClusterShape(BaseModel):
    """``cluster/node-types.yaml``."""

    model_config = ConfigDict(extra="forbid")

    image: str
    """The image every pod runs (the repository's Dockerfile, pushed); the KubeRay render wants it
    pinned by digest (:data:`IMAGE_DIGEST`). ``cluster render --image`` overrides it."""
    runtime_env: RuntimeEnv | None = None
    """Set it to run a stock Ray image that Ray installs the package into (:class:`RuntimeEnv`)."""
    ray_version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    models: ModelsVolume
    head: NodeType
    workers: list[NodeType] = Field(min_length=1)
    kubernetes: KubernetesSecurity = Field(default_factory=KubernetesSecurity)

    @model_validator(mode="after")
    def _check(self) -> "ClusterShape":
        names = [t.name for t in self.node_types]
        if len(set(names)) != len(names):
            raise ValueError(f"node type names must be unique: {names}")
        offered = [r for t in self.node_types for r in t.resources]
        if len(set(offered)) != len(offered):
            raise ValueError(f"each custom resource must select one node type; offered more than once: {offered}")
        return self

    @property
    def node_types(self) -> list[NodeType]:
        return [self.head, *self.workers]

    def by_name(self, name: str) -> NodeType:
        for node_type in self.node_types:
            if node_type.name == name:
                return node_type
        raise ConfigError(f"no node type {name!r}; known: {[t.name for t in self.node_types]}")

    def max_nodes(self, node_type: NodeType) -> int:
        """Most nodes of a type the cluster may have (the head is one)."""
        return 1 if node_type is self.head else node_type.max_workers


def load_shape(path: str | Path = DEFAULT_NODE_TYPES) -> ClusterShape:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read node types: {error}") from None
    try:
        return ClusterShape.model_validate(raw)
    except ValidationError as error:
        raise ConfigError("\n".join(_format_errors(str(path), "", error))) from None


def with_overrides(shape: ClusterShape, image: str | None = None, runtime_env: str | None = None) -> ClusterShape:
    """``shape`` with ``cluster render``'s ``--image`` and ``--runtime-env`` (JSON) in place of
    the file's; :class:`ConfigError` naming the option when one is invalid."""
    update: dict[str, Any] = {}
    if image is not None:
        if not image or any(c.isspace() for c in image):
            raise ConfigError(f"--image: {image!r} is not an image reference")
        update["image"] = image
    if runtime_env is not None:
        try:
            update["runtime_env"] = RuntimeEnv.model_validate_json(runtime_env)
        except ValidationError as error:
            raise ConfigError("\n".join(_format_errors("--runtime-env", "", error))) from None
    return shape.model_copy(update=update)


# --- placement -------------------------------------------------------------------------------


def replica_demand(options: Mapping[str, Any]) -> tuple[float, float, dict[str, float]]:
    """(CPUs, GPUs, custom resources) one replica of a deployment asks for."""
    actor = options.get("ray_actor_options") or {}
    cpus = actor.get("num_cpus")
    return (
        DEFAULT_REPLICA_CPUS if cpus is None else float(cpus),
        float(actor.get("num_gpus") or 0.0),
        {name: float(amount) for name, amount in (actor.get("resources") or {}).items()},
    )


def max_replicas(options: Mapping[str, Any]) -> int:
    autoscaling = options.get("autoscaling_config") or {}
    if autoscaling:
        return int(autoscaling.get("max_replicas", 1))
    replicas = options.get("num_replicas", 1)
    return replicas if isinstance(replicas, int) else 1


def node_type_of(options: Mapping[str, Any], shape: ClusterShape) -> NodeType | None:
    """The node type that offers every custom resource a deployment asks for."""
    _, _, custom = replica_demand(options)
    matches = [t for t in shape.node_types if custom and all(name in t.resources for name in custom)]
    return matches[0] if len(matches) == 1 else None


def fit_problems(config: LoadedConfig, shape: ClusterShape) -> list[str]:
    """What keeps ``config`` from running on ``shape``, one line each (empty: it fits).

    Per deployment: it names a node type and one replica fits one node. Per node type:
    the deployments pinned to it, all at ``max_replicas``, need no more CPUs and GPUs
    than ``max_workers`` nodes have (necessary, not sufficient: fractional GPUs must
    also pack into whole nodes).
    """
    source = str(config.path)
    problems: list[str] = []
    need: dict[str, list[float]] = {t.name: [0.0, 0.0] for t in shape.node_types}
    for name, options in config.deployment_options.items():
        cpus, gpus, custom = replica_demand(options)
        node_type = node_type_of(options, shape)
        if node_type is None:
            offered = {r: t.name for t in shape.node_types for r in t.resources}
            problems.append(
                f"{source}: {name}: ray_actor_options.resources {custom or '{}'} selects no single node type; "
                f"ask for one of {offered}"
            )
            continue
        for resource, amount in custom.items():
            if amount > node_type.resources[resource]:
                problems.append(f"{source}: {name}: asks for {amount:g} {resource}, a {node_type.name} node offers {node_type.resources[resource]}")
        if cpus > node_type.cpus or gpus > node_type.gpus:
            problems.append(
                f"{source}: {name}: one replica needs {cpus:g} CPUs and {gpus:g} GPUs; "
                f"a {node_type.name} node has {node_type.cpus} CPUs and {node_type.gpus} GPUs"
            )
        count = max_replicas(options)
        need[node_type.name][0] += count * cpus
        need[node_type.name][1] += count * gpus
    for node_type in shape.node_types:
        nodes = shape.max_nodes(node_type)
        cpus, gpus = need[node_type.name]
        if cpus > nodes * node_type.cpus or gpus > nodes * node_type.gpus + 1e-9:
            problems.append(
                f"{source}: node type {node_type.name}: its deployments at max_replicas need {cpus:g} CPUs and "
                f"{gpus:g} GPUs; {nodes} node(s) have {nodes * node_type.cpus} CPUs and {nodes * node_type.gpus} GPUs "
                f"— raise max_workers or lower max_replicas"
            )
    return problems


# --- KubeRay ---------------------------------------------------------------------------------

MANIFEST_HEADER = """\
# Generated by `kandinsky-serve cluster render` from {config} and {nodes}.
# Do not edit: change those two files and render again (a test fails on drift).
#
# Needs KubeRay >= 1.5.1 (authOptions: Ray token authentication), a network plugin that
# enforces NetworkPolicy, and an image with kandinsky-serve installed (the repository's
# Dockerfile), pinned by digest (docs/configuration-and-cluster.md, "KubeRay"). API keys are on: create the Secret
# {secret} (key {keys_file}) before applying, e.g.
#   kandinsky-serve keys new team-a --file {keys_file}
#   kubectl create secret generic {secret} --from-file={keys_file}
# Nothing here is exposed outside the Kubernetes cluster: KubeRay's head and serve Services
# are ClusterIP, and the NetworkPolicy below lets in only the ingress controller (serve
# port), the KubeRay operator (dashboard), Prometheus (metrics) and this service's Ray pods.
"""
UNPINNED_WARNING = "# WARNING: rendered with --allow-unpinned-image: the image is not pinned by digest.\n"

GCS_PORT = 6379
DASHBOARD_PORT = 8265
METRICS_PORT = 8080
API_KEYS_FILE = "keys.yaml"
"""The key of the API keys Secret, and the file name it is mounted as."""
TMP_DIR = "/tmp"
"""The only writable path of a Ray container (an emptyDir): Ray's temp dir is /tmp/ray."""
CACHE_DIR = "/tmp/.cache"
INBOUND_POLICY = "ingress".capitalize()
"""NetworkPolicy policyTypes value (Kubernetes' word, not the stage: spelled so that the
test keeping stage names in deployments/registry.py does not take it for one)."""


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings as ``|`` blocks, so serveConfigV2 reads as the config it is."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)


def _ray_start_resources(resources: Mapping[str, int]) -> str:
    """rayStartParams.resources in KubeRay's format: a quoted JSON string."""
    return '"' + json.dumps(dict(resources)).replace('"', '\\"') + '"'


def pod_labels(name: str) -> dict[str, str]:
    """Labels of every pod of the RayService ``name`` (the NetworkPolicy selects them)."""
    return {"app.kubernetes.io/name": "kandinsky-serve", "app.kubernetes.io/instance": name}


def api_keys_secret(shape: ClusterShape, name: str) -> str:
    return shape.kubernetes.api_keys_secret or f"{name}-api-keys"


def api_keys_path(shape: ClusterShape) -> str:
    return f"{shape.kubernetes.api_keys_mount_path.rstrip('/')}/{API_KEYS_FILE}"


def serve_config_for_kubernetes(config: LoadedConfig, api_keys_file: str | None = None,
                                runtime_env: RuntimeEnv | None = None) -> dict[str, Any]:
    """The config as KubeRay deploys it: the proxy listens on the pod network, reached
    only through KubeRay's ClusterIP serve Service (127.0.0.1 would be unreachable), and
    every application's ``auth.api_keys_file`` is ``api_keys_file`` (the mounted Secret);
    with ``runtime_env``, every application installs the package from it."""
    raw = copy.deepcopy(config.raw)
    raw.setdefault("http_options", {})["host"] = "0.0.0.0"
    for app in raw.get("applications", []):
        if api_keys_file:
            app.setdefault("args", {}).setdefault("auth", {})["api_keys_file"] = api_keys_file
        if runtime_env is not None:
            app["runtime_env"] = {**(app.get("runtime_env") or {}), **runtime_env.as_ray()}
    return raw


def container_security_context(shape: ClusterShape) -> dict[str, Any]:
    """Every container's: not root, nothing to escalate to, no capabilities, seccomp, and a
    read-only root filesystem (what Ray writes goes to the /tmp emptyDir)."""
    k8s = shape.kubernetes
    return {
        "runAsNonRoot": True,
        "runAsUser": k8s.run_as_user,
        "runAsGroup": k8s.run_as_group,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security_context(shape: ClusterShape) -> dict[str, Any]:
    """The pod's: also covers the containers KubeRay adds (fsGroup lets our gid read the keys)."""
    k8s = shape.kubernetes
    return {
        "runAsNonRoot": True,
        "runAsUser": k8s.run_as_user,
        "runAsGroup": k8s.run_as_group,
        "fsGroup": k8s.run_as_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env() -> list[dict[str, str]]:
    """Caches under the writable /tmp (the root filesystem, $HOME included, is read-only)."""
    return [
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": CACHE_DIR_ENV, "value": f"{CACHE_DIR}/kandinsky-serve"},
    ]


def _pod_template(
    container: str, node_type: NodeType, shape: ClusterShape, name: str, ports: list[dict] | None = None,
    api_keys: bool = False, head: bool = False,
) -> dict:
    limits: dict[str, Any] = {"cpu": str(node_type.cpus), "memory": node_type.memory}
    if node_type.gpus:
        limits["nvidia.com/gpu"] = str(node_type.gpus)
    mounts = [
        {"name": "models", "mountPath": shape.models.mount_path, "readOnly": True},
        {"name": "tmp", "mountPath": TMP_DIR},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "models", "persistentVolumeClaim": {"claimName": shape.models.claim, "readOnly": True}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if api_keys:
        mounts.append({"name": "api-keys", "mountPath": shape.kubernetes.api_keys_mount_path, "readOnly": True})
        volumes.append({"name": "api-keys", "secret": {
            "secretName": api_keys_secret(shape, name),
            "defaultMode": 0o400,
            "items": [{"key": API_KEYS_FILE, "path": API_KEYS_FILE}],
        }})
    if head:  # the autoscaler sidecar's /tmp (autoscalerOptions.volumeMounts)
        volumes.append({"name": "autoscaler-tmp", "emptyDir": {}})
    spec: dict[str, Any] = {
        "securityContext": _pod_security_context(shape),
        # Only the head's autoscaler sidecar talks to the Kubernetes API.
        **({} if head else {"automountServiceAccountToken": False}),
        "containers": [{
            "name": container,
            "image": shape.image,
            **({"ports": ports} if ports else {}),
            "env": _env(),
            "resources": {"limits": limits, "requests": dict(limits)},
            "securityContext": container_security_context(shape),
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }
    if node_type.gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if node_type.node_selector:
        spec["nodeSelector"] = dict(node_type.node_selector)
    return {"metadata": {"labels": pod_labels(name)}, "spec": spec}


def ingress_node_types(config: LoadedConfig, shape: ClusterShape) -> set[str]:
    """The node types the Ingress (the one reader of the API keys file) may run on."""
    node_type = node_type_of(config.deployment_options.get(INGRESS_NAME, {}), shape)
    return {node_type.name} if node_type is not None else {t.name for t in shape.node_types}


def rayservice_manifest(config: LoadedConfig, shape: ClusterShape, name: str = "kandinsky") -> dict[str, Any]:
    head_ports = [
        {"containerPort": GCS_PORT, "name": "gcs-server"},
        {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
        {"containerPort": config.http_port, "name": "serve"},
        {"containerPort": METRICS_PORT, "name": "metrics"},
    ]
    serve_config = yaml.dump(
        serve_config_for_kubernetes(config, api_keys_path(shape), shape.runtime_env), Dumper=_LiteralDumper,
        sort_keys=False
    )
    keyed = ingress_node_types(config, shape)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": serve_config,
            "rayClusterConfig": {
                "rayVersion": shape.ray_version,
                "enableInTreeAutoscaling": True,  # pending replicas make the Ray autoscaler add worker pods
                "authOptions": {"mode": "token"},
                "autoscalerOptions": {  # the head's autoscaler sidecar: same lock-down, its own /tmp
                    "securityContext": container_security_context(shape),
                    "env": _env(),
                    "volumeMounts": [{"name": "autoscaler-tmp", "mountPath": TMP_DIR}],
                },
                "headGroupSpec": {
                    "serviceType": "ClusterIP",
                    "rayStartParams": {
                        "resources": _ray_start_resources(shape.head.resources),
                        "metrics-export-port": str(METRICS_PORT),
                    },
                    "template": _pod_template(
                        "ray-head", shape.head, shape, name, head_ports, api_keys=shape.head.name in keyed, head=True
                    ),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": worker.name,
                        "replicas": worker.min_workers,
                        "minReplicas": worker.min_workers,
                        "maxReplicas": worker.max_workers,
                        "rayStartParams": {
                            "resources": _ray_start_resources(worker.resources),
                            "metrics-export-port": str(METRICS_PORT),
                        },
                        "template": _pod_template("ray-worker", worker, shape, name, api_keys=worker.name in keyed),
                    }
                    for worker in shape.workers
                ],
            },
        },
    }


def network_policy(config: LoadedConfig, shape: ClusterShape, name: str = "kandinsky") -> dict[str, Any]:
    """Ingress to the RayService's pods: Ray's ports (GCS, raylets, object managers, workers,
    agents: many of them dynamic) from its own pods only; the serve port from the ingress
    controller, the dashboard from the KubeRay operator, metrics from Prometheus."""
    k8s = shape.kubernetes
    ray_pods = {"podSelector": {"matchLabels": pod_labels(name)}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-ray"},
        "spec": {
            "podSelector": {"matchLabels": pod_labels(name)},
            "policyTypes": [INBOUND_POLICY],
            "ingress": [
                {"from": [ray_pods]},
                {"from": [k8s.ingress_from.peer()], "ports": [{"protocol": "TCP", "port": config.http_port}]},
                {"from": [k8s.operator_from.peer()], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
                {"from": [k8s.metrics_from.peer()], "ports": [{"protocol": "TCP", "port": METRICS_PORT}]},
            ],
        },
    }


def render_rayservice(
    config: LoadedConfig, shape: ClusterShape, config_name: str = DEFAULT_CLUSTER_CONFIG,
    nodes_name: str = DEFAULT_NODE_TYPES, name: str = "kandinsky", allow_unpinned_image: bool = False,
) -> str:
    """The manifest text (the RayService, then its NetworkPolicy); raises :class:`ConfigError`
    when the config does not fit the node types, or the image is not pinned by digest
    (unless ``allow_unpinned_image``)."""
    problems = fit_problems(config, shape)
    pinned = IMAGE_DIGEST.match(shape.image) is not None
    if not pinned and not allow_unpinned_image:
        problems.append(
            f"{nodes_name}: image: {shape.image!r} is not pinned by digest; set it to NAME@sha256:<64 hex digits> "
            f"(the digest your registry reports for the pushed image), or pass --allow-unpinned-image for a test cluster"
        )
    if problems:
        raise ConfigError("\n".join(problems))
    body = yaml.dump_all(
        [rayservice_manifest(config, shape, name), network_policy(config, shape, name)],
        Dumper=_LiteralDumper, sort_keys=False,
    )
    header = MANIFEST_HEADER.format(
        config=config_name, nodes=nodes_name, secret=api_keys_secret(shape, name), keys_file=API_KEYS_FILE
    )
    return header + ("" if pinned else UNPINNED_WARNING) + body


# --- one machine -----------------------------------------------------------------------------


def on_cpu(
    config: LoadedConfig,
    prior_path: str | None = None,
    decoder_path: str | None = None,
    inpaint_decoder_path: str | None = None,
    controlnet_decoder_path: str | None = None,
    understanding: dict[str, str] | None = None,
) -> LoadedConfig:
    """The same config for a machine without GPUs: the tiny checkpoint (the given paths,
    or the embedded one with every variant) on CPU, one intra-op thread per stage. A
    decoder variant without a path, next to given main paths, is dropped; so is an
    image-understanding stage without a path in ``understanding`` (by ``path_field``).
    Placement (custom resources, logical GPUs), autoscaling, queues and health checks are unchanged."""
    raw = copy.deepcopy(config.raw)
    app = raw["applications"][0]
    args = app.setdefault("args", {})
    if not isinstance(args.get("models"), dict) or "catalog" in args["models"]:
        args["models"] = {}  # a list of models names real checkpoints: the tiny one stands in for them all
    models = args.setdefault("models", {})
    variants = {"inpaint_decoder_path": inpaint_decoder_path, "controlnet_decoder_path": controlnet_decoder_path}
    tiny_understanding = {stage.path_field: (understanding or {}).get(stage.path_field) for stage in UNDERSTANDING_STAGES}
    models.update(prior_path=prior_path, decoder_path=decoder_path, device="cpu", dtype="float32", **variants,
                  **tiny_understanding)
    options = copy.deepcopy(config.deployment_options)
    dropped = {stage.name for stage in UNDERSTANDING_STAGES if tiny_understanding[stage.path_field] is None}
    if prior_path is not None:
        dropped |= {stage.name for stage in OPTIONAL_STAGES if variants[stage.path_field] is None}
    app["deployments"] = [d for d in app.get("deployments", []) if d.get("name") not in dropped]
    options = {name: opts for name, opts in options.items() if name not in dropped}
    for name in STAGE_NAMES:
        if name in options:
            options[name]["user_config"] = {**(options[name].get("user_config") or {}), "torch_threads": 1}
    return config.model_copy(update={"raw": raw, "deployment_options": options})


def _current_ray_address() -> str | None:
    """The machine's "current Ray cluster" record (/tmp/ray/ray_current_cluster) that a bare
    ``ray.init()`` joins."""
    from ray._private.utils import read_ray_address

    return read_ray_address()


def _restore_current_ray_address(address: str | None) -> None:
    from ray._common.utils import reset_ray_address
    from ray._private.utils import write_ray_address

    if address:
        write_ray_address(address)
    else:
        reset_ray_address()


class LocalCluster:
    """A head and worker nodes of a :class:`ClusterShape`'s types, as processes on this
    machine. Each node declares its type's CPUs, GPUs (logical: none need exist) and
    custom resources, so Ray places replicas exactly as on the real cluster.

    ``workers`` maps a node type name to how many nodes of it to start. Every node's
    ports, the dashboard's (needed by Ray's state API, e.g. :func:`replica_nodes`)
    included, listen on 127.0.0.1 (:mod:`serve.graph.local_ray`). The
    cluster is not advertised as the machine's current Ray cluster: other processes'
    ``ray.init()`` do not join it.
    """

    def __init__(
        self, shape: ClusterShape, workers: Mapping[str, int], system_config: dict | None = None,
        dashboard_port: int = 8265,
    ) -> None:
        for type_name in workers:
            if shape.by_name(type_name) is shape.head:
                raise ConfigError(f"{type_name} is the head node type; list worker types only")
        self.shape = shape
        self.workers = dict(workers)
        self.system_config = system_config or {}
        self.dashboard_port = dashboard_port
        self.dashboard_url: str | None = None
        self.node_types: dict[str, str] = {}  # node id -> node type name
        self._cluster = None

    @staticmethod
    def _node_args(node_type: NodeType) -> dict[str, Any]:
        return {"num_cpus": node_type.cpus, "num_gpus": node_type.gpus, "resources": dict(node_type.resources)}

    def start(self) -> "LocalCluster":
        import ray
        from ray.cluster_utils import Cluster

        from serve.graph.local_ray import bind_ray_to_loopback, check_loopback, loopback_runtime_env

        bind_ray_to_loopback()  # every node's ports on 127.0.0.1, as `kandinsky-serve run`
        head_args = {
            **self._node_args(self.shape.head),
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": self.dashboard_port,
            "_system_config": self.system_config,
        }
        previous = _current_ray_address()
        self._cluster = Cluster(initialize_head=True, head_node_args=head_args)
        # Cluster() records its address as this machine's current Ray cluster, so any bare
        # ray.init() here (another test run, another user) would join it: put the record back.
        _restore_current_ray_address(previous)
        self.node_types[self._cluster.head_node.node_id] = self.shape.head.name
        for type_name, count in self.workers.items():
            for _ in range(count):
                self.add_node(type_name, wait=False)
        self._cluster.wait_for_nodes()
        context = ray.init(
            address=self._cluster.address, logging_level="WARNING", log_to_driver=False, runtime_env=loopback_runtime_env()
        )
        check_loopback()
        self.dashboard_url = f"http://{context.dashboard_url}" if context.dashboard_url else None
        return self

    @property
    def gcs_address(self) -> str | None:
        return self._cluster.gcs_address if self._cluster is not None else None

    def add_node(self, type_name: str, wait: bool = True):
        node = self._cluster.add_node(wait=wait, **self._node_args(self.shape.by_name(type_name)))
        self.node_types[node.node_id] = type_name
        return node

    def nodes(self, type_name: str) -> list:
        """The running worker nodes of a type (``ray._private.node.Node`` objects)."""
        return [node for node in self._cluster.worker_nodes if self.node_types[node.node_id] == type_name]

    def kill(self, node) -> None:
        """Kill every process of a worker node at once, as a lost machine would."""
        self._cluster.remove_node(node, allow_graceful=False)

    def shutdown(self) -> None:
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if self._cluster is not None:
            mine, previous = self.gcs_address, _current_ray_address()  # shutdown() deletes the record, whoever wrote it
            self._cluster.shutdown()
            self._cluster = None
            _restore_current_ray_address(previous if previous != mine else None)

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:
            self.shutdown()
            raise

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


def replica_nodes(app_name: str) -> dict[str, list[str]]:
    """Per deployment, the node id of each live replica (from Ray's state API)."""
    from ray.util.state import list_actors

    prefix = f"ServeReplica:{app_name}:"
    placement: dict[str, list[str]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False):
        if actor.class_name.startswith(prefix):
            placement.setdefault(actor.class_name[len(prefix):], []).append(actor.node_id)
    return placement


def placement_lines(cluster: LocalCluster, app_name: str) -> list[str]:
    """One line per deployment: how many replicas, on which node types (and node ids)."""
    lines = []
    for deployment, nodes in sorted(replica_nodes(app_name).items()):
        where = ", ".join(sorted(f"{cluster.node_types.get(node, '?')} ({node[:8]})" for node in nodes))
        lines.append(f"  {deployment:<12} {len(nodes)} replica(s) on {where}")
    return lines
