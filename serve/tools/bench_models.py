"""``kandinsky-serve bench models``: several models in one service.

Two measurements on one service, in one run:

* **prior switch**: the same small request, one at a time, on a fine-tuned prior the Prior
  replica holds (hot) and cycling through more fine-tuned priors than a replica keeps
  (every request loads one: cold). Reported as the median latency of each and their ratio,
  with the load times the replica itself measured (``kandinsky_serve_model_switch_seconds``).
* **mixed load**: open-loop Poisson arrivals through the load harness, half Kandinsky 2.1,
  half 2.2 (the family's prior and its fine-tuned ones): per model sent, succeeded, lost,
  throughput and latency.

Without ``--url`` it starts its own service on tiny checkpoints written for the run (2.2,
2.1 and ``--priors`` fine-tuned priors, each replica keeping ``--keep`` of them).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from serve.tools.bench_service import stage_options, start_local_service, stop_service
from serve.tools.provenance import write_result

REQUEST = {"prompt": "a red circle", "width": 64, "height": 64, "prior_steps": 10, "steps": 4, "seed": 1}


def _fine_tuned_copies(prior: Path, count: int, root: Path) -> list[Path]:
    """``count`` copies of ``prior`` with its PriorTransformer's weights moved (seeded): fine-tuned
    priors as ``kandinsky-serve train prior`` writes them (same encoders, own prior weights)."""
    import torch
    from diffusers import PriorTransformer

    paths = []
    for index in range(count):
        out = root / f"prior-ft{index}"
        shutil.copytree(prior, out)
        model = PriorTransformer.from_pretrained(out, subfolder="prior", use_safetensors=True, local_files_only=True)
        generator = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.2 * parameter.std().nan_to_num(0.02) * torch.randn(parameter.shape, generator=generator))
        shutil.rmtree(out / "prior")
        model.save_pretrained(out / "prior", safe_serialization=True)
        paths.append(out)
    return paths


def _start_service(root: Path, priors: int, keep: int, port: int) -> tuple[str, list[str]]:
    from deployments.registry import GENERATION_STAGES
    from serve.training.tiny import make_tiny, make_tiny_21

    tiny, tiny21 = make_tiny(root / "tiny"), make_tiny_21(root / "tiny21")
    fine_tuned = _fine_tuned_copies(tiny.prior, priors, root)
    ids = [f"prior-ft{index}" for index in range(priors)]
    args = {"models": {
        "prior_path": str(tiny.prior), "decoder_path": str(tiny.decoder),
        "prior_21_path": str(tiny21.prior), "decoder_21_path": str(tiny21.decoder),
        "priors": [{"id": model_id, "family": "2.2", "path": str(path)} for model_id, path in zip(ids, fine_tuned)],
    }, "jobs": {"persist": False}}
    options = stage_options(GENERATION_STAGES, max_batch=8)
    for stage in GENERATION_STAGES:
        if stage.role == "prior":  # how many fine-tuned priors one replica keeps loaded
            options[stage.name]["ray_actor_options"]["runtime_env"] = {"env_vars": {"KANDINSKY_PRIORS_PER_REPLICA": str(keep)}}
    return start_local_service(args, options, "bench-models", port), ids


def _timed(client: httpx.Client, body: dict) -> float:
    started = time.perf_counter()
    response = client.post("/v1/text2img", json=body)
    response.raise_for_status()
    return time.perf_counter() - started


def measure_prior_switch(client: httpx.Client, ids: list[str], rounds: int) -> dict:
    """Hot: ``rounds`` requests on one fine-tuned prior; cold: ``rounds`` cycling through all
    of ``ids`` (more than a replica keeps, so each loads its prior)."""
    for model_id in ids:  # warm every code path once
        _timed(client, {**REQUEST, "model": model_id})
    hot = [_timed(client, {**REQUEST, "model": ids[0], "seed": 100 + i}) for i in range(rounds)]
    cold = [_timed(client, {**REQUEST, "model": ids[(i + 1) % len(ids)], "seed": 200 + i}) for i in range(rounds)]
    # Every load the replicas reported (this run's and, on a running service, earlier ones).
    load_sum, loads = _wait_for_loads(client, expected=len(ids) + rounds if len(ids) > 1 else 1)
    return {
        "hot_p50_s": statistics.median(hot), "cold_p50_s": statistics.median(cold),
        "cold_over_hot": statistics.median(cold) / statistics.median(hot),
        "hot_s": hot, "cold_s": cold,
        "loads_reported": loads, "mean_load_s": load_sum / loads if loads else None,
    }


def _metric_sum_count(text: str) -> tuple[float, float]:
    total_sum = total_count = 0.0
    for line in text.splitlines():
        if line.startswith("ray_kandinsky_serve_model_switch_seconds_sum"):
            total_sum += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ray_kandinsky_serve_model_switch_seconds_count"):
            total_count += float(line.rsplit(" ", 1)[1])
    return total_sum, total_count


def _wait_for_loads(client: httpx.Client, expected: int, timeout_s: float = 30.0) -> tuple[float, float]:
    """The switch metric (sum, count) once the replicas have exported ``expected`` loads (or the
    timeout: Ray exports metrics every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = _metric_sum_count(client.get("/metrics").text)
        if now[1] >= expected or time.monotonic() > deadline:
            return now
        time.sleep(0.5)  # polling interval: Ray exports metrics periodically


def measure_mixed_load(url: str, ids: list[str], rate: float, duration: float) -> dict:
    """Half 2.1, half 2.2 (a quarter on the family's prior, a quarter over the fine-tuned ones)."""
    from serve.tools.loadtest import Arrival, LoadTest, RequestMix, Scenario

    body = {k: v for k, v in REQUEST.items() if k != "seed"}
    mix = [RequestMix(name="kandinsky-2-1", weight=0.5, body={**body, "model": "kandinsky-2-1"}),
           RequestMix(name="kandinsky-2-2", weight=0.25, body={**body, "model": "kandinsky-2-2"})]
    mix += [RequestMix(name=model_id, weight=0.25 / len(ids), body={**body, "model": model_id}) for model_id in ids]
    scenario = Scenario(target=url, mix=mix, arrival=Arrival(process="poisson", rates=[rate]), duration_s=duration,
                        timeout_s=120.0, slo_s=30.0, scrape_metrics=False)
    result = asyncio.run(LoadTest(scenario, progress=False).run())
    per_model = {}
    for entry in mix:
        records = [r for r in result.records if r.mix == entry.name]
        ok = [r.latency_s for r in records if r.outcome == "success"]
        per_model[entry.name] = {
            "sent": len(records), "succeeded": len(ok), "failed": len(records) - len(ok),
            "throughput_per_s": len(ok) / duration,
            "p50_s": statistics.median(ok) if ok else None,
            "p99_s": sorted(ok)[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else None,
        }
    return {"rate_per_s": rate, "duration_s": duration, "lost": result.lost, "per_model": per_model}


def bench_models(out: Path, url: str | None = None, priors: int = 4, keep: int = 2, rounds: int = 8,
                 rate: float = 1.0, duration: float = 30.0, port: int = 8020, **_: object) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-models-"))
    started_here = url is None
    try:
        if url is None:
            os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # the load times are read from /metrics
            url, ids = _start_service(root, priors, keep, port)
        else:
            ids = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
                   if m["id"] not in ("kandinsky-2-2", "kandinsky-2-1")]
        _wait_ready(url)
        with httpx.Client(base_url=url, timeout=300.0) as client:
            switch = measure_prior_switch(client, ids, rounds)
        mixed = measure_mixed_load(url, ids, rate, duration)
    finally:
        if started_here:
            stop_service()
        shutil.rmtree(root, ignore_errors=True)
    result = {"benchmark": "models", "url": url, "fine_tuned_priors": ids, "kept_per_replica": keep,
              "request": REQUEST, "prior_switch": switch, "mixed_load": mixed}
    print_tables(result)
    write_result(result, out)
    return result


def _wait_ready(url: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            models = httpx.get(f"{url}/v1/models", timeout=5.0).json()["data"]
            if all(model["loaded"] for model in models):
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)  # polling interval
    raise RuntimeError(f"{url}: the models did not load within {timeout_s:.0f} s")


def print_tables(result: dict) -> None:
    from serve.tools.bench_docs import models_tables

    print("\n" + "\n".join(models_tables(result)))
