"""The graph, wired in one place: the stages behind one HTTP ingress.

``build_app`` is the ``import_path`` target of every file in ``configs/``
(``serve.graph.build:build_app``); Ray passes it the application's ``args``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from ray.serve import Application

from deployments.loading import DECODER_21_LAYOUT, DECODER_LAYOUT, PRIOR_LAYOUT, CheckpointError, check_layout
from deployments.registry import BY_NAME, DEFAULT_FAMILY, GENERATION_STAGES, UNDERSTANDING_STAGES
from serve.graph.ingress import Ingress
from serve.settings import ModelSettings, ServiceSettings, default_cache_dir, parse_service_settings


class ModelPaths(NamedTuple):
    """One directory per checkpoint of the stage registry (``Stage.checkpoint``); None: not configured."""

    prior: Path
    decoder: Path
    inpaint_decoder: Path | None
    controlnet_decoder: Path | None
    prior_21: Path | None = None
    decoder_21: Path | None = None
    inpaint_decoder_21: Path | None = None


def resolve_model_paths(models: ModelSettings) -> ModelPaths:
    """The configured checkpoints, checked; or the embedded trained tiny model (its decoder
    variants derived from the shipped decoder on first use)."""
    family_21 = _family_21_paths(models)
    if models.prior_path is None:
        from serve.embedded import embedded_checkpoint

        return ModelPaths(*embedded_checkpoint(models.embedded_dir or default_cache_dir()), *family_21)

    prior = check_layout(models.prior_path, PRIOR_LAYOUT, "prior")
    decoder = check_layout(models.decoder_path, DECODER_LAYOUT, "decoder")
    return ModelPaths(
        prior,
        decoder,
        _variant(decoder, models.inpaint_decoder_path, "decoder-inpaint"),
        _variant(decoder, models.controlnet_decoder_path, "controlnet-depth"),
        *family_21,
    )


def _family_21_paths(models: ModelSettings) -> tuple[Path | None, Path | None, Path | None]:
    """Kandinsky 2.1's prior, decoder and inpainting decoder, checked; Nones when 2.1 is not configured."""
    if models.decoder_21_path is None:
        return None, None, None
    prior = check_layout(models.prior_21_path, PRIOR_LAYOUT, "prior")
    decoder = check_layout(models.decoder_21_path, DECODER_21_LAYOUT, "decoder")
    inpaint = _variant(decoder, models.inpaint_decoder_21_path, "decoder-inpaint", DECODER_21_LAYOUT)
    return prior, decoder, inpaint


def _variant(decoder: Path, path: Path | None, what: str, layout: dict = DECODER_LAYOUT) -> Path | None:
    """A decoder variant's checkpoint, checked: its latents are decoded by ``decoder``'s MOVQ, so the two must agree."""
    if path is None:
        return None
    root = check_layout(path, layout, what)
    ours, theirs = (json.loads((p / "movq" / "config.json").read_text()) for p in (decoder, root))
    for key in ("latent_channels", "block_out_channels"):
        if ours.get(key) != theirs.get(key):
            raise CheckpointError(
                f"{root}/movq/config.json {key}={theirs.get(key)} differs from {decoder}/movq's {ours.get(key)}; "
                f"the {what} decoder must share the decoder's MOVQ"
            )
    return root


def fine_tuned_priors(models: ModelSettings, paths: ModelPaths) -> dict[str, dict[str, str]]:
    """Per family, its fine-tuned priors ``{id: directory}``, checked: each in the prior layout,
    with its family's own CLIP encoders (the family's encoder stages serve them)."""
    by_family: dict[str, dict[str, str]] = {}
    for index, prior in enumerate(models.priors):
        root = check_layout(prior.path, PRIOR_LAYOUT, "prior")
        base = paths.prior if prior.family == DEFAULT_FAMILY else paths.prior_21
        for part in ("text_encoder", "image_encoder"):
            ours, theirs = (json.loads((p / part / "config.json").read_text()) for p in (base, root))
            if {k: v for k, v in ours.items() if not k.startswith("_")} != {k: v for k, v in theirs.items() if not k.startswith("_")}:
                raise CheckpointError(
                    f"args.models.priors.{index} ({prior.id}): {root}/{part} differs from {base}/{part}; a fine-tuned "
                    f"prior must keep its family's CLIP encoders (kandinsky-serve train prior keeps them)"
                )
        by_family.setdefault(prior.family, {})[prior.id] = str(root)
    return by_family


def understanding_paths(models: ModelSettings) -> dict[str, Path]:
    """Each configured image-understanding stage's checkpoint, checked (by stage name)."""
    from deployments.florence2 import check_florence2_layout
    from deployments.kosmos2 import check_kosmos2_layout

    checks = {"florence2": check_florence2_layout, "kosmos2": check_kosmos2_layout}
    paths = {}
    for stage in UNDERSTANDING_STAGES:
        path = getattr(models, stage.path_field)
        if path is not None:
            paths[stage.name] = checks[stage.checkpoint](path)
    return paths


def stage_runtime(settings: ServiceSettings, name: str) -> dict[str, Any]:
    """The keyword arguments every stage's ``__init__`` takes for where and how its model runs:
    ``device``, its own ``dtype`` and (for the generation stages) ``options``, from ``args.performance``."""
    from deployments.performance import ModelOptions

    resolved = settings.performance.resolve(name, settings.models.dtype)
    runtime: dict[str, Any] = {"device": settings.models.device, "dtype": resolved.dtype}
    if BY_NAME[name].family is not None:
        runtime["options"] = ModelOptions(
            attention=resolved.attention, channels_last=resolved.channels_last, compile=resolved.compile,
            compile_mode=resolved.compile_mode, batch_buckets=tuple(resolved.batch_buckets), decode_chunk=resolved.decode_chunk)
    return runtime


def build_app(args: dict[str, Any]) -> Application:
    """The ``import_path`` target: Ray calls it with the application's ``args`` and
    applies the config's ``deployments`` section itself."""
    return build_graph(args)


def build_graph(args: dict[str, Any] | None = None, deployment_options: dict[str, dict[str, Any]] | None = None) -> Application:
    """Validate the settings, resolve the checkpoints and bind the graph.

    ``deployment_options`` (per deployment name) is applied with ``.options``, as
    Ray does with a config's ``deployments`` section. A decoder variant whose
    checkpoint is not configured is not deployed; its endpoint answers 404.
    """
    settings = parse_service_settings(args)
    paths = resolve_model_paths(settings.models)
    options = deployment_options or {}

    fine_tuned = fine_tuned_priors(settings.models, paths)
    stages = {}
    for stage in GENERATION_STAGES:
        path = getattr(paths, stage.checkpoint)
        # The prior stage also serves its family's fine-tuned priors (multiplexed models).
        extra = {"fine_tuned": fine_tuned[stage.family]} if stage.role == "prior" and fine_tuned.get(stage.family) else {}
        if stage.role == "movq":
            extra = {"tile_size": settings.movq.tile_size, "tile_overlap": settings.movq.tile_overlap}
        stages[stage.name] = None if path is None else (
            stage.load().options(name=stage.name, **options.get(stage.name, {})).bind(str(path), **stage_runtime(settings, stage.name), **extra)
        )
    for name, path in understanding_paths(settings.models).items():
        stage = BY_NAME[name]
        stages[name] = stage.load().options(name=name, **options.get(name, {})).bind(str(path), **stage_runtime(settings, name))
    ingress = Ingress.options(**options.get(Ingress.name, {}))
    return ingress.bind(settings.model_dump(mode="json"), **stages)
