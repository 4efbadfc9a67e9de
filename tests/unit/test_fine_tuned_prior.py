"""Fine-tuned priors as models of their own: the same pipeline with the prior's weights swapped,
at parity with diffusers' prior pipeline on that directory, and refused when they would not fit."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from deployments.loading import CheckpointError
from serve.graph.build import ModelPaths, fine_tuned_priors
from serve.http.catalog import ModelCatalog
from serve.settings import ModelSettings
from serve.graph.local import LocalCalls
from tests.reference import MAX_PIXEL_DIFF, max_diff, reference_images, spec


@pytest.fixture(scope="module")
def local(tiny_checkpoint, tiny_finetuned_prior):
    return LocalCalls(tiny_checkpoint, fine_tuned={"tuned": tiny_finetuned_prior})


@pytest.mark.parametrize("overrides", [{}, {"negative_prompt": "blue", "seeds": (3, 4)}])
def test_a_fine_tuned_prior_matches_diffusers_prior_pipeline_on_its_directory(local, tiny_checkpoint, tiny_finetuned_prior,
                                                                              overrides):
    s = spec(**overrides)
    ours = local.generate(replace(s, prior_model="tuned"))
    reference = reference_images((tiny_finetuned_prior, *tiny_checkpoint[1:]), s)
    for mine, theirs in zip(ours, reference, strict=True):
        assert max_diff(mine, theirs) <= MAX_PIXEL_DIFF
    base = local.generate(s)
    assert max_diff(ours[0], base[0]) > 10  # its own weights, not the family's prior


def test_a_fine_tuned_prior_is_a_model_of_its_family():
    catalog = ModelCatalog.serving(("2.2",), priors=(("tuned", "2.2"),))
    served = catalog.resolve("tuned", "variations")
    applied = served.apply(spec())
    assert (applied.model, applied.family, applied.prior_model) == ("tuned", "2.2", "tuned")
    assert catalog.resolve(None, "text2img").apply(spec()).prior_model == ""


def test_settings_refuse_clashing_ids_and_unserved_families(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        ModelSettings(priors=[{"id": "kandinsky-2-2", "path": str(tmp_path)}])
    with pytest.raises(ValueError, match="unique"):
        ModelSettings(priors=[{"id": "a", "path": str(tmp_path)}, {"id": "a", "path": str(tmp_path)}])
    with pytest.raises(ValueError, match="priors.0.family"):
        ModelSettings(priors=[{"id": "a", "family": "2.1", "path": str(tmp_path)}])
    assert ModelSettings(priors=[{"id": "a", "path": str(tmp_path)}], default_model="a").default_model_id() == "a"


def test_a_fine_tuned_prior_with_other_clip_encoders_is_refused(tiny_checkpoint, tiny_finetuned_prior, tmp_path):
    paths = ModelPaths(*tiny_checkpoint)
    ok = ModelSettings(prior_path=tiny_checkpoint.prior, decoder_path=tiny_checkpoint.decoder,
                       priors=[{"id": "tuned", "path": str(tiny_finetuned_prior)}])
    assert fine_tuned_priors(ok, paths) == {"2.2": {"tuned": str(tiny_finetuned_prior)}}
    other = tmp_path / "other"
    shutil.copytree(tiny_finetuned_prior, other)
    config = json.loads((other / "text_encoder" / "config.json").read_text())
    config["num_hidden_layers"] = config.get("num_hidden_layers", 1) + 1
    (other / "text_encoder" / "config.json").write_text(json.dumps(config))
    bad = ok.model_copy(update={"priors": [ok.priors[0].model_copy(update={"path": other})]})
    with pytest.raises(CheckpointError, match="must keep its family's CLIP encoders"):
        fine_tuned_priors(bad, paths)
