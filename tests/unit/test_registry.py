"""The stage registry is the one definition of the graph's stages: everything else agrees with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from deployments.loading import DECODER_21_LAYOUT, PRIOR_LAYOUT
from deployments.registry import (
    CHECKPOINTS,
    DEFAULT_FAMILY,
    FAMILIES,
    INGRESS_NAME,
    MODES,
    OPTIONAL_STAGES,
    STAGE_NAMES,
    STAGES,
    denoiser_of_mode,
    stage_for,
    understanding_stage,
)
from serve.graph.build import ModelPaths
from serve.settings import ModelSettings, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_each_entry_names_a_deployment_of_that_name_reading_its_checkpoints_subfolders(stage):
    from deployments.runtime import LoopReplica

    deployment = stage.load()
    # Another family's stage is the same deployment code, named by the graph builder.
    assert deployment.name == stage.name or stage.family != DEFAULT_FAMILY
    assert issubclass(deployment.func_or_class, LoopReplica) == stage.loop
    assert stage.path_field in ModelSettings.model_fields
    if stage.family is None:  # image understanding: one checkpoint directory, routes of its own
        assert stage.role == "understanding" and stage.optional and not stage.subfolders
        assert all(understanding_stage(mode) is stage for mode in stage.modes)
        assert not set(stage.modes) & set(MODES)
        return
    layout = PRIOR_LAYOUT if stage.checkpoint.startswith("prior") else DECODER_21_LAYOUT
    assert set(stage.subfolders) <= set(layout), f"{stage.name} reads folders its checkpoint layout lacks"
    assert stage.path_field in ModelSettings.model_fields
    assert set(stage.modes) <= set(FAMILIES[stage.family])


def test_checkpoints_modes_and_roles_are_covered_once():
    assert ModelPaths._fields == CHECKPOINTS
    assert len(set(STAGE_NAMES)) == len(STAGE_NAMES) and INGRESS_NAME not in STAGE_NAMES
    for mode in MODES:
        assert denoiser_of_mode(mode).role == "denoiser"
        for role in ("text_encoder", "prior", "movq"):
            assert mode in stage_for(role).modes
    assert {stage.variant for stage in STAGES if stage.role == "denoiser"} == {"text2img", "inpaint", "controlnet"}
    assert all(stage.role == "denoiser" for stage in OPTIONAL_STAGES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_has_every_role_for_each_of_its_modes(family):
    for mode in FAMILIES[family]:
        assert mode in denoiser_of_mode(mode, family).modes
        for role in ("text_encoder", "prior", "movq"):
            assert mode in stage_for(role, family=family).modes
    if family != DEFAULT_FAMILY:
        assert "controlnet" not in FAMILIES[family] and stage_for("decoder_text_encoder", family=family).modes == FAMILIES[family]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_deploys_registry_stages_only(path):
    config = load_config(path)
    assert set(config.deployment_options) <= {*STAGE_NAMES, INGRESS_NAME}


def test_cluster_config_places_each_stage_by_its_registry_resource():
    raw = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    deployments = {d["name"]: d for d in raw["applications"][0]["deployments"]}
    for stage in STAGES:
        if stage.family not in (DEFAULT_FAMILY, None) or (stage.family is None and stage.name not in deployments):
            continue  # an optional understanding stage may be left out (Kosmos2: commented out, too big for a node)  # listed only in configs that set its family's checkpoints (Serve refuses options for absent deployments)
        resources = deployments[stage.name]["ray_actor_options"].get("resources", {})
        assert stage.resource in resources, f"{stage.name} should ask for {stage.resource}"


def test_no_other_module_spells_a_stage_name():
    """Stage names are data of the registry: code elsewhere reads them from it."""
    spelled = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, (*STAGE_NAMES, INGRESS_NAME))))
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("serve", "deployments")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "registry.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if spelled.search(line)
    ]
    assert offenders == []
