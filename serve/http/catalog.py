"""The models this service serves, as requests name them (``model`` on every generation request).

Built from the settings and what was deployed; answers, before anything runs, which model a
request gets, or the 4xx that says why it cannot have it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from deployments.registry import DEFAULT_FAMILY, FAMILIES, MODEL_IDS, STAGES, denoiser_of_mode, understanding_stage
from serve.http.errors import ApiError
from serve.http.schemas import GenerationSpec


@dataclass(frozen=True)
class ServedModel:
    id: str
    family: str
    modes: tuple[str, ...]
    """The modes it serves here (its family's, less variants whose checkpoint is not configured)."""
    stages: tuple[str, ...]
    """Its deployments."""
    prior: str = ""
    """A fine-tuned prior: its id, which routes the prior call (``multiplexed_model_id``) to a
    replica of its family's Prior that holds it. Empty: the family's own prior."""
    caption_check: str | None = None
    """Why ``caption_check`` is refused here (its stage is not deployed); None: it is offered."""

    def apply(self, spec: GenerationSpec, field: str = "caption_check") -> GenerationSpec:
        """``spec`` as run by this model; 404 ``mode_not_configured`` naming ``field`` when
        it asks for ``caption_check`` and that is not configured."""
        if spec.caption_check and self.caption_check is not None:
            raise ApiError(404, "mode_not_configured", self.caption_check,
                           [{"field": field, "message": self.caption_check}], reason="mode_not_configured")
        return replace(spec, model=self.id, family=self.family, prior_model=self.prior)

    def as_json(self, default: bool, default_side: int, loaded: bool) -> dict:
        # OpenAI's model-list shape (clients that list models read id/object/owned_by), plus ours.
        return {"id": self.id, "object": "model", "created": 0, "owned_by": "kandinsky-serve",
                "family": self.family, "modes": list(self.modes), "default": default,
                "default_size": {"width": default_side, "height": default_side}, "loaded": loaded}


class ModelCatalog:
    def __init__(self, models: list[ServedModel], default_id: str) -> None:
        self.models = {model.id: model for model in models}
        if default_id not in self.models:
            raise ValueError(f"default model {default_id!r} is not among {list(self.models)}")
        self.default_id = default_id

    @classmethod
    def serving(cls, families: tuple[str, ...], deployed: set[str] | None = None, default_id: str | None = None,
                priors: tuple[tuple[str, str], ...] = (), names: dict[str, str] | None = None) -> "ModelCatalog":
        """One model per family (named by ``names``, default :data:`MODEL_IDS`), then one per
        fine-tuned prior ``(id, family)``; a mode whose
        U-Net stage is not in ``deployed`` (None: all are) is left out of its model's modes."""
        captioner = understanding_stage("caption")
        refusal = None if deployed is None or captioner.name in deployed else (
            f"caption_check is not configured on this deployment: set args.models.{captioner.path_field} "
            f"(or ${captioner.path_env}) to a {captioner.name} checkpoint directory and redeploy")
        by_family = {}
        for family in families:
            stages = tuple(s.name for s in STAGES if s.family == family and (deployed is None or s.name in deployed))
            modes = tuple(mode for mode in FAMILIES[family] if denoiser_of_mode(mode, family).name in stages)
            by_family[family] = ServedModel((names or MODEL_IDS).get(family, MODEL_IDS[family]), family, modes, stages,
                                            caption_check=refusal)
        fine_tuned = [replace(by_family[family], id=prior_id, prior=prior_id) for prior_id, family in priors]
        return cls([*by_family.values(), *fine_tuned], default_id or by_family[DEFAULT_FAMILY].id)

    @property
    def ids(self) -> list[str]:
        return list(self.models)

    def resolve(self, requested: str | None, mode: str, field: str = "model") -> ServedModel:
        """The model for a ``mode`` request naming ``requested`` (None: the default); else
        404 ``model_not_found`` (listing the ids), 422 ``mode_not_supported`` (the family has
        no such mode) or 404 ``mode_not_configured`` (its checkpoint is not configured)."""
        model = self.models.get(requested or self.default_id)
        if model is None:
            message = f"{field}: no model {requested!r} is served here; the models are: {', '.join(self.ids)}"
            raise ApiError(404, "model_not_found", message, [{"field": field, "message": message}],
                           reason="model_not_found")
        if mode not in FAMILIES[model.family]:
            message = (f"{field}: model {model.id} (Kandinsky {model.family}) has no {mode} mode; it offers "
                       f"{', '.join(FAMILIES[model.family])}")
            raise ApiError(422, "mode_not_supported", message, [{"field": field, "message": message}],
                           reason="validation")
        if mode not in model.modes:
            message = f"{mode} with model {model.id} is not configured on this deployment"
            raise ApiError(404, "mode_not_configured", message, reason="mode_not_configured")
        return model
