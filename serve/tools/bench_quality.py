"""``kandinsky-serve bench quality``: steps against quality per scheduler, and the ``quality``
presets' latency and accuracy, on the embedded model, in one run.

Images come from the service's own graph in process (:mod:`serve.graph.local`, each stage
batched), built from request bodies by the API's own request models, so a preset is
measured exactly as a request gets it. Judged on the held-out captions (combinations the
model never saw) by :mod:`serve.tools.evaluator`, which knows nothing of the model:

* per scheduler and step count: colour and shape accuracy, and the mean pixel distance to
  the service's default image (DDPM, 50 steps) of the same prompt and seed;
* per preset (and the service's defaults): accuracy in every language, and the latency of
  one request at a time (median of ``--rounds``, the configurations interleaved round by
  round so that machine noise falls on all alike), as a ratio to the defaults'.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from deployments.messages import SCHEDULERS
from serve.http.schemas import QUALITY_PRESETS, request_models
from serve.settings import ApiLimits
from serve.tools.evaluator import dominant_colour, mean_pixel_distance, shape_of
from serve.tools.provenance import write_result

SIZE = 64  # the embedded model's own size
SEED = 5000
STEPS = (4, 8, 12, 20, 30)
FAST_LATENCY_GOAL = 0.3
FAST_COLOUR_POINTS = 5.0
"""The issue's goals: fast at most 0.3x the defaults' latency, colour accuracy within 5 points."""


def held_out(languages: tuple[str, ...], per_combo: int) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Each held-out (colour, shape, background) combination's full caption in each language,
    ``per_combo`` times, and the combination of each."""
    from serve.training.data import HELD_OUT, full_caption

    combos = [combo for _ in languages for combo in HELD_OUT for _ in range(per_combo)]
    prompts = [full_caption(*combo, lang) for lang in languages for combo in HELD_OUT for _ in range(per_combo)]
    return prompts, combos


def specs(prompts: list[str], **fields) -> list:
    """One single-image text-to-image spec per prompt (seed ``SEED + i``), validated as a request."""
    model = request_models(ApiLimits())["text2img"]
    return [model.model_validate({"prompt": prompt, "width": SIZE, "height": SIZE, "seed": SEED + index, **fields}).to_spec()
            for index, prompt in enumerate(prompts)]


def accuracy(images: list[np.ndarray], truth: list[tuple]) -> dict[str, float]:
    """Colour and shape accuracy in percent; ``truth``: each image's (colour, shape, ...)."""
    colour = np.mean([dominant_colour(image) == t[0] for image, t in zip(images, truth)])
    shape = np.mean([shape_of(image) == t[1] for image, t in zip(images, truth)])
    return {"colour": round(float(colour) * 100, 1), "shape": round(float(shape) * 100, 1)}


def preset_configs() -> dict[str, dict]:
    """The request fields of each configuration timed: the defaults, each preset, and the fast
    preset decoded without guidance (which saves the doubled U-Net batch)."""
    return {"default": {}, **{name: {"quality": name} for name in QUALITY_PRESETS},
            "fast, no decoder guidance": {"quality": "fast", "guidance_scale": 1.0}}


def bench_quality(out: Path, per_combo: int = 4, steps: str = ",".join(map(str, STEPS)), schedulers: str | None = None,
                  rounds: int = 7, languages: str = "en,ru", checkpoint: str | None = None,
                  plot: str | None = None) -> dict:
    from serve.graph.local import embedded_graph

    graph = embedded_graph(checkpoint)
    step_counts = [int(value) for value in steps.split(",")]
    names = schedulers.split(",") if schedulers else list(SCHEDULERS)
    unknown = sorted(set(names) - set(SCHEDULERS))
    if unknown:
        raise SystemExit(f"--schedulers: unknown {unknown}; choose from {sorted(SCHEDULERS)}")

    # 1. Steps against quality, per scheduler (English captions, the prior at its default).
    prompts, truth = held_out(("en",), per_combo)
    started = time.perf_counter()
    reference = [images[0] for images in graph.run(specs(prompts))]
    sweep = [{"scheduler": "ddpm", "steps": specs(prompts[:1])[0].steps, **accuracy(reference, truth),
              "distance": 0.0, "reference": True}]
    print(f"reference (service defaults): {sweep[0]} in {time.perf_counter() - started:.1f} s", flush=True)
    for name in names:
        for count in step_counts:
            images = [images[0] for images in graph.run(specs(prompts, scheduler=name, steps=count))]
            distance = float(np.mean([mean_pixel_distance(a, b) for a, b in zip(images, reference)]))
            row = {"scheduler": name, "steps": count, **accuracy(images, truth), "distance": round(distance, 2)}
            sweep.append(row)
            print(f"{name:>20} {count:>3} steps: colour {row['colour']:5.1f} %  shape {row['shape']:5.1f} %  "
                  f"distance {row['distance']:5.2f}", flush=True)

    # 2. The presets: accuracy in every language, then latency one request at a time.
    configs = preset_configs()
    all_prompts, all_truth = held_out(tuple(languages.split(",")), per_combo)
    presets: dict[str, dict] = {}
    for label, fields in configs.items():
        images = [images[0] for images in graph.run(specs(all_prompts, **fields))]
        spec = specs(all_prompts[:1], **fields)[0]
        presets[label] = {"fields": fields, "steps": spec.steps, "scheduler": spec.scheduler,
                          "prior_steps": spec.prior_steps, "guidance_scale": spec.guidance_scale,
                          **accuracy(images, all_truth), "latency_ms": []}
    for fields in configs.values():  # warm every path once before timing
        graph.run(specs(all_prompts[:1], **fields))
    for round_index in range(rounds):
        for label, fields in configs.items():
            timed = specs([all_prompts[round_index % len(all_prompts)]], **fields)
            began = time.perf_counter()
            graph.run(timed)
            presets[label]["latency_ms"].append((time.perf_counter() - began) * 1000)
    default_ms = statistics.median(presets["default"]["latency_ms"])
    for row in presets.values():
        row["p50_ms"] = round(statistics.median(row.pop("latency_ms")), 1)
        row["latency_ratio"] = round(row["p50_ms"] / default_ms, 3)
        row["colour_change"] = round(row["colour"] - presets["default"]["colour"], 1)
    fast = presets["fast"]
    result = {
        "size": SIZE, "per_combo": per_combo, "rounds": rounds, "languages": languages.split(","),
        "images_per_point": len(prompts), "images_per_preset": len(all_prompts),
        "prior_steps": specs(prompts[:1])[0].prior_steps,
        "sweep": sweep, "presets": presets,
        "goals": {"fast_latency_ratio": FAST_LATENCY_GOAL, "fast_colour_points": FAST_COLOUR_POINTS,
                  "fast_latency_met": fast["latency_ratio"] <= FAST_LATENCY_GOAL,
                  "fast_colour_met": fast["colour_change"] >= -FAST_COLOUR_POINTS},
    }
    write_result(result, out)
    print("\n".join(quality_tables(result)))
    if plot:
        plot_sweep(result, Path(plot))
    return result


def quality_tables(result: dict) -> list[str]:
    """The markdown tables of docs/benchmarks.md."""
    step_counts = sorted({row["steps"] for row in result["sweep"] if not row.get("reference")})
    reference = next(row for row in result["sweep"] if row.get("reference"))
    lines = [
        f"Held-out captions ({result['images_per_point']} images per point, English, {result['size']}×{result['size']}, "
        f"prior {result['prior_steps']} steps). Each cell: colour % / shape % / mean pixel distance to the default "
        f"image (DDPM, {reference['steps']} steps: colour {reference['colour']:.0f} %, shape {reference['shape']:.0f} %).",
        "",
        "| scheduler | " + " | ".join(f"{count} steps" for count in step_counts) + " |",
        "| --- |" + " ---: |" * len(step_counts),
    ]
    by_scheduler: dict[str, dict[int, dict]] = {}
    for row in result["sweep"]:
        if not row.get("reference"):
            by_scheduler.setdefault(row["scheduler"], {})[row["steps"]] = row
    for name, rows in by_scheduler.items():
        cells = [f"{rows[c]['colour']:.0f} / {rows[c]['shape']:.0f} / {rows[c]['distance']:.1f}" if c in rows else "-"
                 for c in step_counts]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    goals = result["goals"]
    lines += [
        "",
        f"Presets ({result['images_per_preset']} images each, {', '.join(result['languages'])}; latency: one request at "
        f"a time, median of {result['rounds']} rounds, interleaved):",
        "",
        "| `quality` | scheduler | steps | prior steps | decoder guidance | colour % | shape % | p50 ms | × default |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, row in result["presets"].items():
        lines.append(f"| {label} | `{row['scheduler']}` | {row['steps']} | {row['prior_steps']} | {row['guidance_scale']:g} "
                     f"| {row['colour']:.0f} | {row['shape']:.0f} | {row['p50_ms']:.0f} | {row['latency_ratio']:.2f} |")
    fast = result["presets"]["fast"]
    lines += ["", f"**fast / default latency: {fast['latency_ratio']:.2f}** (goal ≤ {goals['fast_latency_ratio']}; "
                  f"{'met' if goals['fast_latency_met'] else 'not met'}); colour {fast['colour_change']:+.1f} points "
                  f"against the default (goal: at most {goals['fast_colour_points']:g} below; "
                  f"{'met' if goals['fast_colour_met'] else 'not met'})."]
    return lines


def plot_sweep(result: dict, path: Path) -> None:
    """Colour accuracy and distance to the default image against steps, one line per scheduler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    schedulers = dict.fromkeys(row["scheduler"] for row in result["sweep"] if not row.get("reference"))
    for name in schedulers:
        rows = sorted((row for row in result["sweep"] if row["scheduler"] == name and not row.get("reference")),
                      key=lambda row: row["steps"])
        left.plot([row["steps"] for row in rows], [row["colour"] for row in rows], marker="o", label=name)
        right.plot([row["steps"] for row in rows], [row["distance"] for row in rows], marker="o", label=name)
    reference = next(row for row in result["sweep"] if row.get("reference"))
    left.axhline(reference["colour"], color="grey", linestyle="--", label=f"ddpm {reference['steps']} (default)")
    left.set_xlabel("decoder steps")
    left.set_ylabel("held-out colour accuracy (%)")
    right.set_xlabel("decoder steps")
    right.set_ylabel("mean pixel distance to the default image")
    left.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
