"""The graph, wired in one place: four stages behind one HTTP ingress.

``build_app`` is the ``import_path`` target of every file in ``configs/``
(``serve.graph:build_app``); Ray passes it the application's ``args``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from deployments.denoiser import Denoiser
from deployments.loading import DECODER_LAYOUT, PRIOR_LAYOUT, check_layout
from deployments.movq import MovqDecoder
from deployments.prior import Prior
from deployments.text_encoder import TextEncoder
from serve.ingress import Ingress
from serve.settings import ModelSettings, parse_service_settings


def resolve_model_paths(models: ModelSettings) -> tuple[Path, Path]:
    """The configured checkpoints, checked; or the embedded trained tiny model shipped with the package."""
    if models.prior_path is None:
        from serve.embedded import trained_checkpoint

        return trained_checkpoint()
    return (
        check_layout(models.prior_path, PRIOR_LAYOUT, "prior"),
        check_layout(models.decoder_path, DECODER_LAYOUT, "decoder"),
    )


def build_app(args: dict[str, Any]) -> Application:
    """The ``import_path`` target: Ray calls it with the application's ``args`` and
    applies the config's ``deployments`` section itself."""
    return build_graph(args)


def build_graph(args: dict[str, Any] | None = None, deployment_options: dict[str, dict[str, Any]] | None = None) -> Application:
    """Validate the settings, resolve the checkpoints and bind the graph.

    ``deployment_options`` (per deployment name) is applied with ``.options``, as
    Ray does with a config's ``deployments`` section.
    """
    settings = parse_service_settings(args)
    prior_path, decoder_path = resolve_model_paths(settings.models)
    options = deployment_options or {}
    runtime = {"device": settings.models.device, "dtype": settings.models.dtype}

    def bind(deployment, *args: Any, **kwargs: Any):
        return deployment.options(**options.get(deployment.name, {})).bind(*args, **kwargs)

    text_encoder = bind(TextEncoder, str(prior_path), **runtime)
    prior = bind(Prior, str(prior_path), **runtime)
    denoiser = bind(Denoiser, str(decoder_path), **runtime)
    movq = bind(MovqDecoder, str(decoder_path), **runtime)
    return bind(Ingress, text_encoder, prior, denoiser, movq, settings.model_dump(mode="json"))
