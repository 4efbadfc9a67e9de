"""Settings: one pydantic model per concern, loaded from a Ray Serve config file.

A file in ``configs/`` is a plain Ray Serve config (``serve deploy``/``serve run``
accept it as is). The project's own settings live in two places inside it:

* ``applications[].args`` -> :class:`ServiceSettings` (models and API limits);
* ``applications[].deployments[].user_config`` -> :class:`deployments.batching.BatchSettings`
  (:class:`~deployments.batching.LoopBatchSettings` for the prior and the denoiser).

:func:`load_config` validates both, plus Ray's own schema, and reports every
problem as ``<file>: <field path>: <what is wrong>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from deployments.batching import BatchSettings, LoopBatchSettings
from deployments.registry import BY_NAME, DEFAULT_FAMILY, INGRESS_NAME, MODEL_IDS, STAGE_NAMES, STAGES

CACHE_DIR_ENV = "KANDINSKY_CACHE_DIR"
API_KEYS_FILE_ENV = "KANDINSKY_API_KEYS_FILE"
MAX_JOB_PRIORITY = 10
"""Job priorities run from -10 to 10 (0 is the default)."""



def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "kandinsky-serve"))


def _family_text(value: Any) -> Any:
    """YAML reads an unquoted ``family: 2.1`` as a number."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class FineTunedPrior(BaseModel):
    """A prior of a served family with its own weights (``kandinsky-serve train prior`` writes one),
    requested as a model of its own; it shares its family's encoders and decoders."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)
    """What requests name it by (``model``)."""
    family: Literal["2.2", "2.1"] = "2.2"

    @field_validator("family", mode="before")
    @classmethod
    def _family_as_text(cls, value: Any) -> Any:
        return _family_text(value)

    path: Path
    """A prior directory in its family's layout (its CLIP encoders must be the family's own)."""


class CatalogEntry(BaseModel):
    """One model of ``args.models.catalog`` (or of ``args.models`` given as a list)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)
    family: Literal["2.2", "2.1"] = "2.2"
    prior_path: Path
    decoder_path: Path | None = None

    @field_validator("family", mode="before")
    @classmethod
    def _family_as_text(cls, value: Any) -> Any:
        return _family_text(value)
    """Given: the family's model (one per family). None: a fine-tuned prior of the family's model."""
    inpaint_decoder_path: Path | None = None
    controlnet_decoder_path: Path | None = None
    default: bool = False
    """The model a request naming none gets (at most one)."""


def _expand_catalog(data: Any) -> Any:
    """``args.models`` as a list of models, or with ``catalog: [...]``, in the settings' own fields:
    a family's model (one with ``decoder_path``) sets that family's paths and names it; a model
    without a decoder is a fine-tuned prior of its family."""
    if isinstance(data, list):
        data = {"catalog": data}
    if not isinstance(data, dict) or "catalog" not in data:
        return data
    data = dict(data)
    entries = [CatalogEntry.model_validate(entry) for entry in data.pop("catalog") or []]
    names, priors = dict(data.get("names") or {}), list(data.get("priors") or [])
    defaults = [entry.id for entry in entries if entry.default]
    if len(defaults) > 1:
        raise ValueError(f"catalog: at most one model may be the default; {defaults} are")
    if defaults:
        data["default_model"] = defaults[0]
    suffix = {"2.2": "", "2.1": "_21"}
    for index, entry in enumerate(entries):
        if entry.decoder_path is None:
            priors.append({"id": entry.id, "family": entry.family, "path": entry.prior_path})
            continue
        if entry.family in names:
            raise ValueError(f"catalog.{index}: a second model of family {entry.family} with a decoder; one decoder "
                             "per family (a model with only a prior_path is a fine-tuned prior of the family's)")
        if entry.family == "2.1" and entry.controlnet_decoder_path is not None:
            raise ValueError(f"catalog.{index}.controlnet_decoder_path: Kandinsky 2.1 has no ControlNet decoder")
        names[entry.family] = entry.id
        for field in ("prior_path", "decoder_path", "inpaint_decoder_path", "controlnet_decoder_path"):
            value = getattr(entry, field)
            key = field.replace("_path", f"{suffix[entry.family]}_path")
            if value is not None and data.get(key) not in (None, value):
                raise ValueError(f"catalog.{index}.{field}: {key} is set outside the catalog too; set it in one place")
            if value is not None:
                data[key] = value
    data["names"], data["priors"] = names, priors
    return data


class ModelSettings(BaseModel):
    """Where the checkpoints are and how they run. ``args.models`` may also be a list of models
    (or carry ``catalog: [...]``): see :class:`CatalogEntry`."""

    model_config = ConfigDict(extra="forbid")

    prior_path: Path | None = None
    """Directory in the layout of ``kandinsky-2-2-prior``. None: the embedded tiny model."""
    decoder_path: Path | None = None
    """Directory in the layout of ``kandinsky-2-2-decoder``. None: the embedded tiny model."""
    inpaint_decoder_path: Path | None = None
    """Layout of ``kandinsky-2-2-decoder-inpaint``; enables ``/v1/inpaint``. Ignored (the embedded
    tiny one is used) when ``prior_path``/``decoder_path`` are null."""
    controlnet_decoder_path: Path | None = None
    """Layout of ``kandinsky-2-2-controlnet-depth``; enables ``/v1/controlnet``. Same rule."""
    prior_21_path: Path | None = None
    """Kandinsky 2.1 (model ``kandinsky-2-1``), layout of ``kandinsky-2-1-prior``; with ``decoder_21_path``
    it deploys the 2.1 family's stages beside 2.2's. None: 2.1 is not served."""
    decoder_21_path: Path | None = None
    """Layout of ``kandinsky-2-1`` (U-Net, MOVQ and the multilingual text encoder)."""
    inpaint_decoder_21_path: Path | None = None
    """Layout of ``kandinsky-2-1-inpaint``; enables inpainting with ``model: kandinsky-2-1``."""
    florence2_path: Path | None = None
    """Florence-2 in the layout of ``florence-community/Florence-2-base``; enables ``/v1/caption``,
    ``/v1/detect``, ``/v1/ground`` and ``/v1/ocr``. None: those answer 404."""
    kosmos2_path: Path | None = None
    """Kosmos-2 in the layout of ``microsoft/kosmos-2-patch14-224``; enables ``/v1/grounded-caption``."""
    priors: list[FineTunedPrior] = Field(default_factory=list, max_length=64)
    """Fine-tuned priors served as models of their own, on their family's Prior replicas
    (``@serve.multiplexed``: each replica keeps the most recently used few loaded)."""
    default_model: str | None = None
    """The model a request that names none gets: ``kandinsky-2-2`` (the default), ``kandinsky-2-1``
    or a fine-tuned prior's id."""
    names: dict[Literal["2.2", "2.1"], Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]] = {}
    """Each family's model id, where not the default (``kandinsky-2-2``, ``kandinsky-2-1``)."""

    @model_validator(mode="before")
    @classmethod
    def _catalog(cls, data: Any) -> Any:
        return _expand_catalog(data)
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    """Torch device of every stage: ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights and activations dtype of every stage (``args.performance`` may set one per stage).
    ``float16`` needs a GPU; ``bfloat16`` runs on CPUs too."""
    embedded_dir: Path | None = None
    """Where the embedded model's derived decoder variants are written; default ``$KANDINSKY_CACHE_DIR`` or ~/.cache."""
    require_variants: bool = False
    """Refuse to start when a decoder variant the config lists has no checkpoint. Default: that
    variant is left out (one log line at start) and its endpoint answers 404 ``mode_not_configured``."""

    @model_validator(mode="after")
    def _check(self) -> "ModelSettings":
        embedded = self.prior_path is None and self.decoder_path is None
        if embedded and (self.inpaint_decoder_path or self.controlnet_decoder_path):
            raise ValueError(
                "inpaint_decoder_path/controlnet_decoder_path need prior_path and decoder_path; with those null the "
                "embedded tiny model (all variants included) is served"
            )
        if (self.prior_path is None) != (self.decoder_path is None):
            raise ValueError(
                "set both prior_path and decoder_path (real checkpoints) or neither (embedded tiny model)"
            )
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError(f"dtype {self.dtype} {CPU_FLOAT16}")
        if (self.prior_21_path is None) != (self.decoder_21_path is None):
            raise ValueError("set both prior_21_path and decoder_21_path (to serve Kandinsky 2.1) or neither")
        if self.inpaint_decoder_21_path is not None and self.decoder_21_path is None:
            raise ValueError("inpaint_decoder_21_path needs prior_21_path and decoder_21_path")
        ids = [prior.id for prior in self.priors]
        clash = sorted({i for i in ids if ids.count(i) > 1} | (set(ids) & set(self.family_ids().values())))
        if clash:
            raise ValueError(f"priors: ids must be unique and differ from the families' models; repeated: {clash}")
        for index, prior in enumerate(self.priors):
            if prior.family not in self.families():
                raise ValueError(f"priors.{index}.family: {prior.family} is not served; set its checkpoints "
                                 f"(prior_21_path, decoder_21_path) or choose {self.families()}")
        if self.default_model is not None and self.default_model not in self.model_ids():
            raise ValueError(f"default_model: {self.default_model!r} is not served; the models are {self.model_ids()}")
        return self

    def families(self) -> tuple[str, ...]:
        """The model families this configuration serves, the default family first."""
        return (DEFAULT_FAMILY, *(("2.1",) if self.decoder_21_path is not None else ()))

    def family_ids(self) -> dict[str, str]:
        """Each served family's model id."""
        return {family: self.names.get(family, MODEL_IDS[family]) for family in self.families()}

    def model_ids(self) -> list[str]:
        return [*self.family_ids().values(), *(prior.id for prior in self.priors)]

    def default_model_id(self) -> str:
        return self.default_model or self.family_ids()[DEFAULT_FAMILY]

    def with_env_overrides(self) -> "ModelSettings":
        """``KANDINSKY_PRIOR_PATH`` / ``KANDINSKY_DECODER_PATH`` (and the variants') win over the file."""
        updates = {}
        for stage in STAGES:
            if os.environ.get(stage.path_env):
                updates[stage.path_field] = Path(os.environ[stage.path_env])
        if not updates:
            return self
        return ModelSettings.model_validate({**self.model_dump(), **updates})


class ApiLimits(BaseModel):
    """Caps on what one request may ask for; every one is enforced before any model runs."""

    model_config = ConfigDict(extra="forbid")

    max_side: int = Field(default=1024, ge=64, le=4096, multiple_of=64)
    """Largest width or height in pixels (sizes are multiples of 64)."""
    default_side: int | None = Field(default=None, ge=64, le=4096, multiple_of=64)
    """Width and height of a request that names none (at most ``max_side``). None: the model's
    own size, 64 for the embedded model (trained on 64×64 scenes), 512 for configured checkpoints."""
    max_num_images: int = Field(default=8, ge=1, le=64)
    """Most images one request may ask for."""
    max_steps: int = Field(default=150, ge=1, le=1000)
    """Most decoder denoising steps."""
    max_prior_steps: int = Field(default=100, ge=2, le=1000)
    """Most prior denoising steps."""
    max_prompt_chars: int = Field(default=2000, ge=1, le=100_000)
    """Longest prompt or negative prompt in characters (the encoder truncates at 77 tokens)."""
    max_guidance_scale: float = Field(default=50.0, gt=0)
    """Largest guidance scale for either stage."""
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest request body in bytes; larger ones get 413."""
    max_image_pixels: int | None = Field(default=None, ge=64 * 64, le=16384 * 16384)
    """Largest input image (width x height) any endpoint decodes; larger ones get 422 unread.
    None: (2 x max_side)², i.e. 2048² at the default max_side (inputs are resized to the
    output size, so more only costs memory)."""
    max_request_pixels: int | None = Field(default=None, ge=64 * 64, le=4 * 16384 * 16384)
    """Pixels one request may decode in all images together (a mix, an embeddings batch, an
    inpainting image and its mask). None: twice ``max_image_pixels``."""
    jpeg_draft: bool = False
    """Decode a JPEG input at a reduced scale (libjpeg's 1/2, 1/4, 1/8, never below the output
    size) when its output size is known at decode time: much less memory and CPU for large
    photos, but pixels then differ slightly from diffusers', which resizes the full decode.
    Off by default, so that results match the reference pipelines."""
    max_mix_items: int = Field(default=8, ge=1, le=64)
    """Most items (texts and images) in one ``/v1/mix`` request."""
    max_embedding_items: int = Field(default=16, ge=1, le=256)
    """Most texts plus images in one ``/v1/embeddings`` request."""
    max_output_pixels: int = Field(default=1024 * 1024, ge=64 * 64, le=4096 * 4096)
    """Largest width x height of an output image (with ``max_side`` bounding each side)."""
    max_sweep_cells: int = Field(default=16, ge=1, le=64)
    """Most cells (the product of the axes' value counts) in one ``/v1/sweep`` request."""
    max_sweep_values: int = Field(default=16, ge=1, le=64)
    """Most values on one axis of a sweep."""
    max_sweep_images: int = Field(default=32, ge=1, le=256)
    """Most images one sweep makes in all: cells x ``num_images``."""
    max_hires_scale: float = Field(default=4.0, gt=1.0, le=16.0)
    """Largest ``hires.scale`` (the output within ``max_side`` and ``max_output_pixels`` too)."""

    @model_validator(mode="after")
    def _pixel_defaults(self) -> "ApiLimits":
        if self.max_image_pixels is None:
            self.max_image_pixels = min((2 * self.max_side) ** 2, 16384 * 16384)
        if self.max_request_pixels is None:
            self.max_request_pixels = 2 * self.max_image_pixels
        elif self.max_request_pixels < self.max_image_pixels:
            raise ValueError(f"max_request_pixels ({self.max_request_pixels}) must be at least max_image_pixels "
                             f"({self.max_image_pixels}): one image at the cap must fit")
        return self


class AdmissionSettings(BaseModel):
    """Overload and time: what the ingress admits, and how long a request may take."""

    model_config = ConfigDict(extra="forbid")

    max_inflight_requests: int = Field(default=64, ge=1, le=100_000)
    """Generation requests one ingress replica runs at once; more get 503 with Retry-After at
    once (no queue here: the stages' own queues are bounded by ``max_queued_requests``)."""
    max_inflight_per_client: int | None = Field(default=None, ge=1, le=100_000)
    """Of those, the most one client (an API key; without keys, an address) may hold; more get
    429 ``too_many_inflight``. None: half of ``max_inflight_requests`` (at least 1), so that no
    one client can hold the whole gate."""
    decode_threads: int = Field(default=2, ge=1, le=64)
    """Input images one ingress replica decodes at once (off its event loop); more wait."""
    body_read_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """Time allowed to receive a request's whole body; a slower one gets 408 ``body_timeout``
    (a client trickling its body must not hold a place in the service)."""
    refusal_pace_s: float = Field(default=1.0, ge=0, le=60)
    """A rate-limit 429 is answered when a retry could succeed (the key's bucket refills), at
    most this many seconds after it arrived: a client that waits for its answers (most floods)
    is held to its rate instead of costing the proxy and the ingress a refusal every few
    milliseconds. 0: answer at once."""
    max_paced_refusals: int = Field(default=64, ge=0, le=10_000)
    """Refusals one ingress replica holds back at once; beyond it they are answered at once."""
    request_timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    """End-to-end limit per request; past it the client gets 504 and every stage drops the work."""
    retry_after_s: float | None = Field(default=None, gt=0)
    """The Retry-After sent with 503s; None estimates it from recent request durations."""
    stage_retries: int = Field(default=1, ge=0, le=3)
    """Times a stage call is retried on another replica when the one serving it dies or becomes
    unreachable (stage calls are deterministic for a seed, so a retry returns the same output)."""


class AuthSettings(BaseModel):
    """API keys and per-key rate limits. Off (open API) unless a keys file is configured."""

    model_config = ConfigDict(extra="forbid")

    api_keys_file: Path | None = None
    """YAML file of hashed keys (``kandinsky-serve keys new``); ``$KANDINSKY_API_KEYS_FILE`` wins.
    When set, every route but /healthz and /readyz needs ``Authorization: Bearer <key>``."""
    client_address_header: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")
    """Without keys, a client is its address: the peer's, or, when this names a header that a
    trusted proxy in front sets (e.g. ``X-Forwarded-For``), that header's last entry. Only set
    it when every request comes through that proxy: a client could write the header itself."""
    requests_per_s: float = Field(default=5.0, gt=0)
    """Default per-key request rate (a key's own entry may override it)."""
    burst_requests: int = Field(default=10, ge=1)
    """Requests a key may send at once before the rate applies."""
    images_per_min: float = Field(default=120.0, gt=0)
    """Default per-key generation budget per minute, in standard images: one 512x512 image at
    50 decoder + 25 prior steps costs 1; others cost in proportion to images x pixels x (decoder
    steps + prior steps / 4) (a key's own entry may override it)."""

    def keys_file(self) -> Path | None:
        env = os.environ.get(API_KEYS_FILE_ENV)
        return Path(env) if env else self.api_keys_file


class JobSettings(BaseModel):
    """``args.jobs``: where job state lives, how long it is kept, how many jobs at once."""

    model_config = ConfigDict(extra="forbid")

    store_name: str = Field(default="kandinsky-serve-jobs", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Name of the detached Ray actor holding job state (namespace ``kandinsky-serve``).
    Every ingress replica of every deployment that names the same store shares it."""
    ttl_s: float = Field(default=3600.0, gt=0)
    """Finished jobs (and their images) are forgotten this long after they finish."""
    max_active_jobs_per_client: int = Field(default=8, ge=1)
    """Queued plus running jobs of one client; more get 429 with Retry-After."""
    max_active_jobs: int = Field(default=256, ge=1)
    """Queued plus running jobs of all clients; more get 429 with Retry-After."""
    max_stored_jobs: int = Field(default=1024, ge=1)
    """Jobs held at once, finished ones included; more get 429."""
    max_stored_bytes: int = Field(default=1024**3, ge=1,
                                  validation_alias=AliasChoices("max_stored_bytes", "max_stored_image_bytes"))
    """Bytes held at once (result images, preview images and events; in the store actor's
    memory); past it, new jobs get 429 until finished jobs expire. (Was ``max_stored_image_bytes``.)"""
    max_stored_jobs_per_client: int = Field(default=128, ge=1)
    """Jobs one client may have stored, finished ones included. A new job over this (or over
    the client's bytes) first drops that client's own oldest finished jobs; only if that is
    not enough is it refused (429)."""
    max_stored_bytes_per_client: int = Field(default=256 * 1024**2, ge=1)
    """Bytes one client may have stored (as ``max_stored_bytes`` counts them)."""
    fetched_ttl_s: float = Field(default=300.0, gt=0)
    """A finished job whose images were fetched is forgotten this long after the first fetch,
    if that comes before ``ttl_s`` runs out."""
    max_streams: int = Field(default=64, ge=1, le=10_000)
    """Event streams (``/v1/jobs/{id}/events``) one ingress replica holds open at once; more get
    503 with Retry-After. With ``admission.max_inflight_requests`` it must stay below the
    Ingress's ``max_ongoing_requests``, so that health checks, reads and cancels always answer."""
    max_streams_per_client: int = Field(default=8, ge=1, le=10_000)
    """Of those, the most one client may hold; more get 429 ``too_many_streams``."""
    max_running_jobs: int = Field(default=16, ge=1)
    """Jobs one ingress replica runs at once; the others wait in state ``queued``."""
    progress_interval_s: float = Field(default=0.2, gt=0, le=5.0)
    """How often a running job polls the denoising loops for its progress."""
    lease_s: float = Field(default=30.0, gt=0)
    """A queued or running job whose replica has not reported for this long (the replica
    died) is failed with ``runner_lost``."""
    preview_max_side: int = Field(default=128, ge=16, le=512)
    """Longest side of a preview image, in pixels."""
    a1111_preview_every: int = Field(default=10, ge=0, le=1000)
    """An AUTOMATIC1111 generation makes a preview every this many denoising steps, for
    ``/sdapi/v1/progress``'s ``current_image`` (A1111's "show progress every N steps"); 0: none."""
    public_base_url: str | None = Field(default=None, pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$", max_length=2000)
    """The service's address as clients reach it (``https://images.example.com``), for absolute
    image links in OpenAI ``url`` results. None: the links are relative (``/v1/jobs/…``). Never
    taken from the request's Host header, which any client can set."""

    persist: bool = True
    """Keep job records (state, result images) in an embedded SQLite database, so that they
    survive a restart of the store actor. False: in the actor's memory only."""
    database_path: Path | None = None
    """The SQLite file (WAL mode; ``-wal``/``-shm`` files beside it). None: ``jobs/<store_name>.sqlite3``
    in the cache directory (``$KANDINSKY_CACHE_DIR``, default ``~/.cache/kandinsky-serve``) of the
    node the store actor runs on; on a multi-node cluster, give a path on storage every node
    reaches, or the store forgets its jobs when it restarts on another node."""
    max_priority: int = Field(default=0, ge=-MAX_JOB_PRIORITY, le=MAX_JOB_PRIORITY)
    """The highest ``priority`` a job may ask for, unless its API key sets its own ``max_priority``
    (admin keys: any). Lower priorities are always allowed."""

    def database_file(self) -> Path | None:
        """Where the store keeps its records, or None when it keeps them in memory only."""
        if not self.persist:
            return None
        return self.database_path or default_cache_dir() / "jobs" / f"{self.store_name}.sqlite3"

    @model_validator(mode="after")
    def _stored_holds_active(self) -> "JobSettings":
        if self.max_stored_jobs_per_client < self.max_active_jobs_per_client:
            raise ValueError(f"max_stored_jobs_per_client ({self.max_stored_jobs_per_client}) must be at least "
                             f"max_active_jobs_per_client ({self.max_active_jobs_per_client}): a client's active jobs "
                             "are stored jobs too")
        return self


class OutputSettings(BaseModel):
    """What the returned images carry."""

    model_config = ConfigDict(extra="forbid")

    embed_parameters: bool = True
    """Write each image's generation parameters (prompt, negative prompt, seed, steps,
    sampler, guidance, size, model, mode, version) into it, as AUTOMATIC1111 does (a PNG
    ``parameters`` chunk, EXIF UserComment in JPEG and WebP). False keeps prompts out of
    the files (privacy)."""


class WebhookSettings(BaseModel):
    """``args.webhooks``: calls a job makes to its ``webhook_url`` when it ends."""

    model_config = ConfigDict(extra="forbid")

    secret_env: str = Field(default="KANDINSKY_WEBHOOK_SECRET", pattern=r"^[A-Z_][A-Z0-9_]*$", max_length=100)
    """The environment variable holding the HMAC-SHA256 signing secret (never in the config
    file). Unset or empty: a fresh random secret per replica start, so signatures still cannot
    be forged, but receivers cannot check them: set it in production."""
    allowed_hosts: list[str] = Field(default_factory=list, max_length=1000)
    """Host names or addresses (``hooks.internal``, ``10.1.2.3``) or networks (``10.0.0.0/8``)
    that may be called although they are loopback, link-local or private. Everything else
    must resolve to public addresses only (the SSRF guard)."""
    max_attempts: int = Field(default=5, ge=1, le=20)
    """Deliveries tried per job ending (the first and the retries)."""
    first_retry_s: float = Field(default=1.0, gt=0, le=600)
    """Wait before the first retry; doubles after each (exponential backoff)."""
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    """Per delivery: connect, send and read the answer."""
    max_url_chars: int = Field(default=2000, ge=16, le=8192)


class MovqSettings(BaseModel):
    """``args.movq``: the MOVQ stage (decoding latents to images, encoding input images)."""

    model_config = ConfigDict(extra="forbid")

    tile_size: int | None = Field(default=1152, ge=0, le=16384, multiple_of=8)
    """Images with a side above this many pixels are decoded (and input images encoded) in
    overlapping tiles of this size, so the stage's memory stays that of one tile at any output
    size. At or below it an image goes through whole, exactly as diffusers' pipelines decode it:
    1152 keeps every size up to 1152 identical to them and covers 2048 in two tiles a side
    (1024 + the 128 overlap). A multiple of 8 (the MOVQ's scale factor); 0 or null: never tile."""
    tile_overlap: int = Field(default=128, ge=0, le=8192, multiple_of=8)
    """Least overlap of neighbouring tiles in pixels (a multiple of 8), blended with weights that
    sum to one; at most half of ``tile_size``."""

    @model_validator(mode="after")
    def _overlap_fits(self) -> "MovqSettings":
        if self.tile_size and self.tile_size < 64:
            raise ValueError(f"tile_size {self.tile_size} is too small to decode well; use 0 (never tile) or at least 64")
        if self.tile_size and 2 * self.tile_overlap > self.tile_size:
            raise ValueError(f"tile_overlap {self.tile_overlap} is more than half of tile_size {self.tile_size}; "
                             f"lower tile_overlap to at most {self.tile_size // 2} or raise tile_size")
        return self


CPU_FLOAT16 = ("needs a GPU device (torch's float16 kernels on CPU are missing or slow); "
               "use float32 or bfloat16 with device cpu")
DTYPE = Literal["float32", "float16", "bfloat16"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
_ROLE_OPTIONS = {
    "denoiser": ("dtype", "attention", "channels_last", "compile", "compile_mode", "batch_buckets"),
    "movq": ("dtype", "attention", "channels_last", "compile", "compile_mode", "decode_chunk"),
    "prior": ("dtype", "attention"),
    "text_encoder": ("dtype", "attention"),
    "image_encoder": ("dtype", "attention"),
    "decoder_text_encoder": ("dtype",),
    "understanding": ("dtype",),
}
"""The options each stage role can apply; a default a role cannot apply is left out for it."""


class StagePerformance(BaseModel):
    """Precision and speed options of one stage (``args.performance.default`` or one of ``stages``)."""

    model_config = ConfigDict(extra="forbid")

    dtype: DTYPE | None = None
    """Weights and activations dtype; null: ``args.models.dtype``."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """``sdpa``: torch's ``scaled_dot_product_attention`` (fused kernels on GPUs); ``eager``: the math path."""
    channels_last: bool = False
    """U-Net and MOVQ (convolutional) in NHWC memory format: faster convolutions on GPUs with fp16/bf16."""
    compile: bool = False
    """``torch.compile`` the U-Net (the MOVQ's decoder): slower start-up (a compile per batch bucket
    and latent size), faster steps."""
    compile_mode: CompileMode = "default"
    """``torch.compile``'s ``mode``."""
    batch_buckets: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16], min_length=1, max_length=32)
    """With ``compile``, a U-Net step's batch (rows: two per guided image) is padded up to the next
    of these sizes, so compiled graphs are reused; above the largest it runs unpadded (and compiles)."""
    decode_chunk: int = Field(default=0, ge=0, le=64)
    """MOVQ only: at most this many images per decoder forward (0: all of a batch's images of one
    size at once). Bounds the decode's activation memory, which grows with the images per forward,
    and on CUDA overlaps image encoding on the CPU with the next chunk's decode on the GPU."""

    @field_validator("batch_buckets")
    @classmethod
    def _increasing(cls, buckets: list[int]) -> list[int]:
        if any(a >= b for a, b in zip(buckets, buckets[1:])):
            raise ValueError(f"{buckets} must be strictly increasing, e.g. [1, 2, 4, 8, 16]")
        return buckets


class PerformanceSettings(BaseModel):
    """``args.performance``: precision and speed options, a default and per-stage overrides."""

    model_config = ConfigDict(extra="forbid")

    default: StagePerformance = StagePerformance()
    """Every stage's options, each applied where the stage can (e.g. ``channels_last`` on the U-Net and MOVQ only)."""
    stages: dict[str, StagePerformance] = {}
    """Per deployment name (``Denoiser``, ``MovqDecoder``, ...): the keys given replace the default's."""

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: dict[str, StagePerformance]) -> dict[str, StagePerformance]:
        for name, options in stages.items():
            if name not in BY_NAME:
                raise ValueError(f"unknown stage {name!r}; name a deployment of {STAGE_NAMES}")
            role = BY_NAME[name].role
            refused = sorted(options.model_fields_set - set(_ROLE_OPTIONS[role]))
            if refused:
                raise ValueError(f"{name}: {', '.join(refused)} cannot apply to a {role} stage; it takes "
                                 f"{', '.join(_ROLE_OPTIONS[role])}")
        return stages

    @field_serializer("stages")
    def _only_given_keys(self, stages: dict[str, StagePerformance]) -> dict[str, dict[str, Any]]:
        # Only the keys given: a dump must validate again (the Ingress gets the settings that
        # way), and a stage refuses keys of other roles even at their defaults.
        return {name: options.model_dump(mode="json", exclude_unset=True) for name, options in stages.items()}

    def resolve(self, stage: str, default_dtype: str) -> StagePerformance:
        """``stage``'s options: the default's where the stage applies them, its own on top, dtype filled in."""
        role_keys = _ROLE_OPTIONS[BY_NAME[stage].role]
        own = self.stages.get(stage)
        merged = self.default.model_dump(include=set(role_keys))
        if own is not None:
            merged.update(own.model_dump(include=own.model_fields_set))
        merged["dtype"] = merged.get("dtype") or default_dtype
        return StagePerformance.model_validate(merged)


class ServiceSettings(BaseModel):
    """The application's ``args``: everything the graph builder needs."""

    model_config = ConfigDict(extra="forbid")

    models: ModelSettings = ModelSettings()
    limits: ApiLimits = ApiLimits()
    admission: AdmissionSettings = AdmissionSettings()
    auth: AuthSettings = AuthSettings()
    jobs: JobSettings = JobSettings()
    outputs: OutputSettings = OutputSettings()
    webhooks: WebhookSettings = WebhookSettings()
    movq: MovqSettings = MovqSettings()
    performance: PerformanceSettings = PerformanceSettings()

    @model_validator(mode="after")
    def _cpu_dtypes(self) -> "ServiceSettings":
        if self.models.device != "cpu":
            return self
        if self.performance.default.dtype == "float16":
            raise ValueError(f"performance.default.dtype: float16 {CPU_FLOAT16} (args.models.device is cpu)")
        for name, options in self.performance.stages.items():
            if options.dtype == "float16":
                raise ValueError(f"performance.stages.{name}.dtype: float16 {CPU_FLOAT16} (args.models.device is cpu)")
        return self


class ConfigError(ValueError):
    """A config file that cannot be served, with every problem listed."""


def _format_errors(source: str, prefix: str, error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in (*prefix.split("."), *item["loc"]) if part != "")
        lines.append(f"{source}: {loc}: {item['msg']}")
    return lines


EMBEDDED_SIDE = 64  # the embedded model's training resolution
CHECKPOINT_SIDE = 512  # diffusers' Kandinsky 2.2 pipelines' default


def parse_service_settings(args: dict[str, Any] | None, source: str = "args") -> ServiceSettings:
    """Validate an application's ``args`` and apply the environment overrides."""
    try:
        settings = ServiceSettings.model_validate(args or {})
        models = settings.models.with_env_overrides()
        limits = settings.limits
        if limits.default_side is None:
            side = EMBEDDED_SIDE if models.prior_path is None else CHECKPOINT_SIDE
            limits = limits.model_copy(update={"default_side": min(side, limits.max_side)})
        elif limits.default_side > limits.max_side:
            raise ConfigError(f"{source}: args.limits.default_side={limits.default_side} exceeds max_side={limits.max_side}")
        return settings.model_copy(update={"models": models, "limits": limits})
    except ValidationError as error:
        raise ConfigError("\n".join(_format_errors(source, "args", error))) from None


class LoadedConfig(BaseModel):
    """A validated config file: Ray's part and ours."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    path: Path
    raw: dict[str, Any]
    service: ServiceSettings
    deployment_options: dict[str, dict[str, Any]]
    """Per deployment name, the options to apply (Ray's override semantics)."""
    skipped_deployments: dict[str, str] = {}
    """Listed deployments left out (a decoder variant without a checkpoint), each with why."""
    http_host: str
    http_port: int
    logging_config: dict[str, Any] | None = None
    """The application's Ray Serve ``logging_config`` (e.g. ``encoding: JSON``)."""

    @property
    def app_name(self) -> str:
        """The name the application runs under: the file's, else "kandinsky" (what start_service deploys)."""
        return self.raw["applications"][0].get("name", "kandinsky")


INGRESS_HEADROOM = 16
"""Ingress places kept free of generations and event streams: probes, job reads and cancels."""


def _ingress_headroom(source: str, where: str, ongoing: int | None, service: ServiceSettings) -> list[str]:
    """The Ingress's ``max_ongoing_requests`` must hold every generation and stream this
    replica admits and still leave room, or a flood of them would shut out health checks."""
    if ongoing is None:
        return []
    admitted = service.admission.max_inflight_requests + service.jobs.max_streams
    if ongoing >= admitted + INGRESS_HEADROOM:
        return []
    return [f"{source}: {where}.max_ongoing_requests: {ongoing} leaves no room for probes, job reads and cancels "
            f"beside args.admission.max_inflight_requests ({service.admission.max_inflight_requests}) and "
            f"args.jobs.max_streams ({service.jobs.max_streams}); raise it to at least {admitted + INGRESS_HEADROOM} "
            "or lower those"]


def load_config(path: str | Path, app_index: int = 0) -> LoadedConfig:
    """Read and validate a config file; raise :class:`ConfigError` listing every problem."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as error:
        raise ConfigError("\n".join(_format_errors(source, "", error))) from None
    if not schema.applications:
        raise ConfigError(f"{source}: applications: list at least one application")
    app = schema.applications[app_index]
    problems: list[str] = []
    service = ServiceSettings()
    try:
        service = parse_service_settings(app.args, source)
    except ConfigError as error:
        problems.append(str(error).replace(f"{source}: args", f"{source}: applications.{app_index}.args"))

    options: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    known = (*STAGE_NAMES, INGRESS_NAME)
    for index, deployment in enumerate(app.deployments):
        where = f"applications.{app_index}.deployments.{index}"
        if deployment.name not in known:
            problems.append(f"{source}: {where}.name: unknown deployment {deployment.name!r}; expected one of {known}")
            continue
        opts = deployment.model_dump(exclude_unset=True, exclude={"name"})
        stage = BY_NAME.get(deployment.name)
        if stage is not None and stage.family is None and getattr(service.models, stage.path_field) is None:
            skipped[deployment.name] = (f"args.models.{stage.path_field} (${stage.path_env}) is not set: not deployed; "
                                        f"/v1/{' and /v1/'.join(stage.modes)} will answer 404 mode_not_configured")
            continue
        if stage is not None:
            try:
                settings_class = LoopBatchSettings if stage.loop else BatchSettings
                batch = settings_class.model_validate(opts.get("user_config") or {})
            except ValidationError as error:
                problems.extend(_format_errors(source, f"{where}.user_config", error))
                continue
            ongoing = opts.get("max_ongoing_requests")
            if ongoing is not None and ongoing < batch.max_batch_size:
                problems.append(
                    f"{source}: {where}.max_ongoing_requests: {ongoing} is below user_config.max_batch_size "
                    f"{batch.max_batch_size}; batches could never fill — raise max_ongoing_requests to at least "
                    f"{batch.max_batch_size}"
                )
        if deployment.name == INGRESS_NAME:
            problems.extend(_ingress_headroom(source, where, opts.get("max_ongoing_requests"), service))
        models = service.models
        if stage is not None and stage.family not in (DEFAULT_FAMILY, None) and getattr(models, stage.path_field) is None:
            # Another family's stage: deployed only when that family's checkpoints are configured.
            model = MODEL_IDS[stage.family]
            skipped[deployment.name] = (
                f"{'/'.join(stage.modes)} with model {model} is not configured: set args.models.{stage.path_field}"
                if stage.optional and stage.family in models.families() else
                f"model {model} is not served: its checkpoints (args.models.*_{stage.family.replace('.', '')}_path) are not set")
            continue
        if stage is not None and stage.optional and models.prior_path is not None and getattr(models, stage.path_field) is None:
            unset = f"{deployment.name} is listed but args.models.{stage.path_field} (${stage.path_env}) is not set"
            if models.require_variants:
                problems.append(f"{source}: {where}.name: {unset}; set it to a checkpoint directory, remove this "
                                "deployment, or set args.models.require_variants: false to leave it out")
            else:
                skipped[deployment.name] = f"{unset}: not deployed; /v1/{' and /v1/'.join(stage.modes)} will answer 404 mode_not_configured"
            continue
        options[deployment.name] = opts
    if problems:
        raise ConfigError("\n".join(problems))
    http = schema.http_options
    return LoadedConfig(
        path=path,
        raw=raw,
        service=service,
        deployment_options=options,
        skipped_deployments=skipped,
        http_host=http.host,
        http_port=http.port,
        logging_config=app.logging_config.model_dump(exclude_unset=True) if app.logging_config else None,
    )
