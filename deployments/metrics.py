"""Every Prometheus metric of the product, defined in one place.

Metrics are Ray metrics (``ray.util.metrics``): each replica records them and
Ray's metrics agent on its node exports them, so a cluster is scraped the usual
Ray way. Ray prefixes custom metrics with ``ray_``: ``kandinsky_serve_x`` is
exported as ``ray_kandinsky_serve_x``. Ray adds node/worker labels; ours are
bounded (stage, route, status code, mode, size, reason, error type) — never a
prompt or a request id.
"""

from __future__ import annotations

from dataclasses import dataclass

EXPORT_PREFIX = "ray_"
BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
SECONDS_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()

    @property
    def exported_name(self) -> str:
        return EXPORT_PREFIX + self.name


def _spec(name, kind, description, tags, boundaries=()):
    return MetricSpec(name, kind, description, tuple(tags), tuple(boundaries))


# --- stages ---------------------------------------------------------------------------
STAGE_REQUESTS = _spec("kandinsky_serve_stage_requests_total", "counter", "Calls a stage received.", ["stage"])
STAGE_ERRORS = _spec("kandinsky_serve_stage_errors_total", "counter", "Calls a stage failed, by exception type.", ["stage", "error_type"])
STAGE_IMAGES = _spec("kandinsky_serve_stage_images_total", "counter", "Images a stage produced (one per seed).", ["stage"])
STAGE_QUEUE_WAIT = _spec(
    "kandinsky_serve_stage_queue_wait_seconds", "histogram", "Time a call waited before its batch started.", ["stage"], SECONDS_BOUNDARIES
)
STAGE_BATCH_SIZE = _spec(
    "kandinsky_serve_stage_batch_size", "histogram", "Calls in one batch of a batched stage.", ["stage"], BATCH_BOUNDARIES
)
# Ray exports a histogram's _sum estimated from its buckets, so exact sums get counters:
# mean batch size = rate(..._batch_items_total) / rate(..._batch_size_count).
STAGE_BATCH_ITEMS = _spec("kandinsky_serve_stage_batch_items_total", "counter", "Calls processed in batches (sum of batch sizes).", ["stage"])
STAGE_BATCH_COMPUTE = _spec(
    "kandinsky_serve_stage_batch_compute_seconds", "histogram", "Compute time of one batch.", ["stage"], SECONDS_BOUNDARIES
)
MODEL_LOAD = _spec("kandinsky_serve_model_load_seconds", "gauge", "How long the replica took to load its model.", ["stage"])
MODEL_SWITCH = _spec(
    "kandinsky_serve_model_switch_seconds", "histogram",
    "Time a replica took to load a multiplexed model (a fine-tuned prior) for a request that found it cold.",
    ["stage", "model"], SECONDS_BOUNDARIES,
)
GPU_ALLOCATED = _spec("kandinsky_serve_gpu_memory_allocated_bytes", "gauge", "CUDA memory allocated by the replica.", ["stage"])
GPU_RESERVED = _spec("kandinsky_serve_gpu_memory_reserved_bytes", "gauge", "CUDA memory reserved by the replica.", ["stage"])
GPU_PEAK = _spec(
    "kandinsky_serve_gpu_memory_peak_bytes", "gauge",
    "Most CUDA memory the replica's allocator has reserved since it started (inside batches too).", ["stage"],
)
GPU_BUDGET = _spec(
    "kandinsky_serve_gpu_memory_budget_bytes", "gauge",
    "The replica's share of its GPU's memory: its Ray GPU share (num_gpus) times the device's memory.", ["stage"],
)

# --- denoising loops (prior and denoiser) ------------------------------------------------
LOOP_STEPS = _spec("kandinsky_serve_denoise_steps_total", "counter", "Denoising steps run (one forward pass each).", ["stage"])
LOOP_BATCH = _spec(
    "kandinsky_serve_step_batch_size", "histogram", "Images in one denoising step's forward pass.", ["stage"], BATCH_BOUNDARIES
)
LOOP_IMAGE_STEPS = _spec(
    "kandinsky_serve_step_images_total", "counter", "Image-steps run (sum of step batch sizes).", ["stage"]
)
LOOP_STEP_SECONDS = _spec(
    "kandinsky_serve_step_duration_seconds", "histogram", "Wall time of one denoising step.", ["stage"], SECONDS_BOUNDARIES
)
LOOP_QUEUE_WAIT = _spec(
    "kandinsky_serve_step_queue_wait_seconds", "histogram", "Time an image waited before joining the loop.", ["stage"], SECONDS_BOUNDARIES
)

# --- ingress ---------------------------------------------------------------------------------
HTTP_REQUESTS = _spec("kandinsky_serve_http_requests_total", "counter", "HTTP requests by route and status code.", ["route", "status"])
REQUEST_DURATION = _spec(
    "kandinsky_serve_request_duration_seconds", "histogram",
    "End-to-end generation latency by mode, image size and model (a configured id).",
    ["mode", "size", "model"], SECONDS_BOUNDARIES,
)
REQUEST_BYTES = _spec("kandinsky_serve_request_bytes_total", "counter", "Request body bytes received.", ["route"])
RESPONSE_BYTES = _spec("kandinsky_serve_response_bytes_total", "counter", "Response body bytes sent.", ["route"])
REJECTED = _spec("kandinsky_serve_rejected_requests_total", "counter", "Requests refused before any model ran, by reason.", ["reason"])
STAGE_RETRIES = _spec(
    "kandinsky_serve_stage_retries_total", "counter", "Stage calls retried because their replica died or became unreachable.",
    ["deployment"],
)

ALL_METRICS: tuple[MetricSpec, ...] = (
    STAGE_REQUESTS, STAGE_ERRORS, STAGE_IMAGES, STAGE_QUEUE_WAIT, STAGE_BATCH_SIZE, STAGE_BATCH_ITEMS,
    STAGE_BATCH_COMPUTE, MODEL_LOAD, MODEL_SWITCH, GPU_ALLOCATED, GPU_RESERVED, GPU_PEAK, GPU_BUDGET,
    LOOP_STEPS, LOOP_BATCH, LOOP_IMAGE_STEPS, LOOP_STEP_SECONDS, LOOP_QUEUE_WAIT,
    HTTP_REQUESTS, REQUEST_DURATION, REQUEST_BYTES, RESPONSE_BYTES, REJECTED, STAGE_RETRIES,
)


def make(spec: MetricSpec):
    """The Ray metric object for ``spec`` (create once per replica)."""
    from ray.util.metrics import Counter, Gauge, Histogram

    if spec.kind == "counter":
        return Counter(spec.name, description=spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return Gauge(spec.name, description=spec.description, tag_keys=spec.tags)
    return Histogram(spec.name, description=spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tags)


class LoopMetrics:
    """A StepObserver that records a denoising loop's steps, batch sizes and queue waits."""

    def __init__(self, stage: str) -> None:
        self._tags = {"stage": stage}
        self.steps = make(LOOP_STEPS)
        self.batch_size = make(LOOP_BATCH)
        self.image_steps = make(LOOP_IMAGE_STEPS)
        self.step_seconds = make(LOOP_STEP_SECONDS)
        self.queue_wait = make(LOOP_QUEUE_WAIT)

    def on_admit(self, queue_wait_s: float) -> None:
        self.queue_wait.observe(queue_wait_s, tags=self._tags)

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.steps.inc(tags=self._tags)
        self.batch_size.observe(batch_size, tags=self._tags)
        self.image_steps.inc(batch_size, tags=self._tags)
        self.step_seconds.observe(seconds, tags=self._tags)

    def on_progress(self, key: str, step: int, total: int) -> None:
        pass


class StageMetrics:
    """Per-call and per-batch figures of one stage replica."""

    def __init__(self, stage: str, device: str = "cpu", gpu_share: float | None = None) -> None:
        self.stage = stage
        self.device = device
        self.gpu_share = gpu_share
        self._tags = {"stage": stage}
        self.requests = make(STAGE_REQUESTS)
        self.errors = make(STAGE_ERRORS)
        self.images = make(STAGE_IMAGES)
        self.queue_wait = make(STAGE_QUEUE_WAIT)
        self.batch_size = make(STAGE_BATCH_SIZE)
        self.batch_items = make(STAGE_BATCH_ITEMS)
        self.batch_compute = make(STAGE_BATCH_COMPUTE)
        self.model_load = make(MODEL_LOAD)
        self.model_switch = make(MODEL_SWITCH)
        self.gpu_allocated = make(GPU_ALLOCATED)
        self.gpu_reserved = make(GPU_RESERVED)
        self.gpu_peak = make(GPU_PEAK)
        self.gpu_budget = make(GPU_BUDGET)
        self._budget_bytes: int | None = None
        self._model_load_s: float | None = None

    def model_loaded(self, seconds: float) -> None:
        self._model_load_s = seconds
        self.refresh_gauges()

    def model_switched(self, model: str, seconds: float) -> None:
        """A multiplexed model loaded for a request (``model``: a configured id, a bounded label)."""
        self.model_switch.observe(seconds, tags={**self._tags, "model": model})

    def refresh_gauges(self) -> None:
        """Ray exports a gauge only for a while after it was last set: re-set them
        periodically (the replica's health check does)."""
        if self._model_load_s is not None:  # None: the model has not loaded (yet)
            self.model_load.set(self._model_load_s, tags=self._tags)
        self._sample_gpu_memory()

    def request(self) -> None:
        self.requests.inc(tags=self._tags)

    def error(self, error: BaseException) -> None:
        self.errors.inc(tags={**self._tags, "error_type": type(error).__name__})

    def produced(self, images: int) -> None:
        if images:
            self.images.inc(images, tags=self._tags)

    def batch(self, size: int, compute_s: float, queue_waits_s: list[float]) -> None:
        self.batch_size.observe(size, tags=self._tags)
        self.batch_items.inc(size, tags=self._tags)
        self.batch_compute.observe(compute_s, tags=self._tags)
        for wait in queue_waits_s:
            self.queue_wait.observe(wait, tags=self._tags)
        self._sample_gpu_memory()

    def _sample_gpu_memory(self) -> None:
        if not self.device.startswith("cuda"):
            return
        import torch

        self.gpu_allocated.set(torch.cuda.memory_allocated(self.device), tags=self._tags)
        self.gpu_reserved.set(torch.cuda.memory_reserved(self.device), tags=self._tags)
        # The peak, not a sample after the batch: a batch's activations are freed by then.
        self.gpu_peak.set(torch.cuda.max_memory_reserved(self.device), tags=self._tags)
        if self._budget_bytes is None and self.gpu_share:  # constant: read the device once
            self._budget_bytes = gpu_memory_budget(self.gpu_share, torch.cuda.get_device_properties(self.device).total_memory)
        if self._budget_bytes is not None:
            self.gpu_budget.set(self._budget_bytes, tags=self._tags)


def gpu_memory_budget(share: float | None, device_bytes: int) -> int | None:
    """The memory a replica with ``share`` of a GPU may hold: Ray schedules fractional GPUs by
    that number alone and leaves memory to the replicas, so the share is the budget to check
    the peak against. None without a share (outside Ray, or no GPU assigned)."""
    if not share:
        return None
    return int(min(share, 1.0) * device_bytes)


class IngressMetrics:
    """HTTP-level figures; the API layer calls these through :class:`serve.http.app.ApiMetrics`."""

    def __init__(self) -> None:
        self.http_requests = make(HTTP_REQUESTS)
        self.duration = make(REQUEST_DURATION)
        self.request_bytes = make(REQUEST_BYTES)
        self.response_bytes = make(RESPONSE_BYTES)
        self.rejected = make(REJECTED)
        self.retries = make(STAGE_RETRIES)

    def http_request(self, route: str, status: int, request_bytes: int, response_bytes: int) -> None:
        self.http_requests.inc(tags={"route": route, "status": str(status)})
        if request_bytes:
            self.request_bytes.inc(request_bytes, tags={"route": route})
        if response_bytes:
            self.response_bytes.inc(response_bytes, tags={"route": route})

    def generation(self, mode: str, width: int, height: int, seconds: float, model: str = "") -> None:
        self.duration.observe(seconds, tags={"mode": mode, "size": f"{width}x{height}", "model": model})

    def rejection(self, reason: str) -> None:
        self.rejected.inc(tags={"reason": reason})

    def stage_retry(self, deployment: str) -> None:
        self.retries.inc(tags={"deployment": deployment})


EXPOSED_PREFIXES = (EXPORT_PREFIX + "kandinsky_serve_", "ray_serve_")


def merge_exposition(texts: list[str], prefixes: tuple[str, ...] = EXPOSED_PREFIXES) -> str:
    """Keep the families named with ``prefixes`` from several Prometheus text
    expositions (one per node), grouping each family's samples under one HELP/TYPE."""
    families: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for text in texts:
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                family = name if name.startswith(prefixes) else None
                if family is not None and len(headers.setdefault(family, [])) < 2 and line not in headers[family]:
                    headers[family].append(line)
                continue
            if family is not None and line and not line.startswith("#"):
                families.setdefault(family, []).append(line)
    lines: list[str] = []
    for family in sorted(headers):
        lines.extend(headers[family])
        lines.extend(families.get(family, []))
    return "\n".join(lines) + ("\n" if lines else "")
