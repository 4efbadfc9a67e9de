"""``kandinsky-serve bench latency``: served graph vs diffusers in-process, one run.

Both sides use the same checkpoints, seed and parameters. Rounds alternate
(in-process, then served) so machine noise hits both alike; the ratio of the
medians is the figure of merit.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.parse
from pathlib import Path

from serve.tools.loadtest import arrival_times, percentile
from serve.tools.provenance import write_result

TARGET_RATIO = 1.05  # #30: served / in-process at 64², 50 steps, 2 CPU cores


def bench_latency(config: str, size: int, steps: int, prior_steps: int, rounds: int, out: Path,
                  breakdown: bool = False, url: str | None = None) -> dict:
    """``url``: measure a service already running there (on the config's checkpoints) instead of
    starting one."""
    import httpx
    import torch
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    from deployments.registry import stage_for
    from serve.graph.service import start_service
    from serve.graph.build import resolve_model_paths
    from serve.settings import load_config

    config = load_config(config)
    paths = resolve_model_paths(config.service.models)
    device = config.service.models.device
    denoiser_threads = (config.deployment_options.get(stage_for("denoiser", "text2img").name, {}).get("user_config") or {}).get("torch_threads")
    if denoiser_threads:
        torch.set_num_threads(denoiser_threads)  # same intra-op threads as the served denoiser

    load = {"local_files_only": True, "use_safetensors": True, "torch_dtype": getattr(torch, config.service.models.dtype)}
    prior_pipe = KandinskyV22PriorPipeline.from_pretrained(paths.prior, **load).to(device)
    decoder_pipe = KandinskyV22Pipeline.from_pretrained(paths.decoder, **load).to(device)
    prior_pipe.set_progress_bar_config(disable=True)
    decoder_pipe.set_progress_bar_config(disable=True)

    prompt, seed = "a red circle on a blue background", 1234

    def in_process() -> float:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        embeds, negative = prior_pipe(prompt, num_inference_steps=prior_steps, generator=generator).to_tuple()
        generator = torch.Generator().manual_seed(seed)
        decoder_pipe(
            image_embeds=embeds, negative_image_embeds=negative, height=size, width=size,
            num_inference_steps=steps, generator=generator, output_type="pil",
        )
        return time.perf_counter() - started

    started_here = url is None
    if started_here:
        url = start_service(config)
    body = {"prompt": prompt, "width": size, "height": size, "steps": steps, "prior_steps": prior_steps, "seed": seed}
    client = httpx.Client(base_url=url, timeout=120.0)

    hops: list[dict[str, float]] = []

    def served() -> float:
        started = time.perf_counter()
        response = client.post("/v1/text2img", json=body)
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        hops.append({"client": elapsed * 1000.0, **parse_server_timing(response.headers.get("Server-Timing", ""))})
        return elapsed

    for _ in range(2):  # warm-up: first calls pay for lazy initialisation on both sides
        in_process()
        served()
    hops.clear()
    samples: dict[str, list[float]] = {"in_process": [], "served": []}
    for _ in range(rounds):
        samples["in_process"].append(in_process())
        samples["served"].append(served())
    client.close()
    if started_here:
        from ray import serve

        serve.shutdown()

    rows = {
        name: {
            "p50_ms": statistics.median(values) * 1000,
            "p90_ms": percentile(values, 0.9) * 1000,
            "min_ms": min(values) * 1000,
            "mean_ms": statistics.fmean(values) * 1000,
        }
        for name, values in samples.items()
    }
    ratio = rows["served"]["p50_ms"] / rows["in_process"]["p50_ms"]
    result = {
        "benchmark": "latency",
        "size": size,
        "steps": steps,
        "prior_steps": prior_steps,
        "rounds": rounds,
        "service": "started by the bench" if started_here else url,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "results": rows,
        "samples_s": samples,
        "ratio_p50": ratio,
        "target_ratio": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
    }
    print(f"\nsingle-request latency, {size}x{size}, prior {prior_steps} + decoder {steps} steps, {rounds} rounds")
    print(f"{'':<12}{'p50 ms':>10}{'p90 ms':>10}{'min ms':>10}{'mean ms':>10}")
    for name, row in rows.items():
        print(f"{name:<12}{row['p50_ms']:>10.1f}{row['p90_ms']:>10.1f}{row['min_ms']:>10.1f}{row['mean_ms']:>10.1f}")
    print(f"served / in-process (p50): {ratio:.3f}  (target <= {TARGET_RATIO}: {'met' if result['met'] else 'MISSED'})")
    if breakdown:
        result["breakdown"] = latency_breakdown(hops)
        result["breakdown"]["in_process_ms"] = rows["in_process"]["p50_ms"]
        print_breakdown(result["breakdown"])
    write_result(result, out)
    return result


def bench_hostile(**options) -> dict:
    """``bench hostile`` lives in :mod:`serve.tools.hostile`."""
    from serve.tools.hostile import bench_hostile as run

    return run(**options)


def bench_models(**options) -> dict:
    """See :mod:`serve.tools.bench_models`."""
    from serve.tools.bench_models import bench_models as run

    return run(**options)


def bench_sweep(**options) -> dict:
    """See :mod:`serve.tools.bench_sweep`."""
    from serve.tools.bench_sweep import bench_sweep as run

    return run(**options)


def bench_understanding(**options) -> dict:
    """See :mod:`serve.tools.bench_understanding`."""
    from serve.tools.bench_understanding import bench_understanding as run

    return run(**options)


def bench_quality(**options) -> dict:
    """See :mod:`serve.tools.bench_quality`."""
    from serve.tools.bench_quality import bench_quality as run

    return run(**options)


def bench_movq_memory(**options) -> dict:
    """See :mod:`serve.tools.bench_movq`."""
    from serve.tools.bench_movq import bench_movq_memory as run

    return run(**options)


def parse_server_timing(header: str) -> dict[str, float]:
    """``name;dur=ms, ...`` (the ingress's ``Server-Timing``) as ``{name: ms}``."""
    found = {}
    for entry in filter(None, (part.strip() for part in header.split(","))):
        name, _, rest = entry.partition(";")
        for parameter in rest.split(";"):
            key, _, value = parameter.strip().partition("=")
            if key == "dur":
                found[name] = float(value)
    return found


def latency_breakdown(samples: list[dict[str, float]]) -> dict:
    """Medians of where a served request's time goes, per hop, from each response's Server-Timing.

    ``proxy_and_http``: the client's time minus the ingress's (HTTP proxy, routing to the ingress
    replica, JSON and base64 of the response); per stage: the call's round trip from the ingress
    split into queue, compute and ``transport`` (the rest: routing, serialising the stage message,
    the object store); ``ingress_own``: the ingress's time outside every stage call (plan, job and
    metrics bookkeeping). Stage calls of one text-to-image request run one after another."""
    if not samples:
        return {}
    stages = [name.removesuffix("-call") for name in samples[0] if name.endswith("-call")]

    def median(values) -> float:
        return statistics.median(values)

    result: dict = {
        "client_ms": median([s["client"] for s in samples]),
        "ingress_total_ms": median([s["total"] for s in samples]),
        "proxy_and_http_ms": median([s["client"] - s["total"] for s in samples]),
        "stages": {},
    }
    for stage in stages:
        call = [s[f"{stage}-call"] for s in samples]
        queue = [s[f"{stage}-queue"] for s in samples]
        compute = [s[f"{stage}-compute"] for s in samples]
        result["stages"][stage] = {
            "call_ms": median(call),
            "queue_ms": median(queue),
            "compute_ms": median(compute),
            "transport_ms": median([c - q - k for c, q, k in zip(call, queue, compute)]),
        }
    result["ingress_own_ms"] = median([s["total"] - sum(s[f"{stage}-call"] for stage in stages) for s in samples])
    result["compute_ms"] = median([sum(s[f"{stage}-compute"] for stage in stages) for s in samples])
    result["overhead_ms"] = result["client_ms"] - result["compute_ms"]
    return result


def print_breakdown(breakdown: dict) -> None:
    print("\nwhere a served request's time goes (p50 ms)")
    print(f"{'hop':<34}{'ms':>9}")
    print(f"{'client, end to end':<34}{breakdown['client_ms']:>9.1f}")
    print(f"{'  HTTP proxy + response':<34}{breakdown['proxy_and_http_ms']:>9.1f}")
    print(f"{'  ingress, in total':<34}{breakdown['ingress_total_ms']:>9.1f}")
    for stage, row in breakdown["stages"].items():
        print(f"{'    ' + stage + ' call':<34}{row['call_ms']:>9.1f}   queue {row['queue_ms']:.1f}, "
              f"compute {row['compute_ms']:.1f}, transport {row['transport_ms']:.1f}")
    print(f"{'    ingress own work':<34}{breakdown['ingress_own_ms']:>9.1f}")
    print(f"{'stage compute, summed':<34}{breakdown['compute_ms']:>9.1f}")
    print(f"{'overhead (client - compute)':<34}{breakdown['overhead_ms']:>9.1f}")
    print(f"{'in-process pipeline':<34}{breakdown['in_process_ms']:>9.1f}")


# --------------------------------------------------------------------------- batching

BATCHING_LOADS = (0.3, 0.7, 1.0)
BATCHING_MODES = ("request", "request-when-idle", "step")


def denoiser_app(decoder_path, mode: str, max_batch: int, torch_threads: int = 1, num_cpus: float = 1.0):
    """One Denoiser replica with loop policy ``mode``, as an application to run."""
    from deployments.denoiser import Denoiser

    deployment = Denoiser.options(
        num_replicas=1,
        max_ongoing_requests=max(64, 4 * max_batch),
        ray_actor_options={"num_cpus": num_cpus},
        user_config={"batching": mode, "max_batch_size": max_batch, "batch_wait_timeout_s": 0.002, "torch_threads": torch_threads},
    )
    return deployment.bind(str(decoder_path))


def deploy_denoiser(decoder_path, mode: str, max_batch: int, app_name: str, torch_threads: int = 1,
                    num_cpus: float = 1.0):
    """One Denoiser replica as an application of its own; returns its handle."""
    from ray import serve

    return serve.run(denoiser_app(decoder_path, mode, max_batch, torch_threads, num_cpus), name=app_name,
                     route_prefix=None)


def _embeddings(dim: int, seed: int):
    import numpy as np

    from deployments.messages import ImageEmbeddings

    rng = np.random.default_rng(seed)
    return ImageEmbeddings(
        rng.standard_normal((1, dim)).astype("float32"), rng.standard_normal((1, dim)).astype("float32"), [seed]
    )


async def _closed_loop(handle, make_request, concurrency: int, duration_s: float) -> float:
    """Saturation throughput (requests/s) with ``concurrency`` clients for ``duration_s``."""
    import asyncio

    deadline = time.perf_counter() + duration_s
    done = 0

    async def client(index: int) -> None:
        nonlocal done
        i = index
        while time.perf_counter() < deadline:
            await handle.generate.remote(*make_request(i))
            done += 1
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return done / (time.perf_counter() - started)


async def _open_loop(handle, make_request, rate: float, duration_s: float, seed: int, timeout_s: float) -> dict:
    """Poisson arrivals at ``rate``/s for ``duration_s``; latency from each scheduled send time."""
    import asyncio
    import random

    schedule = arrival_times("poisson", rate, duration_s, None, random.Random(seed))
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter() + 0.05
    finished_at = start

    async def one(index: int, at: float) -> None:
        nonlocal errors, finished_at
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await asyncio.wait_for(handle.generate.remote(*make_request(index)), timeout_s)
            now = time.perf_counter()
            latencies.append(now - (start + at))  # from the scheduled time: no coordinated omission
            finished_at = max(finished_at, now)
        except Exception:
            errors += 1

    await asyncio.gather(*(one(i, at) for i, at in enumerate(schedule)))
    elapsed = max(finished_at - start, duration_s)
    return {
        "sent": len(schedule),
        "completed": len(latencies),
        "errors": errors,
        "throughput_rps": len(latencies) / elapsed,
        "p50_s": percentile(latencies, 0.5),
        "p90_s": percentile(latencies, 0.9),
        "p99_s": percentile(latencies, 0.99),
    }


def bench_batching(config: str, size: int, steps: int, max_batch: int, duration: float,
                   capacity_duration: float, out: Path) -> dict:
    import asyncio

    import ray
    from ray import serve

    from deployments.messages import DenoiseParams
    from serve.graph.build import resolve_model_paths
    from serve.graph.local_ray import connect_ray
    from serve.settings import load_config

    duration_s, capacity_s = duration, capacity_duration
    config = load_config(config)
    decoder_path = resolve_model_paths(config.service.models).decoder
    if not ray.is_initialized():  # RAY_ADDRESS: measure on a running cluster (only this bench's apps are removed)
        connect_ray(logging_level="WARNING", log_to_driver=False)
    dim = json.loads((Path(decoder_path) / "unet" / "config.json").read_text())["encoder_hid_dim"]

    def make_request(index: int):
        return _embeddings(dim, index), DenoiseParams(size, size, steps, 4.0, f"bench-{index}")

    async def capacity_of(handle) -> float:
        await _closed_loop(handle, make_request, max_batch, min(2.0, capacity_s))  # warm-up
        return await _closed_loop(handle, make_request, 2 * max_batch, capacity_s)

    async def load_points(handle, rates: list[float]) -> list[dict]:
        points = []
        for load, rate in zip(BATCHING_LOADS, rates):
            before = await handle.loop_stats.remote()
            result = await _open_loop(handle, make_request, rate, duration_s, seed=int(load * 100), timeout_s=120)
            after = await handle.loop_stats.remote()
            steps_run = after["steps"] - before["steps"]
            result.update(
                load=load, offered_rps=rate,
                mean_batch_per_step=(after["item_steps"] - before["item_steps"]) / steps_run if steps_run else 0.0,
            )
            points.append(result)
        return points

    async def main() -> dict:
        # One replica per mode, all deployed at once (each measured alone; the idle ones wait
        # on an event). Capacity: the best mode's saturation throughput, measured first, so
        # every mode is offered exactly the same rates.
        targets = [serve.RunTarget(denoiser_app(decoder_path, mode, max_batch, num_cpus=1 / len(BATCHING_MODES)),
                                   name=f"bench-{mode}", route_prefix=None) for mode in BATCHING_MODES]
        handles = dict(zip(BATCHING_MODES, serve.run_many(targets)))  # started together, not one by one
        try:
            capacities = {mode: await capacity_of(handle) for mode, handle in handles.items()}
            capacity = max(capacities.values())
            rates = [load * capacity for load in BATCHING_LOADS]
            modes = {mode: {"capacity_rps": capacities[mode], "points": await load_points(handle, rates)}
                     for mode, handle in handles.items()}
        finally:
            for mode in handles:
                serve.delete(f"bench-{mode}", _blocking=False)
            while any(f"bench-{mode}" in serve.status().applications for mode in handles):
                await asyncio.sleep(0.2)  # polling until Serve has removed them
        return {"capacities_rps": capacities, "capacity_rps": capacity, "modes": modes}

    measured = asyncio.run(main())
    by_mode = {mode: {p["load"]: p for p in measured["modes"][mode]["points"]} for mode in BATCHING_MODES}
    p99_ratio_70 = by_mode["step"][0.7]["p99_s"] / by_mode["request"][0.7]["p99_s"]
    throughput_ratio_100 = by_mode["step"][1.0]["throughput_rps"] / by_mode["request"][1.0]["throughput_rps"]
    idle = by_mode["request-when-idle"]
    idle_p99_ratio_70 = by_mode["step"][0.7]["p99_s"] / idle[0.7]["p99_s"]
    idle_throughput_ratio_100 = by_mode["step"][1.0]["throughput_rps"] / idle[1.0]["throughput_rps"]
    result = {
        "benchmark": "batching",
        "size": size, "steps": steps, "max_batch": max_batch, "duration_s": duration_s,
        **measured,
        "p99_step_over_request_at_70": p99_ratio_70,
        "throughput_step_over_request_at_100": throughput_ratio_100,
        "p99_step_over_request_when_idle_at_70": idle_p99_ratio_70,
        "throughput_step_over_request_when_idle_at_100": idle_throughput_ratio_100,
        "targets": {"p99_ratio_at_70_max": 0.6, "throughput_ratio_at_100_min": 1.0},
        "met": p99_ratio_70 <= 0.6 and throughput_ratio_100 >= 1.0,
    }
    capacities = ", ".join(f"{mode} {rps:.2f}" for mode, rps in measured["capacities_rps"].items())
    print(f"\none denoiser replica, {size}x{size}, {steps} steps, max batch {max_batch}, "
          f"capacity {measured['capacity_rps']:.2f} req/s ({capacities}), {duration_s:.0f} s per point")
    print(f"{'mode':<19}{'load':>6}{'offered/s':>11}{'achieved/s':>12}{'p50 s':>8}{'p90 s':>8}{'p99 s':>8}"
          f"{'batch/step':>12}{'sent':>6}{'err':>5}")
    for mode in BATCHING_MODES:
        for p in measured["modes"][mode]["points"]:
            print(f"{mode:<19}{p['load']:>6.0%}{p['offered_rps']:>11.2f}{p['throughput_rps']:>12.2f}{p['p50_s']:>8.2f}"
                  f"{p['p90_s']:>8.2f}{p['p99_s']:>8.2f}{p['mean_batch_per_step']:>12.2f}{p['sent']:>6}{p['errors']:>5}")
    print(f"p99 step / request at 70%: {p99_ratio_70:.2f} (target <= 0.6)   "
          f"throughput step / request at 100%: {throughput_ratio_100:.2f} (target >= 1.0)   "
          f"{'met' if result['met'] else 'MISSED'}")
    print(f"against request-when-idle: p99 ratio at 70% {idle_p99_ratio_70:.2f}, "
          f"throughput ratio at 100% {idle_throughput_ratio_100:.2f}")
    write_result(result, out)
    return result


# --------------------------------------------------------------------------- compare

COMPARE_RATES = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0)
COMPARE_SYSTEMS = ("in-process", "monolith", "graph")


def parse_rates(text: str) -> tuple[float, ...]:
    """``"0.5,1,2"`` -> (0.5, 1.0, 2.0), rising, each in (0, 1000]."""
    try:
        rates = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--rates {text!r}: a comma-separated list of requests/s, e.g. 0.5,1,2") from None
    if not rates or any(not 0 < r <= 1000 for r in rates) or list(rates) != sorted(rates):
        raise ValueError(f"--rates {text!r}: rising requests/s, each above 0 and at most 1000")
    return rates


def _wait_for_http(url: str, timeout_s: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # polling interval
    raise RuntimeError(f"{url} did not come up within {timeout_s:.0f} s")


JOINED_MONOLITH_ROUTE = "/bench-monolith"


def bench_compare(config: str, size: int, steps: int, prior_steps: int, duration: float,
                  slo: float, port: int, out: Path, rates: str | None = None, url: str | None = None) -> dict:
    """Drive the same Poisson scenario at rising rates against each system in turn.

    ``url``: the graph is the one already served there, and the monolith is deployed beside
    it (route ``/bench-monolith`` on the same proxy, cluster from ``RAY_ADDRESS``) and removed
    after; nothing else of that Serve instance is touched. Without it, a local Ray and Serve
    are started on ``port`` and shut down after."""
    import asyncio
    import subprocess
    import sys

    import ray
    from ray import serve

    from serve.tools.baselines import Monolith
    from serve.graph.local_ray import connect_ray, init_local_ray
    from serve.graph.service import start_service
    from serve.graph.build import resolve_model_paths
    from serve.tools.loadtest import LoadTest, RequestMix, Scenario
    from serve.settings import load_config

    step_duration_s, slo_s = duration, slo
    sweep_rates = parse_rates(rates) if rates else COMPARE_RATES
    config = load_config(config)
    paths = resolve_model_paths(config.service.models)
    prior_path, decoder_path = paths.prior, paths.decoder
    body = {"prompt": "a red circle on a blue background", "width": size, "height": size,
            "steps": steps, "prior_steps": prior_steps, "seed": 1}
    # The in-process server gets its own port: Ray Serve's proxy keeps `port` after an app is deleted.
    targets = {"in-process": f"http://127.0.0.1:{port + 1}", "monolith": f"http://127.0.0.1:{port}",
               "graph": f"http://127.0.0.1:{port}"}
    if url is not None:
        parts = urllib.parse.urlsplit(url)
        targets.update(graph=url.rstrip("/"), monolith=f"{parts.scheme}://{parts.netloc}{JOINED_MONOLITH_ROUTE}")
    graph_cpus = sum(
        (opts.get("ray_actor_options") or {}).get("num_cpus", 0) * (opts.get("num_replicas") or 1)
        for opts in config.deployment_options.values()
    )

    def step(target: str, rate: float, seed: int) -> dict:
        scenario = Scenario(
            target=target, mix=[RequestMix(name="text2img", body=body)],
            arrival={"process": "poisson", "rates": [rate]}, duration_s=step_duration_s,
            timeout_s=max(60.0, 6 * slo_s), slo_s=slo_s, seed=seed, scrape_metrics=False,
        )
        result = asyncio.run(LoadTest(scenario, progress=False).run())
        summary = vars(result.steps[0]).copy()
        summary["sustainable"] = (
            result.lost == 0 and not summary["failed"] and summary["p99_s"] is not None and summary["p99_s"] <= slo_s
        )
        print(f"  {rate:>5.2f} req/s: throughput {summary['throughput_rps']:.2f}/s  p50 {summary['p50_s'] or 0:.2f} s"
              f"  p99 {summary['p99_s'] or 0:.2f} s  failed {summary['failed'] or 0}", flush=True)
        return summary

    def sweep(target: str) -> list[dict]:
        points = []
        for index, rate in enumerate(sweep_rates):
            points.append(step(target, rate, seed=index))
            if not points[-1]["sustainable"]:
                break  # past capacity: higher rates only queue more
        return points

    results: dict[str, dict] = {}

    def measure(name: str) -> None:
        """Sweep the rates, then one step at 70 % of the monolith's capacity (the monolith runs first)."""
        print(f"{name}:", flush=True)
        target = targets[name]
        _wait_for_http(f"{target}/docs")
        step(target, 0.5, seed=99)  # warm-up, not recorded
        points = sweep(target)
        sustainable = [p for p in points if p["sustainable"]]
        results[name] = {
            "points": points,
            "max_sustainable_rps": max((p["offered"] for p in sustainable), default=0.0),
            "throughput_at_max_rps": max((p["throughput_rps"] for p in sustainable), default=0.0),
        }
        results[name]["at_load"] = step(target, load_at_70(), seed=100)

    def load_at_70() -> float:
        return 0.7 * results["monolith"]["max_sustainable_rps"] or 0.5

    def with_system(name: str, action) -> None:
        if name == "in-process":
            process = subprocess.Popen(
                [sys.executable, "-m", "serve.tools.baselines", "inprocess", "--port", str(port + 1),
                 "--prior", str(prior_path), "--decoder", str(decoder_path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                action(name)
            finally:
                process.terminate()
                process.wait(timeout=30)
        elif name == "monolith":
            cpus = graph_cpus
            if url is not None:
                connect_ray(logging_level="WARNING", log_to_driver=False)
                app_name, route = JOINED_MONOLITH_ROUTE.strip("/"), JOINED_MONOLITH_ROUTE
                # Logical CPUs only place it; on a shared cluster take what is free.
                cpus = min(graph_cpus, ray.available_resources().get("CPU", 0.0))
            else:
                if not ray.is_initialized():
                    init_local_ray(logging_level="WARNING", log_to_driver=False)
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                app_name, route = "monolith", "/"
            app = Monolith.options(ray_actor_options={"num_cpus": cpus}).bind(str(prior_path), str(decoder_path))
            serve.run(app, name=app_name, route_prefix=route)
            try:
                action(name)
            finally:
                serve.delete(app_name)
        elif url is not None:
            action(name)  # the graph already served there
        else:
            start_service(config, host="127.0.0.1", port=port)
            try:
                action(name)
            finally:
                serve.delete(config.app_name)

    # Each system is started once; the monolith first, since its capacity sets the common load.
    for name in sorted(COMPARE_SYSTEMS, key=lambda n: n != "monolith"):
        with_system(name, measure)
    at_load = load_at_70()
    if url is None:
        serve.shutdown()

    graph = results["graph"]
    report = {
        "benchmark": "compare", "size": size, "steps": steps, "prior_steps": prior_steps, "slo_s": slo_s,
        "step_duration_s": step_duration_s, "cpus_per_system": graph_cpus, "load_at_70pct_monolith_rps": at_load,
        "systems": results, "graph_service": url or "started by the bench",
        "throughput_graph_over_monolith": (
            graph["max_sustainable_rps"] / results["monolith"]["max_sustainable_rps"]
            if results["monolith"]["max_sustainable_rps"] else None
        ),
        "p99_graph_over_monolith_at_load": (
            graph["at_load"]["p99_s"] / results["monolith"]["at_load"]["p99_s"]
            if results["monolith"]["at_load"]["p99_s"] else None
        ),
        "targets": {"throughput_ratio_min": 1.3, "p99_ratio_max": 1.0},
    }
    print(f"\nsame scenario (Poisson, {size}x{size}, prior {prior_steps} + decoder {steps} steps, SLO {slo_s} s, "
          f"{step_duration_s:.0f} s per rate step); load for p50/p99: {at_load:.2f} req/s = 70% of the monolith's capacity")
    print(f"{'system':<12}{'max req/s':>11}{'x graph':>9}{'p50 s':>8}{'p99 s':>8}{'p99 x graph':>13}")
    for name in COMPARE_SYSTEMS:
        r = results[name]
        p50, p99 = r["at_load"]["p50_s"], r["at_load"]["p99_s"]
        ratio = r["max_sustainable_rps"] / graph["max_sustainable_rps"] if graph["max_sustainable_rps"] else float("nan")
        p99_ratio = p99 / graph["at_load"]["p99_s"] if p99 and graph["at_load"]["p99_s"] else float("nan")
        print(f"{name:<12}{r['max_sustainable_rps']:>11.2f}{ratio:>9.2f}{p50 or float('nan'):>8.2f}"
              f"{p99 or float('nan'):>8.2f}{p99_ratio:>13.2f}")
    print(f"graph / monolith throughput: {report['throughput_graph_over_monolith']}  (goal >= 1.3); "
          f"graph / monolith p99 at load: {report['p99_graph_over_monolith_at_load']}  (goal <= 1.0)")
    write_result(report, out)
    return report
