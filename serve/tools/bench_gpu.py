"""``kandinsky-serve bench gpu``: the full-size model on one GPU, served against diffusers in-process.

In one run, on one checkpoint (``make-tiny --full-size`` writes the published architectures
with random weights):

1. **diffusers in-process**: ``KandinskyV22PriorPipeline`` + ``KandinskyV22Pipeline`` in this
   process, in ``--dtype`` with their default attention processors (SDPA on torch 2): the
   baseline users would pick. Per size: single-request latency (``--rounds``), sequential
   throughput (1 / p50) and each pipeline's peak CUDA memory (``max_memory_allocated``).
   Freed before the service starts.
2. **served graph**, once per ``--option`` (``NAME=JSON``: the JSON goes into the service's
   ``args.performance``; ``as-configured``, no such key, always runs first): per size,
   single-request latency over HTTP and throughput with 1/4/8/16 concurrent one-image
   requests; per stage, the CUDA memory its replica reports at ``/metrics``
   (``kandinsky_serve_gpu_memory_{allocated,reserved,peak,budget}_bytes``): the allocator's
   peak against the replica's budget (its GPU share × the device's memory), the goal that no
   stage holds more than its config gives it.
3. **open-loop load**: one Denoiser replica per loop policy (``step``, ``request``), as
   ``bench batching`` does: capacity from a closed loop on ``step``, then Poisson arrivals at
   70 % of it for each policy; the p99 ratio.

With ``--url`` it measures a running service (as configured: no option sweep) and deploys the
load part's replicas on the Ray cluster ``RAY_ADDRESS`` names, removing only its own.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from serve.settings import ConfigError
from serve.tools.loadtest import percentile
from serve.tools.bench_service import stage_options, start_local_service, stop_service, wait_ready
from serve.tools.provenance import write_result

TARGETS = {"latency_ratio_max": 1.05, "throughput_ratio_min": 2.0, "p99_step_over_request_max": 0.5}
"""#25's goals: served / diffusers latency at 768², served / diffusers-sequential throughput, p99 at 70 % load."""
LOAD = 0.7
GPU_SHARE = {"denoiser": 0.4}
"""Fraction of the GPU per replica, by stage role (configs/gpu.yaml's split); every other stage 0.1."""
OTHER_SHARE = 0.1
PROMPT = "a red circle on a blue background"
AS_CONFIGURED = "as-configured"
_GAUGE = re.compile(r'^kandinsky_serve_gpu_memory_(allocated|reserved|peak|budget)_bytes\{(.*)\}\s+(\S+)$')


def parse_options(items: list[str] | None) -> dict[str, dict | None]:
    """``["compile={...}"]`` -> {"as-configured": None, "compile": {...}}: each NAME=JSON is one
    service start with that JSON as ``args.performance``."""
    options: dict[str, dict | None] = {AS_CONFIGURED: None}
    for item in items or []:
        name, _, text = item.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--option {item!r}: expected NAME=JSON (a JSON object), {error}") from None
        if not name or not isinstance(value, dict) or name in options:
            raise ConfigError(f"--option {item!r}: expected a new NAME=JSON object, e.g. "
                             'compile=\'{"default": {"compile": true}}\'')
        options[name] = value
    return options


def _summary(values: list[float]) -> dict:
    return {"p50_s": statistics.median(values), "p90_s": percentile(values, 0.9), "min_s": min(values), "n": len(values)}


# ----------------------------------------------------------------------------- diffusers in-process

def diffusers_baseline(prior_path: Path, decoder_path: Path, device: str, dtype: str, sizes: list[int], steps: int,
                       prior_steps: int, rounds: int) -> dict:
    """Per size: latency, sequential throughput and peak CUDA memory of each pipeline."""
    import gc

    import torch
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    load = {"local_files_only": True, "use_safetensors": True, "torch_dtype": getattr(torch, dtype)}
    prior = KandinskyV22PriorPipeline.from_pretrained(prior_path, **load).to(device)
    decoder = KandinskyV22Pipeline.from_pretrained(decoder_path, **load).to(device)
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak(run) -> tuple[object, int | None]:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out = run()
        sync()
        return out, (torch.cuda.max_memory_allocated() if cuda else None)

    out = {}
    for size in sizes:
        memory: dict[str, int | None] = {}

        def once() -> float:
            started = time.perf_counter()
            generator = torch.Generator().manual_seed(1234)
            embeds, memory["prior"] = peak(lambda: prior(PROMPT, num_inference_steps=prior_steps,
                                                         generator=generator).to_tuple())
            _, memory["decoder"] = peak(lambda: decoder(
                image_embeds=embeds[0], negative_image_embeds=embeds[1], height=size, width=size,
                num_inference_steps=steps, generator=torch.Generator().manual_seed(1234), output_type="pil"))
            return time.perf_counter() - started

        once()  # warm-up: lazy initialisation, cuDNN autotuning
        latency = _summary([once() for _ in range(rounds)])
        out[str(size)] = {"latency": latency, "sequential_images_per_s": 1.0 / latency["p50_s"],
                          "peak_memory_bytes": memory}
    prior = decoder = None  # free both pipelines' weights before the served graph loads its own
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- the served graph

def start_service(prior_path: Path, decoder_path: Path, device: str, dtype: str, port: int, max_batch: int,
                  performance: dict | None) -> str:
    """The generation graph on this checkpoint, one replica per stage, sharing the GPU by :data:`GPU_SHARE`."""
    from deployments.registry import GENERATION_STAGES

    args: dict = {"models": {"prior_path": str(prior_path), "decoder_path": str(decoder_path), "device": device,
                             "dtype": dtype}, "jobs": {"persist": False}}
    if performance is not None:
        args["performance"] = performance
    gpu = device.startswith("cuda")
    options = stage_options(GENERATION_STAGES, max_batch, max_ongoing=2 * max_batch)
    for stage in GENERATION_STAGES:
        options[stage.name]["ray_actor_options"]["num_gpus"] = GPU_SHARE.get(stage.role, OTHER_SHARE) if gpu else 0
    return start_local_service(args, options, "bench-gpu", port)


async def _generate(client: httpx.AsyncClient, size: int, steps: int, prior_steps: int, seed: int) -> float:
    started = time.perf_counter()
    response = await client.post("/v1/text2img", json={"prompt": PROMPT, "width": size, "height": size,
                                                       "steps": steps, "prior_steps": prior_steps, "seed": seed})
    response.raise_for_status()
    return time.perf_counter() - started


def stage_memory(metrics_text: str) -> dict[str, dict[str, float]]:
    """``{stage: {"allocated_bytes", "reserved_bytes", "peak_bytes", "budget_bytes", "peak_over_budget"}}``
    from a /metrics text (the largest over replicas; the budget the smallest, the binding one)."""
    out: dict[str, dict[str, float]] = {}
    for line in metrics_text.splitlines():
        match = _GAUGE.match(line)
        stage = match and re.search(r'stage="([^"]+)"', match.group(2))
        if stage:
            row = out.setdefault(stage.group(1), {})
            key, value = f"{match.group(1)}_bytes", float(match.group(3))
            pick = min if key == "budget_bytes" else max
            row[key] = pick(row.get(key, value), value)
    for row in out.values():
        if row.get("peak_bytes") is not None and row.get("budget_bytes"):
            row["peak_over_budget"] = row["peak_bytes"] / row["budget_bytes"]
    return out


def measure_served(url: str, sizes: list[int], steps: int, prior_steps: int, rounds: int, batches: list[int]) -> dict:
    """Per size: single-request latency and throughput at each concurrency; per stage: CUDA memory."""

    async def main() -> dict:
        out: dict = {"sizes": {}}
        async with httpx.AsyncClient(base_url=url, timeout=600.0) as client:
            for size in sizes:
                await _generate(client, size, steps, prior_steps, 0)  # warm-up
                latency = _summary([await _generate(client, size, steps, prior_steps, i) for i in range(rounds)])
                throughput = {}
                # One warm-up at the largest batch: allocations (and compiled graphs) for every smaller one.
                await asyncio.gather(*(_generate(client, size, steps, prior_steps, i) for i in range(max(batches))))
                for batch in batches:
                    started = time.perf_counter()
                    await asyncio.gather(*(_generate(client, size, steps, prior_steps, i) for i in range(batch)))
                    throughput[str(batch)] = batch / (time.perf_counter() - started)
                out["sizes"][str(size)] = {"latency": latency, "images_per_s": throughput}
            response = await client.get("/metrics")
            out["stage_memory"] = stage_memory(response.text) if response.status_code == 200 else {}
        return out

    return asyncio.run(main())


# ----------------------------------------------------------------------------- open-loop load: step vs request

def measure_load(decoder_path: Path, device: str, dtype: str, size: int, steps: int, max_batch: int,
                 duration_s: float, capacity_s: float) -> dict:
    """One Denoiser replica per policy; capacity from ``step``'s closed loop; Poisson at 70 % for each."""
    import ray
    from ray import serve

    from deployments.denoiser import Denoiser
    from deployments.messages import DenoiseParams
    from serve.graph.local_ray import connect_ray
    from serve.tools.bench import _closed_loop, _embeddings, _open_loop

    if not ray.is_initialized():
        connect_ray(logging_level="WARNING", log_to_driver=False)
    dim = json.loads((Path(decoder_path) / "unet" / "config.json").read_text())["encoder_hid_dim"]
    modes = ("step", "request")
    # A small share: the label only places them, and it must fit beside a service measured at --url.
    gpu_share = OTHER_SHARE if device.startswith("cuda") else 0

    def make_request(index: int):
        return _embeddings(dim, index), DenoiseParams(size, size, steps, 4.0, f"bench-gpu-{index}")

    async def main() -> dict:
        targets = [serve.RunTarget(Denoiser.options(
            num_replicas=1, max_ongoing_requests=max(64, 4 * max_batch),
            ray_actor_options={"num_cpus": 0.1, "num_gpus": gpu_share},
            user_config={"batching": mode, "max_batch_size": max_batch, "batch_wait_timeout_s": 0.002, "torch_threads": 1},
        ).bind(str(decoder_path), device, dtype), name=f"bench-gpu-{mode}", route_prefix=None) for mode in modes]
        handles = dict(zip(modes, serve.run_many(targets)))
        try:
            await _closed_loop(handles["step"], make_request, max_batch, min(capacity_s, 5.0))  # warm-up
            capacity = await _closed_loop(handles["step"], make_request, 2 * max_batch, capacity_s)
            points = {mode: await _open_loop(handle, make_request, LOAD * capacity, duration_s, seed=70,
                                             timeout_s=600) for mode, handle in handles.items()}
        finally:
            for mode in modes:
                serve.delete(f"bench-gpu-{mode}", _blocking=False)
            while any(f"bench-gpu-{mode}" in serve.status().applications for mode in modes):
                await asyncio.sleep(0.2)  # polling until Serve has removed them
        return {"size": size, "max_batch": max_batch, "capacity_rps": capacity, "load": LOAD,
                "offered_rps": LOAD * capacity, "modes": points,
                "p99_step_over_request": points["step"]["p99_s"] / points["request"]["p99_s"]}

    return asyncio.run(main())


# ----------------------------------------------------------------------------- the command

def _checkpoint(checkpoint: str | None, tiny: bool, scratch: Path) -> tuple[Path, Path]:
    if tiny:
        from serve.training.tiny import make_tiny

        written = make_tiny(scratch / "tiny")
        return written.prior, written.decoder
    if not checkpoint:
        raise ConfigError("bench gpu: give --checkpoint DIR (with prior/ and decoder/, e.g. from "
                         "`make-tiny --full-size DIR`) or --tiny")
    return Path(checkpoint) / "prior", Path(checkpoint) / "decoder"


def bench_gpu(checkpoint: str | None, tiny: bool, url: str | None, device: str, dtype: str | None, sizes: str,
              steps: int, prior_steps: int, rounds: int, batches: str, load_size: int | None, load_duration: float,
              capacity_duration: float, option: list[str] | None, port: int, skip: str, out: Path) -> dict:
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    size_list = [int(s) for s in sizes.split(",")]
    batch_list = [int(b) for b in batches.split(",")]
    options = parse_options(option)
    if url and len(options) > 1:
        raise ConfigError("bench gpu: --option needs the bench's own service (it restarts it per option), not --url")
    parts = {"diffusers", "served", "load"} - set(filter(None, skip.split(",")))
    result: dict = {"benchmark": "gpu", "device": device, "dtype": dtype, "sizes": size_list, "steps": steps,
                    "prior_steps": prior_steps, "rounds": rounds, "batches": batch_list, "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        prior_path, decoder_path = _checkpoint(checkpoint, tiny, Path(scratch))
        result["checkpoint"] = str(prior_path.parent)
        if device.startswith("cuda"):
            import torch

            result["gpu"] = torch.cuda.get_device_name()
        if "diffusers" in parts:
            result["diffusers"] = diffusers_baseline(prior_path, decoder_path, device, dtype, size_list, steps,
                                                     prior_steps, rounds)
            write_result(result, out)  # each part as it ends: a run cut short keeps what it measured
        started_here = url is None
        try:
            if "served" in parts:
                result["served"] = {}
                for name, performance in options.items():
                    if started_here:
                        url = start_service(prior_path, decoder_path, device, dtype, port, max(batch_list), performance)
                    wait_ready(url, 900.0, "full-size weights load for minutes")
                    result["served"][name] = {"performance": performance, **measure_served(
                        url, size_list, steps, prior_steps, rounds, batch_list)}
                    write_result(result, out)
                    if started_here:
                        from ray import serve

                        serve.delete("bench-gpu")
            if "load" in parts:
                result["load"] = measure_load(decoder_path, device, dtype, load_size or size_list[-1], steps,
                                              max(batch_list), load_duration, capacity_duration)
        finally:
            if started_here:
                stop_service()
    result["service"] = "started by the bench" if started_here else url
    result["ratios"] = ratios(result)
    print_table(result)
    write_result(result, out)
    return result


def ratios(result: dict) -> dict:
    """Served / diffusers latency (p50) and served throughput / diffusers sequential, per option and size."""
    out: dict = {}
    for name, served in result.get("served", {}).items():
        for size, row in served["sizes"].items():
            base = result.get("diffusers", {}).get(size)
            if base:
                out.setdefault(name, {})[size] = {
                    "latency_served_over_diffusers": row["latency"]["p50_s"] / base["latency"]["p50_s"],
                    "best_throughput_over_diffusers_sequential":
                        max(row["images_per_s"].values()) / base["sequential_images_per_s"],
                }
    if "load" in result:
        out["p99_step_over_request_at_70"] = result["load"]["p99_step_over_request"]
    return out


def print_table(result: dict) -> None:
    gib = 2 ** 30
    print(f"\nbench gpu: {result.get('gpu', result['device'])}, {result['dtype']}, prior {result['prior_steps']} "
          f"+ decoder {result['steps']} steps")
    batches = result["batches"]
    print(f"{'system':<28}{'size':>6}{'p50 s':>9}{'min s':>9}" + "".join(f"{f'img/s @{b}':>11}" for b in batches))
    for size, row in result.get("diffusers", {}).items():
        print(f"{'diffusers in-process':<28}{size:>6}{row['latency']['p50_s']:>9.3f}{row['latency']['min_s']:>9.3f}"
              + f"{row['sequential_images_per_s']:>11.2f}" + " " * 11 * (len(batches) - 1) + "  (sequential)")
    for name, served in result.get("served", {}).items():
        for size, row in served["sizes"].items():
            print(f"{'served: ' + name:<28}{size:>6}{row['latency']['p50_s']:>9.3f}{row['latency']['min_s']:>9.3f}"
                  + "".join(f"{row['images_per_s'][str(b)]:>11.2f}" for b in batches))
    for name, by_size in result["ratios"].items():
        if isinstance(by_size, dict):
            for size, r in by_size.items():
                print(f"{name} {size}²: served / diffusers latency {r['latency_served_over_diffusers']:.3f} "
                      f"(goal <= {TARGETS['latency_ratio_max']}), best throughput / diffusers sequential "
                      f"{r['best_throughput_over_diffusers_sequential']:.2f}x (goal >= {TARGETS['throughput_ratio_min']})")
    for size, row in result.get("diffusers", {}).items():
        memory = {k: f"{v / gib:.2f} GiB" for k, v in row["peak_memory_bytes"].items() if v is not None}
        if memory:
            print(f"diffusers peak memory {size}²: {memory}")
    for name, served in result.get("served", {}).items():
        for stage, row in served.get("stage_memory", {}).items():
            within = row.get("peak_over_budget")
            print(f"served ({name}) {stage}: allocated {row.get('allocated_bytes', 0) / gib:.2f} GiB, "
                  f"reserved {row.get('reserved_bytes', 0) / gib:.2f} GiB, peak {row.get('peak_bytes', 0) / gib:.2f} GiB"
                  + (f" of a {row['budget_bytes'] / gib:.2f} GiB budget ({within:.0%}{'' if within <= 1 else ': OVER'})"
                     if within is not None else ""))
    if "load" in result:
        load = result["load"]
        print(f"open loop at {load['load']:.0%} of {load['capacity_rps']:.2f} req/s ({load['size']}², one Denoiser):")
        for mode, point in load["modes"].items():
            print(f"  {mode:<8} p50 {point['p50_s']:.2f} s  p99 {point['p99_s']:.2f} s  "
                  f"{point['completed']}/{point['sent']} done, {point['errors']} errors")
        print(f"  p99 step / request: {load['p99_step_over_request']:.2f} (goal <= {TARGETS['p99_step_over_request_max']})")
