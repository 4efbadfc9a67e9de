"""The Dockerfile (no Docker here: its commands are read, not run) and ``cluster render``'s
image and ``runtime_env`` options. No Ray instance."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from serve.cli import main
from serve.tools.cluster import load_shape

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "ghcr.io/example/kandinsky-serve@sha256:" + "ab" * 32


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def args() -> dict[str, str]:
    return dict(value.split("=", 1) for kind, value in instructions() if kind == "ARG" and "=" in value)


def ignored(path: str) -> bool:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return any(fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/") for pattern in patterns)


def test_every_copied_path_exists_and_is_in_the_build_context():
    copies = [shlex.split(value) for kind, value in instructions() if kind == "COPY"]
    assert copies
    for *sources, _destination in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert not ignored(source), f"COPY {source}: excluded by .dockerignore"


def test_the_image_holds_the_package_its_model_and_the_config_it_runs():
    copied = {source for kind, value in instructions() if kind == "COPY" for source in shlex.split(value)[:-1]}
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r'include = \[(.*?)\]', pyproject).group(1)
    for package in {name.split(".")[0] for name in re.findall(r'"([\w.*]+)"', packages)}:
        assert package in copied, f"pip install . needs {package}/"
    assert {"pyproject.toml", "README.md"} <= copied  # the build backend reads both
    runs = " ".join(value for kind, value in instructions() if kind == "RUN")
    assert "pip install" in runs and re.search(r"pip install [^&]*\s\.(\s|$)", runs)
    for module in re.findall(r"\b(?:from|import) (serve[\w.]*)", runs):  # what the build's check imports
        assert importlib.util.find_spec(module) is not None, module
    assert (ROOT / "serve" / "embedded" / "prior" / "model_index.json").exists()
    command = shlex.split(next(value for kind, value in instructions() if kind == "CMD").replace('"', "'"))
    config = next(part for part in command if part.startswith("configs/") or "configs/" in part).strip("[],'")
    assert (ROOT / config).exists() and "configs" in copied


def test_runs_as_a_non_root_user_with_a_readiness_healthcheck():
    users = [value.split(":")[0] for kind, value in instructions() if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    uid = int(users[-1])
    assert uid == load_shape(ROOT / "cluster" / "node-types.yaml").kubernetes.run_as_user  # what the pods run as
    healthcheck = next(value for kind, value in instructions() if kind == "HEALTHCHECK")
    assert "/readyz" in healthcheck and "8000" in healthcheck
    assert [kind for kind, _ in instructions()].index("USER") < [kind for kind, _ in instructions()].index("CMD")


def test_versions_follow_the_makefile_and_the_cluster():
    pinned = args()
    makefile_torch = re.search(r"TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert pinned["TORCH_VERSION"] == makefile_torch
    assert pinned["RAY_VERSION"] == load_shape(ROOT / "cluster" / "node-types.yaml").ray_version
    assert pinned["CUDA"] == '""', "CPU by default"


def render(tmp_path, *options: str) -> list[dict]:
    out = tmp_path / "manifest.yaml"
    assert main(["cluster", "render", "-o", str(out), *options]) == 0
    return list(yaml.safe_load_all(out.read_text()))


def images(service: dict) -> set[str]:
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"])]
    return {container["image"] for pod in pods for container in pod["spec"]["containers"]}


def test_render_takes_the_image_from_the_node_types_file_or_image(tmp_path):
    service, _ = render(tmp_path)
    assert images(service) == {load_shape(ROOT / "cluster" / "node-types.yaml").image}
    service, _ = render(tmp_path, "--image", IMAGE)
    assert images(service) == {IMAGE}
    assert "runtime_env" not in service["spec"]["serveConfigV2"]


def test_render_refuses_an_unpinned_image_given_on_the_command_line(tmp_path, capsys):
    assert main(["cluster", "render", "-o", str(tmp_path / "m.yaml"), "--image", "kandinsky-serve:latest"]) == 2
    assert "'kandinsky-serve:latest' is not pinned by digest" in capsys.readouterr().err


def test_render_adds_a_runtime_env_that_installs_the_package(tmp_path):
    wheel = "kandinsky-serve @ https://example.com/kandinsky_serve-0.1.0-py3-none-any.whl"
    service, _ = render(tmp_path, "--runtime-env", f'{{"pip": ["{wheel}"], "env_vars": {{"HF_HUB_OFFLINE": "1"}}}}')
    applications = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert [app["runtime_env"] for app in applications] == [{"pip": [wheel], "env_vars": {"HF_HUB_OFFLINE": "1"}}]


@pytest.mark.parametrize("runtime_env, expected", [
    ("{}", "needs pip requirements or a working_dir"),
    ('{"working_dir": "/home/me/src"}', "--runtime-env: working_dir"),
    ('{"pip": ["x"], "conda": "env"}', "--runtime-env: conda"),
    ("not json", "--runtime-env"),
])
def test_render_names_a_bad_runtime_env(tmp_path, capsys, runtime_env, expected):
    assert main(["cluster", "render", "-o", str(tmp_path / "m.yaml"), "--runtime-env", runtime_env]) == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "m.yaml").exists()
