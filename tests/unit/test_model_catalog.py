"""``args.models`` as a list of named models, the shape the catalog is written in: each family's
model named in the config, fine-tuned priors, one default; refused with messages that say what to fix."""

from __future__ import annotations

import pytest
import yaml

from serve.http.catalog import ModelCatalog
from serve.settings import ConfigError, ModelSettings, load_config


def test_a_list_of_models_names_each_familys_model_its_priors_and_the_default(tmp_path):
    models = ModelSettings.model_validate([
        {"id": "k22", "family": "2.2", "prior_path": str(tmp_path / "p"), "decoder_path": str(tmp_path / "d"),
         "inpaint_decoder_path": str(tmp_path / "i")},
        {"id": "k21", "family": 2.1, "prior_path": str(tmp_path / "p21"), "decoder_path": str(tmp_path / "d21"),
         "default": True},
        {"id": "my-prior", "prior_path": str(tmp_path / "ft")},
    ])
    assert models.prior_path == tmp_path / "p" and models.inpaint_decoder_path == tmp_path / "i"
    assert models.prior_21_path == tmp_path / "p21" and models.decoder_21_path == tmp_path / "d21"
    assert [(p.id, p.family, p.path) for p in models.priors] == [("my-prior", "2.2", tmp_path / "ft")]
    assert models.model_ids() == ["k22", "k21", "my-prior"] and models.default_model_id() == "k21"
    catalog = ModelCatalog.serving(models.families(), None, models.default_model_id(),
                                   tuple((p.id, p.family) for p in models.priors), models.family_ids())
    assert catalog.ids == ["k22", "k21", "my-prior"] and catalog.resolve(None, "text2img").family == "2.1"
    assert catalog.resolve("my-prior", "controlnet").prior == "my-prior"


@pytest.mark.parametrize("entries, message", [
    ([{"id": "a", "prior_path": "/p", "decoder_path": "/d"}, {"id": "b", "prior_path": "/p", "decoder_path": "/d"}],
     "one decoder per family"),
    ([{"id": "a", "prior_path": "/p", "decoder_path": "/d", "default": True},
      {"id": "b", "prior_path": "/q", "default": True}], "at most one model may be the default"),
    ([{"id": "a", "family": "2.1", "prior_path": "/p", "decoder_path": "/d", "controlnet_decoder_path": "/c"}],
     "no ControlNet"),
    ([{"id": "a", "family": "2.1", "prior_path": "/p"}], "priors.0.family"),
    ([{"id": "kandinsky 2", "prior_path": "/p", "decoder_path": "/d"}], "id"),
])
def test_a_catalog_that_cannot_be_served_is_refused_saying_why(entries, message):
    with pytest.raises(ValueError, match=message):
        ModelSettings.model_validate(entries)


def test_a_config_file_with_a_model_list_loads_and_its_errors_name_the_field(tmp_path):
    def config(models) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"applications": [{"name": "k", "import_path": "serve.graph.build:build_app",
                                                          "args": {"models": models}}]}))
        return path

    loaded = load_config(config([{"id": "mine", "prior_path": str(tmp_path), "decoder_path": str(tmp_path)}]))
    assert loaded.service.models.model_ids() == ["mine"]
    with pytest.raises(ConfigError, match="args.models"):
        load_config(config([{"id": "mine", "prior_path": str(tmp_path), "decoder_path": str(tmp_path), "colour": 1}]))
    # The mapping form keeps working, and a catalog beside it must not set the same path twice.
    with pytest.raises(ValueError, match="set it in one place"):
        ModelSettings.model_validate({"prior_path": "/a", "decoder_path": "/b",
                                      "catalog": [{"id": "x", "prior_path": "/c", "decoder_path": "/d"}]})
