from pathlib import Path

import pytest
import yaml

from deployments.registry import DEFAULT_FAMILY, INGRESS_NAME, STAGES
from serve.settings import ConfigError, ModelSettings, load_config, parse_service_settings

CONFIGS = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml"))
# What every deployment of a shipped config states explicitly (issue: scale, queue, health, shutdown).
SERVING_OPTIONS = (
    "autoscaling_config", "max_ongoing_requests", "max_queued_requests", "health_check_period_s",
    "health_check_timeout_s", "graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s",
)
AUTOSCALING_OPTIONS = ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s")


def test_configs_are_found():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "gpu.yaml", "cluster.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    """Ray's ServeDeploySchema, the project's settings models and cross-field rules (load_config)."""
    config = load_config(path)
    assert config.http_host == "127.0.0.1", "configs bind HTTP to localhost by default"
    default_family = {stage.name for stage in STAGES if stage.family == DEFAULT_FAMILY}
    understanding = {stage.name for stage in STAGES
                     if stage.family is None and getattr(config.service.models, stage.path_field) is not None}
    assert set(config.deployment_options) == {*default_family, *understanding, INGRESS_NAME}, \
        "configure every deployment of the graph, and each configured understanding stage"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_deployment_states_scaling_queueing_health_and_shutdown(path):
    config = load_config(path)
    for name, options in config.deployment_options.items():
        autoscaling = options.get("autoscaling_config") or {}
        missing = [key for key in SERVING_OPTIONS if key not in options]
        missing += [f"autoscaling_config.{key}" for key in AUTOSCALING_OPTIONS if key not in autoscaling]
        assert not missing, f"{path.name}: {name} does not set {missing}"
        assert options["max_queued_requests"] > 0, f"{path.name}: {name}: bound the queue (overflow gets 503)"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_scale_down_never_cuts_a_request_short(path):
    """An ingress replica holds a request for its whole life, up to the proxy's timeout."""
    config = load_config(path)
    timeout = config.raw["http_options"]["request_timeout_s"]
    assert config.deployment_options[INGRESS_NAME]["graceful_shutdown_timeout_s"] >= timeout


def test_local_config_runs_the_embedded_model_on_cpu():
    config = load_config(Path(__file__).parents[2] / "configs" / "local.yaml")
    assert config.service.models.prior_path is None and config.service.models.device == "cpu"
    assert config.app_name == "kandinsky"


def test_app_name_is_the_files_or_kandinsky(tmp_path):
    renamed = load_config(_write(tmp_path, lambda raw: raw["applications"][0].update(name="k2")))
    assert renamed.app_name == "k2"
    unnamed = load_config(_write(tmp_path, lambda raw: raw["applications"][0].pop("name")))
    assert unnamed.app_name == "kandinsky"


def _write(tmp_path, mutate):
    raw = yaml.safe_load((Path(__file__).parents[2] / "configs" / "local.yaml").read_text())
    mutate(raw)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda r: r["applications"][0]["args"]["models"].update(dtype="float16"), "needs a GPU"),
        (lambda r: r["applications"][0]["args"]["models"].update(prior_path="/x"), "set both prior_path and decoder_path"),
        (lambda r: r["applications"][0]["args"]["limits"].update(max_side=100), "args.limits.max_side"),
        (lambda r: r["applications"][0]["args"].update(typo=1), "args.typo"),
        (lambda r: r["applications"][0]["deployments"][3].update(max_ongoing_requests=2), "max_ongoing_requests: 2 is below"),
        (lambda r: r["applications"][0]["deployments"][3]["user_config"].update(max_batch_size=0), "user_config.max_batch_size"),
        (lambda r: r["applications"][0]["deployments"][3].update(name="Denoizer"), "unknown deployment 'Denoizer'"),
        (lambda r: r.update(http_options={"port": "eighty"}), "http_options.port"),
        (lambda r: r["applications"][0]["deployments"][0].update(max_ongoing_requests=140),
         "max_ongoing_requests: 140 leaves no room for probes, job reads and cancels"),
        (lambda r: r["applications"][0]["args"].setdefault("jobs", {}).update(max_streams=300),
         "raise it to at least 380 or lower those"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, mutate, expected):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert expected in str(error.value)
    assert str(path) in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_environment_overrides_paths(monkeypatch):
    monkeypatch.setenv("KANDINSKY_PRIOR_PATH", "/models/prior")
    monkeypatch.setenv("KANDINSKY_DECODER_PATH", "/models/decoder")
    settings = parse_service_settings({"models": {"prior_path": "/a", "decoder_path": "/b"}})
    assert settings.models.prior_path == Path("/models/prior")
    assert settings.models.decoder_path == Path("/models/decoder")


def test_environment_override_is_validated(monkeypatch):
    monkeypatch.setenv("KANDINSKY_PRIOR_PATH", "/models/prior")
    monkeypatch.delenv("KANDINSKY_DECODER_PATH", raising=False)
    with pytest.raises(ConfigError, match="set both prior_path and decoder_path"):
        parse_service_settings({})


def test_half_precision_on_gpu_is_fine():
    assert ModelSettings(device="cuda:1", dtype="bfloat16").dtype == "bfloat16"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_import_path_is_a_ray_app_builder(path):
    """Ray calls the import_path target with exactly one argument, the args dict."""
    import importlib
    import inspect

    module, name = load_config(path).raw["applications"][0]["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    assert len(inspect.signature(builder).parameters) == 1


def test_logging_config_is_read(tmp_path):
    path = _write(tmp_path, lambda r: r["applications"][0].update(logging_config={"encoding": "JSON"}))
    assert load_config(path).logging_config == {"encoding": "JSON"}


@pytest.mark.parametrize("require", [False, True])
def test_a_variant_deployment_without_its_checkpoint_is_left_out_unless_required(tmp_path, require):
    import yaml

    from serve.settings import ConfigError, load_config

    config = {
        "applications": [{
            "name": "k", "import_path": "serve.graph.build:build_app",
            "args": {"models": {"prior_path": "/p", "decoder_path": "/d", "require_variants": require}},
            "deployments": [{"name": "InpaintDenoiser", "num_replicas": 1}, {"name": "Denoiser", "num_replicas": 2}],
        }]
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    if require:
        with pytest.raises(ConfigError, match="InpaintDenoiser is listed but args.models.inpaint_decoder_path"):
            load_config(path)
        return
    loaded = load_config(path)
    assert set(loaded.deployment_options) == {"Denoiser"}
    assert "inpaint_decoder_path" in loaded.skipped_deployments["InpaintDenoiser"]
    assert "404 mode_not_configured" in loaded.skipped_deployments["InpaintDenoiser"]


def test_variant_paths_need_the_main_checkpoints():
    from serve.settings import ConfigError, parse_service_settings

    with pytest.raises(ConfigError, match="inpaint_decoder_path/controlnet_decoder_path need prior_path and decoder_path"):
        parse_service_settings({"models": {"inpaint_decoder_path": "/x"}})


def test_the_graph_deploys_only_configured_variants(tiny_checkpoint):
    from serve.graph.build import build_graph

    args = {"models": {
        "prior_path": str(tiny_checkpoint.prior),
        "decoder_path": str(tiny_checkpoint.decoder),
        "controlnet_decoder_path": str(tiny_checkpoint.controlnet_decoder),
    }}
    ingress = build_graph(args)._bound_deployment
    stages = {name for name, handle in ingress.init_kwargs.items() if handle is not None}
    assert stages == {"TextEncoder", "ImageEncoder", "Prior", "Denoiser", "ControlnetDenoiser", "MovqDecoder"}


def test_a_variant_with_a_different_movq_is_refused(tiny_checkpoint, tmp_path):
    import json
    import shutil

    from deployments.loading import CheckpointError
    from serve.graph.build import build_graph

    other = tmp_path / "inpaint"
    shutil.copytree(tiny_checkpoint.inpaint_decoder, other)
    config = json.loads((other / "movq" / "config.json").read_text())
    (other / "movq" / "config.json").write_text(json.dumps({**config, "latent_channels": 3}))
    args = {"models": {"prior_path": str(tiny_checkpoint.prior), "decoder_path": str(tiny_checkpoint.decoder),
                       "inpaint_decoder_path": str(other)}}
    with pytest.raises(CheckpointError, match="latent_channels=3 differs"):
        build_graph(args)


def test_default_image_side_is_the_models_own(tmp_path):
    """A request naming no size gets 64×64 from the embedded model (trained at 64) and 512 from checkpoints."""
    from serve.http.schemas import request_models

    embedded = parse_service_settings({})
    configured = parse_service_settings({"models": {"prior_path": str(tmp_path), "decoder_path": str(tmp_path)}})
    assert (embedded.limits.default_side, configured.limits.default_side) == (64, 512)
    assert parse_service_settings({"limits": {"max_side": 64}, "models": configured.models.model_dump(mode="json")}).limits.default_side == 64
    assert parse_service_settings({"limits": {"default_side": 128}}).limits.default_side == 128
    with pytest.raises(ConfigError, match="default_side=256 exceeds max_side=128"):
        parse_service_settings({"limits": {"default_side": 256, "max_side": 128}})
    text2img = request_models(embedded.limits)["text2img"].model_validate({"prompt": "a red circle"})
    assert (text2img.width, text2img.height) == (64, 64)


def test_the_shipped_local_config_starts_with_only_the_two_base_checkpoints(tiny_checkpoint, monkeypatch):
    """The README's "real checkpoints" path: set the prior and decoder, nothing else."""
    from deployments.registry import STAGES
    from serve.graph.build import build_graph
    from serve.graph.ingress import unavailable_modes

    for stage in STAGES:
        monkeypatch.delenv(stage.path_env, raising=False)
    monkeypatch.setenv("KANDINSKY_PRIOR_PATH", str(tiny_checkpoint.prior))
    monkeypatch.setenv("KANDINSKY_DECODER_PATH", str(tiny_checkpoint.decoder))
    config = load_config(Path(__file__).parents[2] / "configs" / "local.yaml")
    assert set(config.skipped_deployments) == {"InpaintDenoiser", "ControlnetDenoiser"}
    ingress = build_graph(config.raw["applications"][0].get("args"), config.deployment_options)._bound_deployment
    deployed = {name for name, handle in ingress.init_kwargs.items() if handle is not None}
    assert deployed == {"TextEncoder", "ImageEncoder", "Prior", "Denoiser", "MovqDecoder"}
    missing = unavailable_modes(deployed)
    assert set(missing) == {"inpaint", "controlnet"} and "inpaint_decoder_path" in missing["inpaint"]
