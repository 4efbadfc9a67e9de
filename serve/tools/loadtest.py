"""``kandinsky-serve loadtest``: drive any deployment of the API from a scenario file.

Open-loop arrivals (Poisson or constant rate) are dispatched on a precomputed
schedule and each request's latency runs from its *scheduled* time, so a slow
server cannot slow the sender down (no coordinated omission). Closed-loop runs
keep N clients busy. Every request carries an id and ends in exactly one
recorded outcome; the summary reports anything sent without an outcome as lost.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve.tools.provenance import provenance
from serve.settings import ConfigError

OUTCOMES = ("success", "timeout", "connection_error")  # plus "http_<status>" and "client_error"


class RequestMix(BaseModel):
    """One kind of request in the mix."""

    model_config = ConfigDict(extra="forbid")

    name: str = "text2img"
    weight: float = Field(default=1.0, gt=0)
    path: str = "/v1/text2img"
    body: dict[str, Any] = Field(default_factory=lambda: {"prompt": "a red circle", "width": 64, "height": 64})
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra request headers, e.g. ``Authorization: Bearer <key>``."""


class Arrival(BaseModel):
    model_config = ConfigDict(extra="forbid")

    process: Literal["poisson", "constant", "closed"] = "poisson"
    rates: list[float] = Field(default_factory=list)
    """Open loop: requests/s, one rate step each."""
    concurrency: list[int] = Field(default_factory=list)
    """Closed loop: clients, one step each."""
    ramp_s: float = Field(default=0.0, ge=0.0, le=3600.0)
    """Closed loop: the clients of a step start evenly spread over this many seconds, not all at once."""

    @model_validator(mode="after")
    def _check(self) -> "Arrival":
        if self.process == "closed":
            if not self.concurrency or any(c < 1 or c > 10_000 for c in self.concurrency):
                raise ValueError("closed loop needs concurrency: a list of client counts from 1 to 10000")
        elif not self.rates or any(r <= 0 or r > 100_000 for r in self.rates):
            raise ValueError(f"{self.process} arrivals need rates: a list of requests/s above 0 and at most 100000")
        return self

    @property
    def steps(self) -> list[float]:
        return [float(c) for c in self.concurrency] if self.process == "closed" else list(self.rates)


class Scenario(BaseModel):
    """A load test: what to send, how fast, for how long, and what counts as good."""

    model_config = ConfigDict(extra="forbid")

    target: str = "http://127.0.0.1:8000"
    mix: list[RequestMix] = Field(default_factory=lambda: [RequestMix()], min_length=1)
    arrival: Arrival = Field(default_factory=lambda: Arrival(rates=[1.0]))
    duration_s: float = Field(default=30.0, gt=0, le=24 * 3600)
    """Per rate step: arrivals stop after this long."""
    max_requests: int | None = Field(default=None, ge=1, le=10_000_000)
    """Per rate step: arrivals stop after this many."""
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    slo_s: float = Field(default=10.0, gt=0)
    """Latency objective: goodput counts successes at or under it."""
    seed: int = 0
    scrape_metrics: bool = True
    """Read the target's /metrics before and after, and report per-stage deltas."""


def load_scenario(path: str | Path, **overrides: Any) -> Scenario:
    """Read a scenario file; flags given as ``overrides`` (not None) win."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read scenario: {error}") from None
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "rate":
            raw.setdefault("arrival", {})["rates"] = [value]
        else:
            raw[key] = value
    try:
        return Scenario.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(
            "\n".join(f"{path}: {'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors())
        ) from None


def arrival_times(process: str, rate: float, duration_s: float, max_requests: int | None, rng: random.Random) -> list[float]:
    """Send times (s from the step's start) of an open-loop step."""
    times: list[float] = []
    t = 0.0 if process == "constant" else rng.expovariate(rate)
    while t < duration_s and (max_requests is None or len(times) < max_requests):
        times.append(t)
        # Constant: computed from the index, so rounding never adds an extra arrival.
        t = len(times) / rate if process == "constant" else t + rng.expovariate(rate)
    return times


@dataclass
class Record:
    id: str
    step: int
    mix: str
    scheduled_s: float | None  # open loop: the schedule; closed loop: None
    sent_s: float
    latency_s: float
    outcome: str
    status: int | None = None
    images: int = 0


@dataclass
class StepSummary:
    step: int
    offered: float  # requests/s (open loop) or clients (closed loop)
    sent: int
    succeeded: int
    failed: dict[str, int]
    lost: int
    elapsed_s: float
    achieved_rps: float
    throughput_rps: float
    images_per_s: float
    goodput_rps: float
    error_rate: float
    p50_s: float | None
    p90_s: float | None
    p99_s: float | None
    max_s: float | None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(step: int, offered: float, records: list[Record], sent_ids: set[str], slo_s: float) -> StepSummary:
    mine = [r for r in records if r.step == step]
    ok = [r for r in mine if r.outcome == "success"]
    failed: dict[str, int] = {}
    for r in mine:
        if r.outcome != "success":
            failed[r.outcome] = failed.get(r.outcome, 0) + 1
    if mine:
        start = min(r.sent_s if r.scheduled_s is None else r.scheduled_s for r in mine)
        last_send = max(r.sent_s for r in mine)
        end = max(r.sent_s + r.latency_s if r.scheduled_s is None else r.scheduled_s + r.latency_s for r in mine)
    else:
        start = last_send = end = 0.0
    elapsed = max(end - start, 1e-9)
    send_window = max(last_send - start, 1e-9)
    latencies = [r.latency_s for r in ok]
    return StepSummary(
        step=step,
        offered=offered,
        sent=len(sent_ids),
        succeeded=len(ok),
        failed=failed,
        lost=len(sent_ids - {r.id for r in mine}),
        elapsed_s=elapsed,
        achieved_rps=(len(mine) - 1) / send_window if len(mine) > 1 else 0.0,
        throughput_rps=len(ok) / elapsed,
        images_per_s=sum(r.images for r in ok) / elapsed,
        goodput_rps=sum(1 for r in ok if r.latency_s <= slo_s) / elapsed,
        error_rate=(len(mine) - len(ok)) / len(mine) if mine else 0.0,
        p50_s=percentile(latencies, 0.5),
        p90_s=percentile(latencies, 0.9),
        p99_s=percentile(latencies, 0.99),
        max_s=max(latencies) if latencies else None,
    )


@dataclass
class RunResult:
    scenario: dict
    steps: list[StepSummary]
    records: list[Record]
    server: dict = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return sum(step.lost for step in self.steps)


class LoadTest:
    """Runs a scenario against its target; see :func:`run_loadtest`."""

    def __init__(self, scenario: Scenario, progress: bool = True) -> None:
        self.scenario = scenario
        self.progress = progress
        self.records: list[Record] = []
        self.sent: dict[int, set[str]] = {}
        self._rng = random.Random(scenario.seed)
        self._weights = [m.weight for m in scenario.mix]
        self._run_id = f"lt{scenario.seed}-{int(time.time())}"
        self._inflight = 0
        self._stopped = threading.Event()

    def stop(self) -> None:
        """End the run early, from any thread: no new request is sent; those in flight
        finish (or time out) and are recorded as usual."""
        self._stopped.set()

    def _pick(self) -> RequestMix:
        return self._rng.choices(self.scenario.mix, weights=self._weights)[0]

    async def _one(self, client, step: int, index: int, mix: RequestMix, scheduled_at: float | None, origin: float) -> None:
        request_id = f"{self._run_id}-s{step}-{index}"
        self.sent[step].add(request_id)
        self._inflight += 1
        sent_at = time.perf_counter()
        outcome, status, images = "client_error", None, 0
        try:
            response = await client.post(mix.path, json=mix.body, headers={**mix.headers, "X-Request-ID": request_id})
            status = response.status_code
            if 200 <= status < 300:
                outcome = "success"
                try:
                    images = len(response.json().get("images", [])) or 1
                except ValueError:
                    images = 1
            else:
                outcome = f"http_{status}"
        except asyncio.CancelledError:  # the step's backstop gave up on it
            outcome = "timeout"
            raise
        except Exception as error:  # classified: every request ends in exactly one outcome
            import httpx

            if isinstance(error, httpx.TimeoutException):
                outcome = "timeout"
            elif isinstance(error, httpx.TransportError):
                outcome = "connection_error"
            else:
                outcome = "client_error"
        finally:
            done = time.perf_counter()
            start = scheduled_at if scheduled_at is not None else sent_at
            self.records.append(Record(
                id=request_id, step=step, mix=mix.name,
                scheduled_s=None if scheduled_at is None else scheduled_at - origin,
                sent_s=sent_at - origin, latency_s=done - start, outcome=outcome, status=status, images=images,
            ))
            self._inflight -= 1

    async def _open_step(self, client, step: int, rate: float, origin: float) -> None:
        s = self.scenario
        schedule = arrival_times(s.arrival.process, rate, s.duration_s, s.max_requests, self._rng)
        picks = [self._pick() for _ in schedule]
        start = time.perf_counter()
        tasks = []
        for index, (at, mix) in enumerate(zip(schedule, picks)):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._stopped.is_set():
                break
            # Never await a response here: a slow server must not delay the next send.
            tasks.append(asyncio.create_task(self._one(client, step, index, mix, start + at, origin)))
        await self._drain(tasks)

    async def _closed_step(self, client, step: int, clients: int, origin: float) -> None:
        s = self.scenario
        deadline = time.perf_counter() + s.duration_s
        counter = iter(range(10**12))

        async def worker(delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            while time.perf_counter() < deadline and not self._stopped.is_set():
                index = next(counter)
                if s.max_requests is not None and index >= s.max_requests:
                    return
                await self._one(client, step, index, self._pick(), None, origin)

        spacing = s.arrival.ramp_s / clients
        tasks = [asyncio.create_task(worker(i * spacing)) for i in range(clients)]
        # The clients send until the deadline: the backstop counts from there.
        await self._drain(tasks, sending_s=s.duration_s + s.arrival.ramp_s)

    DRAIN_GRACE_S = 10.0

    async def _drain(self, tasks: list[asyncio.Task], sending_s: float = 0.0) -> None:
        # Bounded: each request has the client timeout; this is a backstop past it (and
        # past ``sending_s`` of sends still to come).
        timeout = sending_s + self.scenario.timeout_s + self.DRAIN_GRACE_S
        done, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _report_progress(self, label: list[str]) -> None:
        while True:
            ok = sum(1 for r in self.records if r.outcome == "success")
            sys.stderr.write(
                f"\r{label[0]}  sent {sum(len(v) for v in self.sent.values())}  ok {ok}  "
                f"failed {len(self.records) - ok}  in flight {self._inflight}   "
            )
            sys.stderr.flush()
            await asyncio.sleep(1.0)

    async def run(self) -> RunResult:
        import httpx

        s = self.scenario
        server_before = await scrape(s.target) if s.scrape_metrics else None
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        label = [""]
        reporter = asyncio.create_task(self._report_progress(label)) if self.progress else None
        origin = time.perf_counter()
        try:
            async with httpx.AsyncClient(base_url=s.target, timeout=s.timeout_s, limits=limits) as client:
                for step, offered in enumerate(s.arrival.steps):
                    self.sent[step] = set()
                    if self._stopped.is_set():
                        continue
                    unit = "clients" if s.arrival.process == "closed" else "req/s"
                    label[0] = f"[step {step + 1}/{len(s.arrival.steps)}: {offered:g} {unit}]"
                    if s.arrival.process == "closed":
                        await self._closed_step(client, step, int(offered), origin)
                    else:
                        await self._open_step(client, step, offered, origin)
        finally:
            if reporter is not None:
                reporter.cancel()
                sys.stderr.write("\n")
        server_after = await settled_scrape(s.target) if s.scrape_metrics and server_before else None
        steps = [summarize(i, offered, self.records, self.sent[i], s.slo_s) for i, offered in enumerate(s.arrival.steps)]
        server = server_deltas(server_before, server_after) if server_before and server_after else {}
        return RunResult(s.model_dump(mode="json"), steps, self.records, server)


async def scrape(target: str) -> str | None:
    import httpx

    try:
        async with httpx.AsyncClient(base_url=target, timeout=10.0) as client:
            response = await client.get("/metrics")
        return response.text if response.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def settled_scrape(target: str, interval_s: float = 2.0, timeout_s: float = 30.0) -> str | None:
    """Scrape until the product's counters stop moving: Ray exports metrics every few
    seconds, so the last requests' figures arrive after the run ends."""
    deadline = time.monotonic() + timeout_s
    previous = await scrape(target)
    while previous is not None and time.monotonic() < deadline:
        await asyncio.sleep(interval_s)
        current = await scrape(target)
        if current is None or _counters(current) == _counters(previous):
            return current or previous
        previous = current
    return previous


def _counters(text: str) -> dict[tuple[str, str], float]:
    """The counting series of :func:`_totals`: gauges are left out, since Ray re-exports them
    only for a while after each set, so they come and go between scrapes and never settle."""
    return {key: value for key, value in _totals(text).items() if key[0].endswith(("_total", "_count", "_sum"))}


def _totals(text: str) -> dict[tuple[str, str], float]:
    """(metric, stage) -> value summed over workers, for the product's per-stage series."""
    import re

    sums: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = re.match(r'^ray_kandinsky_serve_([a-z_]+?)(?:\{(.*)\})?\s+(\S+)$', line)
        if not match:
            continue
        name, labels, value = match.groups()
        stage = re.search(r'stage="([^"]+)"', labels or "")
        if stage is None or name.endswith("_bucket"):
            continue
        key = (name, stage.group(1))
        sums[key] = sums.get(key, 0.0) + float(value)
    return sums


def server_deltas(before: str, after: str) -> dict:
    """Per-stage server-side figures over the run, from two /metrics scrapes."""
    a, b = _totals(before), _totals(after)

    def delta(name: str, stage: str) -> float:
        return b.get((name, stage), 0.0) - a.get((name, stage), 0.0)

    stages = sorted({stage for (_, stage) in b if stage})
    figures = {}
    for stage in stages:
        batches = delta("stage_batch_size_count", stage)
        steps = delta("denoise_steps_total", stage)
        figures[stage] = {
            "requests": delta("stage_requests_total", stage),
            "errors": delta("stage_errors_total", stage),
            "images": delta("stage_images_total", stage),
            "mean_batch_size": delta("stage_batch_items_total", stage) / batches if batches else None,
            "steps": steps,
            "mean_images_per_step": delta("step_images_total", stage) / steps if steps else None,
        }
    return figures


# --------------------------------------------------------------------------- reports


def write_report(result: RunResult, out_dir: Path) -> dict[str, Path]:
    """records.jsonl, summary.json, summary.md and PNG plots under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "records": out_dir / "records.jsonl",
        "summary_json": out_dir / "summary.json",
        "summary_md": out_dir / "summary.md",
        "latency_cdf": out_dir / "latency_cdf.png",
        "latency_over_time": out_dir / "latency_over_time.png",
        "load_curve": out_dir / "load_curve.png",
    }
    with paths["records"].open("w") as sink:
        for record in result.records:
            sink.write(json.dumps(asdict(record)) + "\n")
    summary = {
        "scenario": result.scenario,
        "steps": [asdict(step) for step in result.steps],
        "lost": result.lost,
        "server": result.server,
        "provenance": provenance(),
    }
    paths["summary_json"].write_text(json.dumps(summary, indent=2))
    paths["summary_md"].write_text(markdown_summary(result))
    _plots(result, paths)
    return paths


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def markdown_summary(result: RunResult) -> str:
    closed = result.scenario["arrival"]["process"] == "closed"
    lines = [
        f"# Load test against {result.scenario['target']}",
        "",
        f"Arrivals: {result.scenario['arrival']['process']}; SLO {result.scenario['slo_s']} s; "
        f"timeout {result.scenario['timeout_s']} s; lost requests: **{result.lost}**",
        "",
        f"| {'clients' if closed else 'offered req/s'} | sent | ok | failed | achieved req/s | throughput req/s | images/s "
        "| goodput req/s | error rate | p50 s | p90 s | p99 s | max s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result.steps:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(s.failed.items())) or "0"
        lines.append(
            f"| {s.offered:g} | {s.sent} | {s.succeeded} | {failed} | {s.achieved_rps:.2f} | {s.throughput_rps:.2f} "
            f"| {s.images_per_s:.2f} | {s.goodput_rps:.2f} | {s.error_rate:.1%} | {_fmt(s.p50_s)} | {_fmt(s.p90_s)} "
            f"| {_fmt(s.p99_s)} | {_fmt(s.max_s)} |"
        )
    if result.server:
        lines += ["", "## Server side (from /metrics)", "", "| stage | requests | errors | images | mean batch | steps | images/step |",
                  "|---|---|---|---|---|---|---|"]
        for stage, f in result.server.items():
            lines.append(
                f"| {stage} | {f['requests']:g} | {f['errors']:g} | {f['images']:g} | {_fmt(f['mean_batch_size'])} "
                f"| {f['steps']:g} | {_fmt(f['mean_images_per_step'])} |"
            )
    return "\n".join(lines) + "\n"


def _plots(result: RunResult, paths: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.records if r.outcome == "success"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for step in result.steps:
        values = sorted(r.latency_s for r in ok if r.step == step.step)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=f"{step.offered:g}")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of successful requests")
    ax.set_title("Latency CDF per step")
    ax.legend(title="step")
    fig.tight_layout()
    fig.savefig(paths["latency_cdf"])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r.sent_s for r in ok], [r.latency_s for r in ok], s=6, label="success")
    bad = [r for r in result.records if r.outcome != "success"]
    if bad:
        ax.scatter([r.sent_s for r in bad], [r.latency_s for r in bad], s=10, marker="x", color="red", label="failed")
    ax.set_xlabel("send time (s)")
    ax.set_ylabel("latency (s)")
    ax.set_title("Latency over time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["latency_over_time"])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    offered = [s.offered for s in result.steps]
    ax.plot(offered, [s.throughput_rps for s in result.steps], marker="o", label="throughput (req/s)")
    ax.plot(offered, [s.goodput_rps for s in result.steps], marker="s", label="goodput (req/s)")
    ax.set_xlabel("clients" if result.scenario["arrival"]["process"] == "closed" else "offered load (req/s)")
    ax.set_ylabel("req/s")
    ax2 = ax.twinx()
    ax2.plot(offered, [s.p99_s if s.p99_s is not None else float("nan") for s in result.steps], marker="^", color="C3", label="p99 (s)")
    ax2.set_ylabel("p99 latency (s)")
    ax.set_title("Throughput and p99 against load")
    handles = ax.get_lines() + ax2.get_lines()
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["load_curve"])
    plt.close(fig)


def run_loadtest(scenario: Scenario, out_dir: Path, progress: bool = True) -> RunResult:
    result = asyncio.run(LoadTest(scenario, progress).run())
    paths = write_report(result, out_dir)
    print(markdown_summary(result))
    print(f"report: {paths['summary_md']} (records, summary.json and plots beside it)")
    return result
