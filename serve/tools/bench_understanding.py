"""``kandinsky-serve bench understanding``: Florence-2 captioning with dynamic batching against one
image at a time, and the latency ``caption_check`` adds to a generation, in one run.

**Captioning.** The same ``--images`` distinct pictures sent to ``/v1/caption`` all at once
(the Florence-2 stage's ``@serve.batch`` collects them into batches) and one after another (each
call alone in its batch), alternating for ``--rounds`` rounds on one service. Reported: each
side's median wall time and images/s, their ratio, the stage's batch sizes on each side (from
``/metrics``: the caption route's response carries no timings), and whether both sides gave
every image the same caption (batch invariance).

**caption_check.** The same text-to-image request (seed, few steps) with and without
``caption_check: true``, interleaved round by round: p50 latency of each, the added
milliseconds and the ratio, and the Florence-2 and CLIP timings the response reports.

Without ``--url`` it starts its own service on tiny checkpoints written for the run.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from serve.settings import ConfigError
from serve.tools.bench_service import stage_options, start_local_service, stop_service, wait_ready
from serve.tools.provenance import write_result

PARTS = ("captioning", "caption-check")
STAGE = "florence2"
METRIC = "ray_kandinsky_serve_stage_batch"
IMAGE_SIDE = 96  # pixels; the tiny Florence-2 resizes to 64, the published one to 768
METRICS_TIMEOUT_S = 30.0  # Ray exports a replica's metrics every few seconds (10 s by default)


class CaptionCheckUnavailable(ConfigError):
    """The service refuses ``caption_check`` (a build without it, or no Florence-2 configured):
    the CLI exits 2 with the message."""


# ----------------------------------------------------------------------------- the service


def _start_service(root: Path, port: int, max_batch: int, batch_wait_s: float) -> str:
    """Tiny prior/decoder and tiny Florence-2 on a fresh local Ray; returns the base URL."""
    from deployments.registry import STAGES
    from serve.training.tiny import make_tiny
    from serve.training.tiny_florence2 import make_tiny_florence2

    tiny = make_tiny(root / "tiny")
    florence2 = make_tiny_florence2(root / "florence2", seed=0)
    args = {"models": {"prior_path": str(tiny.prior), "decoder_path": str(tiny.decoder),
                       "florence2_path": str(florence2)}, "jobs": {"persist": False}}
    # Every stage, the understanding ones too (build_graph uses a deployed stage's options only).
    options = stage_options(STAGES, max_batch, batch_wait_s, max_ongoing=max(32, 2 * max_batch))
    os.environ.setdefault("RAY_metrics_report_interval_ms", "500")  # batch sizes are read from /metrics
    return start_local_service(args, options, "bench-understanding", port)


# ----------------------------------------------------------------------------- images


COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (240, 200, 40), (160, 60, 200), (40, 200, 200),
           (240, 140, 40), (30, 30, 30), (250, 250, 250), (120, 80, 40)]


def scenes(count: int, side: int = IMAGE_SIDE) -> list[str]:
    """``count`` distinct PNG scenes (a shape of one colour on a plain background), base64."""
    from PIL import Image, ImageDraw

    out = []
    for index in range(count):
        background = COLOURS[index % len(COLOURS)]
        fill = COLOURS[(3 * index + 1) % len(COLOURS)]
        image = Image.new("RGB", (side, side), background)
        draw = ImageDraw.Draw(image)
        margin = side // 6 + (index // len(COLOURS)) % (side // 4)
        box = (margin, margin, side - margin, side - margin)
        [draw.ellipse, draw.rectangle, lambda b, fill: draw.polygon(
            [(b[0], b[3]), ((b[0] + b[2]) // 2, b[1]), (b[2], b[3])], fill=fill)][index % 3](box, fill=fill)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


# ----------------------------------------------------------------------------- batch sizes from /metrics

_SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})?\s+(\S+)$')


def batch_counters(text: str, stage: str = STAGE) -> dict[str, float]:
    """The stage's batch figures in a /metrics text, summed over replicas: ``batches``,
    ``items`` (calls in them) and ``le=<bound>`` cumulative bucket counts."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or not match.group(1).startswith(METRIC) or f'stage="{stage}"' not in (match.group(2) or ""):
            continue
        name, labels, value = match.groups()
        if name == f"{METRIC}_size_count":
            key = "batches"
        elif name == f"{METRIC}_items_total":
            key = "items"
        elif name == f"{METRIC}_size_bucket":
            key = "le=" + re.search(r'le="([^"]+)"', labels).group(1)
        else:
            continue
        out[key] = out.get(key, 0.0) + float(value)
    return out


async def _scrape(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    response.raise_for_status()
    return batch_counters(response.text)


async def _settled_counters(client: httpx.AsyncClient, before: dict[str, float], calls: int) -> dict[str, float]:
    """The counters once the stage has exported ``calls`` more batched calls than ``before``
    (or, after :data:`METRICS_TIMEOUT_S`, whatever it has exported)."""
    deadline = time.monotonic() + METRICS_TIMEOUT_S
    while True:
        now = await _scrape(client)
        if now.get("items", 0.0) - before.get("items", 0.0) >= calls or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.25)  # polling interval: Ray exports metrics periodically


def batch_delta(before: dict[str, float], after: dict[str, float]) -> dict:
    """Batches, calls and batch-size histogram (bucket upper bound -> batches) between two scrapes."""
    batches = after.get("batches", 0.0) - before.get("batches", 0.0)
    items = after.get("items", 0.0) - before.get("items", 0.0)
    bounds = sorted((k for k in after if k.startswith("le=")), key=lambda k: float(k[3:]))
    histogram, below = {}, 0.0
    for key in bounds:
        cumulative = after[key] - before.get(key, 0.0)
        if cumulative - below > 0:
            bound = float(key[3:])
            histogram[str(int(bound)) if bound.is_integer() else key[3:]] = int(round(cumulative - below))
        below = cumulative
    return {"batches": int(round(batches)), "calls": int(round(items)),
            "mean_batch_size": items / batches if batches else None, "batch_size_histogram": histogram}


# ----------------------------------------------------------------------------- (a) captioning


async def _caption(client: httpx.AsyncClient, image: str) -> str:
    response = await client.post("/v1/caption", json={"image": image})
    response.raise_for_status()
    return response.json()["text"]


async def _caption_side(client: httpx.AsyncClient, images: list[str], batched: bool) -> dict:
    """One side of a round: wall seconds, captions, and the stage's batches while it ran."""
    before = await _scrape(client)
    started = time.perf_counter()
    if batched:
        captions = list(await asyncio.gather(*(_caption(client, image) for image in images)))
    else:
        captions = [await _caption(client, image) for image in images]
    wall_s = time.perf_counter() - started
    batches = batch_delta(before, await _settled_counters(client, before, len(images)))
    return {"wall_s": wall_s, "captions": captions, **batches}


async def measure_captioning(client: httpx.AsyncClient, count: int, rounds: int) -> dict:
    """``count`` images at once against one at a time, alternating (which side goes first too)."""
    images = scenes(count)
    # Warm every code path and connection; it also settles the counters the first side starts from.
    await _caption_side(client, images, batched=True)
    samples: dict[str, list[dict]] = {"batched": [], "sequential": []}
    for index in range(rounds):
        order = ("batched", "sequential") if index % 2 == 0 else ("sequential", "batched")
        for side in order:
            samples[side].append(await _caption_side(client, images, batched=side == "batched"))
    reference = samples["sequential"][0]["captions"]
    mismatched = sorted({i for side in samples.values() for s in side
                         for i, (a, b) in enumerate(zip(s["captions"], reference)) if a != b})
    result: dict = {"images": count, "image_side": IMAGE_SIDE, "rounds": rounds}
    for side, measured in samples.items():
        wall = statistics.median(s["wall_s"] for s in measured)
        histogram: dict[str, int] = {}
        for s in measured:
            for bound, n in s["batch_size_histogram"].items():
                histogram[bound] = histogram.get(bound, 0) + n
        batches = sum(s["batches"] for s in measured)
        calls = sum(s["calls"] for s in measured)
        result[side] = {
            "wall_s": wall, "images_per_s": count / wall, "batches": batches, "calls": calls,
            "mean_batch_size": calls / batches if batches else None,
            "batch_size_histogram": dict(sorted(histogram.items(), key=lambda kv: float(kv[0]))),
            "samples_s": [s["wall_s"] for s in measured],
        }
    result["throughput_ratio"] = result["sequential"]["wall_s"] / result["batched"]["wall_s"]
    result["captions_identical"] = not mismatched
    result["mismatched_images"] = mismatched
    result["captions"] = reference
    return result


# ----------------------------------------------------------------------------- (b) caption_check


def _generate(client: httpx.Client, body: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    response = client.post("/v1/text2img", json=body)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    if body.get("caption_check") and response.status_code in (404, 422) and "caption_check" in response.text:
        raise CaptionCheckUnavailable(
            f"the service refuses caption_check ({response.status_code}: {response.text[:300]}); it needs a build "
            "with the caption_check field and Florence-2 configured (models.florence2_path). "
            "Measure captioning alone with --parts captioning")
    if response.status_code != 200:
        raise RuntimeError(f"POST /v1/text2img answered {response.status_code}: {response.text[:500]}")
    return elapsed_ms, response.json()


def _checked(answer: dict) -> dict:
    """The contract of a caption-checked response: one check per image, both timings."""
    checks = answer.get("checks")
    if not isinstance(checks, list) or len(checks) != len(answer["images"]):
        raise CaptionCheckUnavailable(f"caption_check answered without one check per image: checks={checks!r}")
    missing = {"caption_check", "caption_check_embed"} - set(answer["timings"])
    if missing:
        raise CaptionCheckUnavailable(f"caption_check answered without timings {sorted(missing)}")
    return answer


def _timing_ms(timing: dict | float) -> float:
    """A stage's time in a response's ``timings``: queue wait + compute (or a bare number)."""
    return timing["queue_ms"] + timing["compute_ms"] if isinstance(timing, dict) else float(timing)


def measure_caption_check(client: httpx.Client, request: dict, rounds: int) -> dict:
    """The same request with and without ``caption_check``, interleaved; p50s and the difference."""
    plain, checked = dict(request), {**request, "caption_check": True}
    samples: dict[str, list[float]] = {"plain": [], "checked": []}
    stage_ms: dict[str, list[float]] = {"caption_check": [], "caption_check_embed": []}
    _generate(client, plain)  # warm every code path
    _checked(_generate(client, checked)[1])
    images_identical, checks = True, []
    for index in range(rounds):
        order = (("plain", plain), ("checked", checked))
        images = {}
        for side, body in order if index % 2 == 0 else order[::-1]:
            elapsed_ms, answer = _generate(client, body)
            samples[side].append(elapsed_ms)
            images[side] = answer["images"]
            if side == "checked":
                checks = _checked(answer)["checks"]
                for key in stage_ms:
                    stage_ms[key].append(_timing_ms(answer["timings"][key]))
        images_identical &= images["checked"] == images["plain"]
    plain_p50, checked_p50 = statistics.median(samples["plain"]), statistics.median(samples["checked"])
    return {
        "request": request, "rounds": rounds,
        "plain_p50_ms": plain_p50, "checked_p50_ms": checked_p50,
        "added_ms": checked_p50 - plain_p50, "ratio": checked_p50 / plain_p50,
        # Each round's own difference: less moved by load that drifts between rounds.
        "added_ms_paired_p50": statistics.median(c - p for c, p in zip(samples["checked"], samples["plain"])),
        "stage_p50_ms": {key: statistics.median(values) for key, values in stage_ms.items()},
        "images_identical": images_identical, "checks": checks,
        "samples_ms": samples,
    }


# ----------------------------------------------------------------------------- the command


async def _captioning(url: str, count: int, rounds: int) -> dict:
    limits = httpx.Limits(max_connections=count + 4, max_keepalive_connections=count + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:
        return await measure_captioning(client, count, rounds)


def bench_understanding(config: str, size: int, steps: int, out: Path, prior_steps: int = 4, images: int = 8,
                        rounds: int = 5, max_batch: int = 8, batch_wait: float = 0.01, url: str | None = None,
                        port: int = 8040, parts: str = ",".join(PARTS)) -> dict:
    """``config`` is unused (the service is the tiny one started here, or ``url``); ``size`` and
    ``steps`` are the generation's, for ``caption_check``."""
    wanted = [part.strip() for part in parts.split(",") if part.strip()]
    unknown = set(wanted) - set(PARTS)
    if unknown or not wanted:
        raise ConfigError(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    request = {"prompt": "a red circle", "seed": 7, "width": size, "height": size, "steps": steps,
               "prior_steps": prior_steps}
    root = Path(tempfile.mkdtemp(prefix="bench-understanding-"))
    started_here = url is None
    result: dict = {"benchmark": "understanding", "url": None if started_here else url,
                    "max_batch": max_batch if started_here else None,
                    "batch_wait_s": batch_wait if started_here else None}
    try:
        if url is None:
            url = _start_service(root, port, max_batch, batch_wait)
        wait_ready(url)
        if "caption-check" in wanted:  # before measuring anything: refused, the run stops here
            with httpx.Client(base_url=url, timeout=300.0) as client:
                _checked(_generate(client, {**request, "caption_check": True})[1])
        if "captioning" in wanted:
            result["captioning"] = asyncio.run(_captioning(url, images, rounds))
        if "caption-check" in wanted:
            with httpx.Client(base_url=url, timeout=300.0) as client:
                result["caption_check"] = measure_caption_check(client, request, rounds)
    finally:
        if started_here:
            stop_service()
        shutil.rmtree(root, ignore_errors=True)
    print("\n" + "\n".join(understanding_tables(result)))
    write_result(result, out)
    return result


def _histogram(side: dict) -> str:
    return ", ".join(f"≤{bound} ×{n}" for bound, n in side["batch_size_histogram"].items()) or "–"


def understanding_tables(result: dict) -> list[str]:
    """The tables ``bench understanding`` prints and docs/benchmarks.md shows."""
    lines: list[str] = []
    captioning = result.get("captioning")
    if captioning:
        n = captioning["images"]
        lines += [
            f"Florence-2 captioning (tiny random-weight model), {n} distinct {captioning['image_side']}² images, "
            f"median of {captioning['rounds']} rounds, sides alternating"
            + (f"; `@serve.batch` up to {result['max_batch']}, wait {result['batch_wait_s'] * 1000:g} ms"
               if result.get("max_batch") else "") + ":",
            "",
            "| | wall s | images/s | batches | mean batch | batch sizes (bucket ×batches) |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for side, label in (("batched", f"{n} at once (dynamic batching)"), ("sequential", "one at a time")):
            row = captioning[side]
            mean = "–" if row["mean_batch_size"] is None else f"{row['mean_batch_size']:.2f}"
            lines.append(f"| {label} | {row['wall_s']:.3f} | {row['images_per_s']:.1f} | {row['batches']} | {mean} "
                         f"| {_histogram(row)} |")
        lines += ["", f"**batched / one at a time (throughput): {captioning['throughput_ratio']:.2f}×**; captions "
                  + ("identical on both sides for every image (batch invariant)." if captioning["captions_identical"]
                     else f"differ for images {captioning['mismatched_images']}.")]
    check = result.get("caption_check")
    if check:
        request = check["request"]
        if lines:
            lines.append("")
        lines += [
            f"`caption_check` on `/v1/text2img` ({request['width']}², prior {request['prior_steps']} + decoder "
            f"{request['steps']} steps, one image, same seed), {check['rounds']} rounds interleaved:",
            "",
            "| | p50 ms |",
            "| --- | ---: |",
            f"| without `caption_check` | {check['plain_p50_ms']:.1f} |",
            f"| with `caption_check` | {check['checked_p50_ms']:.1f} |",
            f"| its Florence-2 caption (timing `caption_check`) | {check['stage_p50_ms']['caption_check']:.1f} |",
            f"| its CLIP image embedding, beside the caption (timing `caption_check_embed`) | "
            f"{check['stage_p50_ms']['caption_check_embed']:.1f} |",
            "",
            f"**added: {check['added_ms']:.1f} ms, {check['ratio']:.2f}×** the generation without it (median of "
            f"each round's own difference: {check['added_ms_paired_p50']:.1f} ms); images "
            + ("identical with and without." if check["images_identical"] else "**differ** with and without."),
        ]
    return lines
