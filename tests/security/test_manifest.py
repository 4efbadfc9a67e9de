"""The KubeRay manifest is locked down (issue #28), both as rendered now and as checked in.

:func:`hardening_problems` reads a manifest the way a reviewer would and names every gap:
a container without the lock-down securityContext or without a writable /tmp, an image
not pinned by digest, API keys off or not read from a read-only 0400 Secret, a Secret in
the manifest, a NetworkPolicy that does not select every pod or lets in a peer it should
not. The mutation tests break one item at a time and expect it named, so each check is
shown to be able to fail. No Ray instance, no cluster.
"""

from __future__ import annotations

import copy
import json
import posixpath
from pathlib import Path

import pytest
import yaml

from deployments.registry import INGRESS_NAME
from serve.cli import main
from serve.settings import ConfigError, load_config
from serve.tools.cluster import IMAGE_DIGEST, ClusterShape, load_shape, pod_labels, render_rayservice

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs" / "cluster.yaml"
NODES = ROOT / "cluster" / "node-types.yaml"
MANIFEST = ROOT / "cluster" / "kuberay-rayservice.yaml"
NAME = "kandinsky"
SECRET = f"{NAME}-api-keys"
KEYS_ENV = "KANDINSKY_API_KEYS_FILE"


@pytest.fixture(scope="module")
def shape():
    return load_shape(NODES)


@pytest.fixture(scope="module")
def config():
    return load_config(CONFIG)


def _docs(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


@pytest.fixture(scope="module", params=["rendered", "checked-in"])
def docs(request, config, shape):
    if request.param == "rendered":
        return _docs(render_rayservice(config, shape))
    return _docs(MANIFEST.read_text())


# --- the checker ---------------------------------------------------------------------------


def _groups(rayservice: dict) -> list[tuple[str, dict]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"])] + [
        (f"worker group {group['groupName']}", group) for group in cluster.get("workerGroupSpecs", [])
    ]


def _group_resources(group: dict) -> dict:
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def _security_problems(where: str, context: dict | None, pod: dict) -> list[str]:
    context = context or {}

    def value(key):  # a container's own setting wins over the pod's
        return context.get(key, pod.get(key))

    problems = []
    if value("runAsNonRoot") is not True:
        problems.append(f"{where}: runAsNonRoot is not true")
    uid = value("runAsUser")
    if not isinstance(uid, int) or uid <= 0:
        problems.append(f"{where}: runAsUser {uid!r} is not a non-root uid")
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem is not true")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if context.get("privileged"):
        problems.append(f"{where}: privileged")
    capabilities = context.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append(f"{where}: capabilities do not drop ALL")
    if capabilities.get("add"):
        problems.append(f"{where}: capabilities add {capabilities['add']}")
    if (value("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: seccompProfile is not RuntimeDefault")
    return problems


def _image_problem(where: str, image: str | None) -> list[str]:
    return [] if image and IMAGE_DIGEST.match(image) else [f"{where}: image {image!r} is not pinned by digest"]


def _writable_tmp(where: str, mounts: list[dict], volumes: dict[str, dict]) -> list[str]:
    for mount in mounts:
        if mount.get("mountPath") == "/tmp" and not mount.get("readOnly") and "emptyDir" in volumes.get(mount["name"], {}):
            return []
    return [f"{where}: no writable emptyDir at /tmp (Ray's temp dir, under a read-only root filesystem)"]


def _ingress_groups(rayservice: dict, serve_config: dict) -> list[str]:
    """The groups whose pods may run the Ingress: those offering every custom resource it asks for."""
    asked = {}
    for app in serve_config["applications"]:
        for deployment in app.get("deployments", []):
            if deployment["name"] == INGRESS_NAME:
                asked = (deployment.get("ray_actor_options") or {}).get("resources") or {}
    return [
        where for where, group in _groups(rayservice)
        if not asked or set(asked) <= set(_group_resources(group))
    ]


def _auth_problems(rayservice: dict) -> list[str]:
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    problems, keys_files = [], set()
    for app in serve_config["applications"]:
        keys_file = ((app.get("args") or {}).get("auth") or {}).get("api_keys_file")
        if not keys_file:
            problems.append(f"serveConfigV2: application {app['name']}: auth.api_keys_file is not set (API keys off)")
        else:
            keys_files.add(keys_file)
    ingress_groups = _ingress_groups(rayservice, serve_config)
    for where, group in _groups(rayservice):
        spec = group["template"]["spec"]
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for container in spec["containers"]:
            for env in container.get("env") or []:
                if env.get("name") == KEYS_ENV:
                    problems.append(f"{where}: {container['name']}: ${KEYS_ENV} overrides auth.api_keys_file")
            if where not in ingress_groups:
                continue
            for keys_file in keys_files:
                directory, file_name = posixpath.split(keys_file)
                mount = next((m for m in container.get("volumeMounts", []) if m.get("mountPath") == directory), None)
                if mount is None:
                    problems.append(f"{where}: {container['name']}: nothing mounted at {directory} (the keys file {keys_file})")
                    continue
                if mount.get("readOnly") is not True:
                    problems.append(f"{where}: the API keys volume is not mounted read-only")
                secret = volumes.get(mount["name"], {}).get("secret")
                if secret is None:
                    problems.append(f"{where}: the keys file is not from a Secret")
                    continue
                if secret.get("secretName") != SECRET:
                    problems.append(f"{where}: the keys Secret is {secret.get('secretName')!r}, not {SECRET!r}")
                if secret.get("defaultMode") != 0o400:
                    problems.append(f"{where}: the keys Secret's defaultMode is {secret.get('defaultMode')!r}, not 0400")
                items = secret.get("items") or [{"key": file_name, "path": file_name}]
                if any(item.get("mode") not in (None, 0o400) for item in items):
                    problems.append(f"{where}: a keys Secret item is not mode 0400")
                if not any(item.get("path") == file_name for item in items):
                    problems.append(f"{where}: the keys Secret does not provide {file_name}")
    return problems


def _network_problems(policies: list[dict], rayservice: dict, shape: ClusterShape) -> list[str]:
    if len(policies) != 1:
        return [f"{len(policies)} NetworkPolicies, expected one"]
    policy = policies[0]
    problems = []
    if policy.get("apiVersion") != "networking.k8s.io/v1":
        problems.append(f"NetworkPolicy apiVersion {policy.get('apiVersion')!r}")
    spec = policy["spec"]
    selected = (spec.get("podSelector") or {}).get("matchLabels") or {}
    if not selected:
        problems.append("NetworkPolicy selects no labels")
    for where, group in _groups(rayservice):
        labels = (group["template"].get("metadata") or {}).get("labels") or {}
        if not selected.items() <= labels.items():
            problems.append(f"NetworkPolicy does not select the {where} pods (labels {labels})")
    if "Ingress" not in (spec.get("policyTypes") or []):
        problems.append("NetworkPolicy policyTypes lack Ingress")

    k8s = shape.kubernetes
    serve_port = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["http_options"]["port"]
    allowed = {  # the one peer outside the Ray pods that may reach each port
        serve_port: ("the ingress controller", k8s.ingress_from.peer()),
        8265: ("the KubeRay operator", k8s.operator_from.peer()),
        8080: ("Prometheus", k8s.metrics_from.peer()),
    }
    reached = {port: False for port in allowed}
    ray_peers_admitted = False
    for number, rule in enumerate(spec.get("ingress") or []):
        peers = rule.get("from") or []
        if not peers:
            problems.append(f"NetworkPolicy ingress rule {number} has no `from`: it admits every pod and address")
        ports = [port.get("port") for port in rule.get("ports") or []]
        for peer in peers:
            if "ipBlock" in peer:
                problems.append(f"NetworkPolicy ingress rule {number} admits an ipBlock")
                continue
            peer_labels = (peer.get("podSelector") or {}).get("matchLabels") or {}
            if "namespaceSelector" not in peer and peer_labels and peer_labels.items() >= selected.items() and selected:
                ray_peers_admitted = True  # the Ray pods themselves: every Ray port
                continue
            if not ports:
                problems.append(f"NetworkPolicy ingress rule {number} admits {peer} on every port")
            for port in ports:
                if port not in allowed:
                    problems.append(f"NetworkPolicy ingress rule {number} admits {peer} on port {port}")
                elif peer != allowed[port][1]:
                    problems.append(f"NetworkPolicy ingress rule {number}: port {port} is for {allowed[port][0]} only, not {peer}")
                else:
                    reached[port] = True
    if not ray_peers_admitted:
        problems.append("NetworkPolicy does not let the Ray pods reach each other")
    problems += [f"NetworkPolicy: {allowed[port][0]} cannot reach port {port}" for port, ok in reached.items() if not ok]
    return problems


def hardening_problems(docs: list[dict], shape: ClusterShape) -> list[str]:
    kinds = [doc.get("kind") for doc in docs]
    problems = [f"the manifest holds a {kind}" for kind in kinds if kind == "Secret"]
    services = [doc for doc in docs if doc.get("kind") == "RayService"]
    if len(services) != 1:
        return problems + [f"{len(services)} RayServices, expected one"]
    rayservice = services[0]
    cluster = rayservice["spec"]["rayClusterConfig"]
    if cluster.get("authOptions") != {"mode": "token"}:
        problems.append("Ray token authentication is off")
    for where, group in _groups(rayservice):
        spec = group["template"]["spec"]
        pod_context = spec.get("securityContext") or {}
        # The pod's own: they cover the containers KubeRay adds (init containers).
        if pod_context.get("runAsNonRoot") is not True:
            problems.append(f"{where} pod: runAsNonRoot is not true")
        if (pod_context.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where} pod: seccompProfile is not RuntimeDefault")
        if not pod_context.get("fsGroup"):
            problems.append(f"{where} pod: no fsGroup (a non-root process could not read a 0400 Secret file)")
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for container in spec.get("initContainers", []) + spec["containers"]:
            where_c = f"{where}: {container['name']}"
            problems += _security_problems(where_c, container.get("securityContext"), pod_context)
            problems += _image_problem(where_c, container.get("image"))
            if container in spec["containers"]:
                problems += _writable_tmp(where_c, container.get("volumeMounts", []), volumes)
    if cluster.get("enableInTreeAutoscaling"):
        autoscaler = cluster.get("autoscalerOptions") or {}
        head_spec = cluster["headGroupSpec"]["template"]["spec"]
        head_pod_context = head_spec.get("securityContext") or {}
        problems += _security_problems("autoscaler", autoscaler.get("securityContext"), head_pod_context)
        if "image" in autoscaler:
            problems += _image_problem("autoscaler", autoscaler["image"])
        head_volumes = {volume["name"]: volume for volume in head_spec.get("volumes", [])}
        problems += _writable_tmp("autoscaler", autoscaler.get("volumeMounts", []), head_volumes)
    problems += _auth_problems(rayservice)
    policies = [doc for doc in docs if doc.get("kind") == "NetworkPolicy"]
    problems += _network_problems(policies, rayservice, shape)
    return problems


# --- the manifest passes -------------------------------------------------------------------


def test_manifest_is_hardened(docs, shape):
    assert hardening_problems(docs, shape) == []


def test_manifest_is_a_rayservice_and_its_network_policy(docs):
    assert [(doc["apiVersion"], doc["kind"]) for doc in docs] == [("ray.io/v1", "RayService"), ("networking.k8s.io/v1", "NetworkPolicy")]


def test_checked_in_image_is_a_placeholder_digest(shape):
    """Operators replace it (docs/configuration-and-cluster.md, "KubeRay"); it must still be a digest."""
    assert IMAGE_DIGEST.match(shape.image), shape.image
    assert shape.image.endswith("@sha256:" + "0" * 64), "the checked-in digest is a placeholder: keep real ones out of the repo"
    images = {c["image"] for doc in _docs(MANIFEST.read_text()) if doc["kind"] == "RayService"
              for _, group in _groups(doc) for c in group["template"]["spec"]["containers"]}
    assert images == {shape.image}


def test_keys_are_mounted_only_where_the_ingress_runs(docs, shape):
    rayservice = docs[0]
    mounted = {
        where for where, group in _groups(rayservice)
        if any(v.get("secret") for v in group["template"]["spec"]["volumes"])
    }
    assert mounted == {"head"}, "configs/cluster.yaml puts the Ingress on the head only"


# --- each check can fail -------------------------------------------------------------------


def _head(docs):
    return docs[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]


def _worker(docs, index=0):
    return docs[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][index]["template"]["spec"]


def _head_volume(docs, name):
    return next(v for v in _head(docs)["volumes"] if v["name"] == name)


def _policy(docs):
    return docs[1]["spec"]


def _set_serve_config(docs, change):
    serve_config = yaml.safe_load(docs[0]["spec"]["serveConfigV2"])
    change(serve_config)
    docs[0]["spec"]["serveConfigV2"] = yaml.safe_dump(serve_config)


MUTATIONS = {
    "root user": (lambda d: _worker(d)["containers"][0]["securityContext"].update(runAsUser=0), "runAsUser 0"),
    "root allowed": (lambda d: [_worker(d)["containers"][0]["securityContext"].pop("runAsNonRoot"),
                                _worker(d)["securityContext"].pop("runAsNonRoot")], "runAsNonRoot is not true"),
    "writable root": (lambda d: _head(d)["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
                      "head: ray-head: readOnlyRootFilesystem"),
    "escalation": (lambda d: _worker(d, 1)["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
                   "allowPrivilegeEscalation"),
    "privileged": (lambda d: _worker(d)["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    "capabilities kept": (lambda d: _head(d)["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
                          "do not drop ALL"),
    "capability added": (lambda d: _head(d)["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
                         "capabilities add"),
    "no seccomp": (lambda d: [_worker(d)["containers"][0]["securityContext"].pop("seccompProfile"),
                              _worker(d)["securityContext"].pop("seccompProfile")], "seccompProfile"),
    "pod may run as root": (lambda d: _head(d)["securityContext"].pop("runAsNonRoot"), "head pod: runAsNonRoot"),
    "no fsGroup": (lambda d: _head(d)["securityContext"].pop("fsGroup"), "head pod: no fsGroup"),
    "container without securityContext": (lambda d: _worker(d, 1)["containers"][0].pop("securityContext"),
                                          "worker group denoiser-gpu: ray-worker: readOnlyRootFilesystem"),
    "sidecar without securityContext": (lambda d: _worker(d)["containers"].append({"name": "sidecar", "image": "busybox"}),
                                        "sidecar: readOnlyRootFilesystem"),
    "autoscaler unlocked": (lambda d: d[0]["spec"]["rayClusterConfig"]["autoscalerOptions"].pop("securityContext"),
                            "autoscaler: readOnlyRootFilesystem"),
    "no writable tmp": (lambda d: [m for m in _worker(d)["containers"][0]["volumeMounts"] if m["name"] == "tmp"][0].update(mountPath="/scratch"),
                        "no writable emptyDir at /tmp"),
    "image by tag": (lambda d: _worker(d)["containers"][0].update(image="rayproject/ray:2.60.0-py311-gpu"), "not pinned by digest"),
    "short digest": (lambda d: _head(d)["containers"][0].update(image="repo/kandinsky@sha256:abc"), "not pinned by digest"),
    "no token auth": (lambda d: d[0]["spec"]["rayClusterConfig"].pop("authOptions"), "token authentication is off"),
    "api keys off": (lambda d: _set_serve_config(d, lambda c: c["applications"][0]["args"].pop("auth")), "API keys off"),
    "keys env override": (lambda d: _head(d)["containers"][0]["env"].append({"name": KEYS_ENV, "value": "/tmp/k.yaml"}),
                          "overrides auth.api_keys_file"),
    "keys not mounted": (lambda d: _head(d)["containers"][0].update(
        volumeMounts=[m for m in _head(d)["containers"][0]["volumeMounts"] if m["name"] != "api-keys"]), "nothing mounted at"),
    "keys writable": (lambda d: [m for m in _head(d)["containers"][0]["volumeMounts"] if m["name"] == "api-keys"][0].pop("readOnly"),
                      "not mounted read-only"),
    "keys mode 0444": (lambda d: _head_volume(d, "api-keys")["secret"].update(defaultMode=0o444), "not 0400"),
    "keys item mode": (lambda d: _head_volume(d, "api-keys")["secret"]["items"][0].update(mode=0o644), "item is not mode 0400"),
    "keys from another secret": (lambda d: _head_volume(d, "api-keys")["secret"].update(secretName="other"), "not 'kandinsky-api-keys'"),
    "keys not from a secret": (lambda d: _head_volume(d, "api-keys").update(secret=None, emptyDir={}), "not from a Secret"),
    "secret in manifest": (lambda d: d.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}}),
                           "holds a Secret"),
    "no network policy": (lambda d: d.pop(1), "0 NetworkPolicies"),
    "policy misses pods": (lambda d: _policy(d)["podSelector"]["matchLabels"].update({"app.kubernetes.io/instance": "other"}),
                           "does not select the head pods"),
    "egress only": (lambda d: _policy(d).update(policyTypes=["Egress"]), "lack Ingress"),
    "open rule": (lambda d: _policy(d)["ingress"].append({}), "admits every pod"),
    "serve port from anywhere": (lambda d: _policy(d)["ingress"][1].pop("from"), "admits every pod"),
    "serve port from any namespace": (lambda d: _policy(d)["ingress"][1]["from"][0].update(namespaceSelector={}),
                                      "port 8000 is for the ingress controller only"),
    "gcs to prometheus": (lambda d: _policy(d)["ingress"][3]["ports"].append({"protocol": "TCP", "port": 6379}), "on port 6379"),
    "every port to the operator": (lambda d: _policy(d)["ingress"][2].pop("ports"), "on every port"),
    "ip block": (lambda d: _policy(d)["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}), "ipBlock"),
    "ray pods cut off": (lambda d: _policy(d)["ingress"].pop(0), "Ray pods reach each other"),
    "ingress cut off": (lambda d: _policy(d)["ingress"].pop(1), "ingress controller cannot reach port 8000"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_each_hardening_check_can_fail(mutation, config, shape):
    docs = _docs(render_rayservice(config, shape))
    mutate, expected = MUTATIONS[mutation]
    mutate(docs)
    problems = hardening_problems(docs, shape)
    assert any(expected in problem for problem in problems), problems


# --- the render refuses what it cannot lock down -------------------------------------------


def _nodes_file(tmp_path, change) -> Path:
    raw = yaml.safe_load(NODES.read_text())
    change(raw)
    path = tmp_path / "node-types.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_render_refuses_an_image_without_a_digest(tmp_path, capsys):
    nodes = _nodes_file(tmp_path, lambda raw: raw.update(image="rayproject/ray:2.60.0-py311-gpu"))
    out = tmp_path / "out.yaml"
    assert main(["cluster", "render", "--nodes", str(nodes), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{nodes}: image: 'rayproject/ray:2.60.0-py311-gpu' is not pinned by digest" in err
    assert "--allow-unpinned-image" in err and not out.exists()


def test_allow_unpinned_image_renders_with_a_warning(tmp_path, shape):
    nodes = _nodes_file(tmp_path, lambda raw: raw.update(image="rayproject/ray:2.60.0-py311-gpu"))
    out = tmp_path / "out.yaml"
    assert main(["cluster", "render", "--nodes", str(nodes), "-o", str(out), "--allow-unpinned-image"]) == 0
    text = out.read_text()
    assert "WARNING: rendered with --allow-unpinned-image" in text
    problems = hardening_problems(_docs(text), shape)
    assert problems and all("not pinned by digest" in p for p in problems), problems


def test_network_peers_and_secret_come_from_the_node_types_file(tmp_path, config):
    def change(raw):
        raw["kubernetes"].update(
            api_keys_secret="team-keys",
            ingress_from={"namespace": {"team": "edge"}, "pods": {"app": "envoy"}},
        )

    shape = load_shape(_nodes_file(tmp_path, change))
    docs = _docs(render_rayservice(config, shape, name="gen"))
    volume = next(v for v in docs[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "team-keys"
    policy = docs[1]
    assert policy["metadata"]["name"] == "gen-ray" and policy["spec"]["podSelector"]["matchLabels"] == pod_labels("gen")
    serve_rule = next(rule for rule in policy["spec"]["ingress"] if rule.get("ports") == [{"protocol": "TCP", "port": 8000}])
    assert serve_rule["from"] == [{"namespaceSelector": {"matchLabels": {"team": "edge"}}, "podSelector": {"matchLabels": {"app": "envoy"}}}]


@pytest.mark.parametrize("change,field", [
    (lambda k: k.update(run_as_user=0), "kubernetes.run_as_user"),
    (lambda k: k.update(metrics_from={"namespace": {}, "pods": {"app": "prometheus"}}), "kubernetes.metrics_from.namespace"),
    (lambda k: k.update(api_keys_secret="Not_A_Name"), "kubernetes.api_keys_secret"),
])
def test_bad_kubernetes_settings_name_the_field(tmp_path, change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_shape(_nodes_file(tmp_path, lambda raw: change(raw["kubernetes"])))


def test_render_leaves_the_config_alone(config, shape):
    before = copy.deepcopy(config.raw)
    render_rayservice(config, shape)
    assert config.raw == before
