"""``kandinsky-serve bench latency``: served graph vs diffusers in-process, one run.

Both sides use the same checkpoints, seed and parameters. Rounds alternate
(in-process, then served) so machine noise hits both alike; the ratio of the
medians is the figure of merit.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

TARGET_RATIO = 1.15


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_latency(config_path: str, size: int, steps: int, prior_steps: int, rounds: int, out: Path) -> dict:
    import httpx
    import torch
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    from serve.cli import start_service
    from serve.graph import resolve_model_paths
    from serve.settings import load_config

    config = load_config(config_path)
    prior_path, decoder_path = resolve_model_paths(config.service.models)
    device = config.service.models.device
    denoiser_threads = (config.deployment_options.get("Denoiser", {}).get("user_config") or {}).get("torch_threads")
    if denoiser_threads:
        torch.set_num_threads(denoiser_threads)  # same intra-op threads as the served denoiser

    load = {"local_files_only": True, "use_safetensors": True, "torch_dtype": getattr(torch, config.service.models.dtype)}
    prior_pipe = KandinskyV22PriorPipeline.from_pretrained(prior_path, **load).to(device)
    decoder_pipe = KandinskyV22Pipeline.from_pretrained(decoder_path, **load).to(device)
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

    url = start_service(config)
    body = {"prompt": prompt, "width": size, "height": size, "steps": steps, "prior_steps": prior_steps, "seed": seed}
    client = httpx.Client(base_url=url, timeout=120.0)

    def served() -> float:
        started = time.perf_counter()
        response = client.post("/v1/text2img", json=body)
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        return elapsed

    for _ in range(2):  # warm-up: first calls pay for lazy initialisation on both sides
        in_process()
        served()
    samples: dict[str, list[float]] = {"in_process": [], "served": []}
    for _ in range(rounds):
        samples["in_process"].append(in_process())
        samples["served"].append(served())
    client.close()
    from ray import serve

    serve.shutdown()

    rows = {
        name: {
            "p50_ms": statistics.median(values) * 1000,
            "p90_ms": _percentile(values, 0.9) * 1000,
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
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written: {out}")
    return result
