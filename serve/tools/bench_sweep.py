"""``kandinsky-serve bench sweep``: a 16-cell ``/v1/sweep`` against the same 16 requests sent
one after another, in one run.

The sweep's cells run at once, so the prior's and the denoiser's step batchers run them
together; the requests one at a time each run alone. Reported: each side's wall time (median
of ``--rounds``, alternating), the throughput ratio, and the largest pixel difference between
a cell's image and the same request's (0 or 1: results do not depend on the batch).

Without ``--url`` it starts its own service on a tiny checkpoint written for the run.
"""

from __future__ import annotations

import base64
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from serve.tools.bench_service import stage_options, start_local_service, stop_service, wait_ready
from serve.tools.provenance import write_result

AXES = [{"field": "seed", "values": [1, 2, 3, 4]}, {"field": "guidance_scale", "values": [1.0, 3.0, 5.0, 7.0]}]
"""4 x 4 = 16 cells."""


def _start_service(root: Path, port: int, max_batch: int) -> str:
    from deployments.registry import GENERATION_STAGES
    from serve.training.tiny import make_tiny

    tiny = make_tiny(root / "tiny")
    args = {"models": {"prior_path": str(tiny.prior), "decoder_path": str(tiny.decoder)}, "jobs": {"persist": False}}
    options = stage_options(GENERATION_STAGES, max_batch, max_ongoing=max(32, 2 * max_batch))
    return start_local_service(args, options, "bench-sweep", port)


def _pixels(data: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)


def _cell_requests(base: dict) -> list[dict]:
    """The sweep's cells as plain requests, in cell order (axis 0 fastest)."""
    (x, xs), (y, ys) = ((axis["field"], axis["values"]) for axis in AXES)
    return [{**base, x: xv, y: yv} for yv in ys for xv in xs]


def run_once(client: httpx.Client, base: dict) -> tuple[float, float, int]:
    """(sweep s, one-at-a-time s, largest pixel difference between a cell and its request)."""
    started = time.perf_counter()
    response = client.post("/v1/sweep", json={"base": base, "axes": AXES, "grid": True})
    response.raise_for_status()
    swept = time.perf_counter() - started
    cells = response.json()["cells"]
    started = time.perf_counter()
    singles = []
    for body in _cell_requests(base):
        single = client.post("/v1/text2img", json=body)
        single.raise_for_status()
        singles.append(single.json()["images"][0])
    sequential = time.perf_counter() - started
    diff = max(int(np.abs(_pixels(cell["images"][0]) - _pixels(single)).max()) for cell, single in zip(cells, singles))
    return swept, sequential, diff


def bench_sweep(out: Path, url: str | None = None, size: int = 64, steps: int = 25, prior_steps: int = 25,
                rounds: int = 3, max_batch: int = 16, port: int = 8030, **_: object) -> dict:
    base = {"prompt": "a red circle", "width": size, "height": size, "steps": steps, "prior_steps": prior_steps}
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    started_here = url is None
    try:
        if url is None:
            url = _start_service(root, port, max_batch)
        wait_ready(url)
        with httpx.Client(base_url=url, timeout=600.0) as client:
            run_once(client, {**base, "steps": 2, "prior_steps": 2})  # warm every code path
            samples = [run_once(client, base) for _ in range(rounds)]
    finally:
        if started_here:
            stop_service()
        shutil.rmtree(root, ignore_errors=True)
    cells = len(_cell_requests(base))
    sweep_s = statistics.median(s for s, _, _ in samples)
    sequential_s = statistics.median(q for _, q, _ in samples)
    result = {
        "benchmark": "sweep", "url": url if not started_here else None, "cells": cells, "axes": AXES, "request": base,
        "max_batch": max_batch if started_here else None, "rounds": rounds,
        "sweep_s": sweep_s, "sequential_s": sequential_s,
        "sweep_images_per_s": cells / sweep_s, "sequential_images_per_s": cells / sequential_s,
        "throughput_ratio": sequential_s / sweep_s, "target_ratio": 2.0,
        "max_pixel_diff": max(d for _, _, d in samples),
        "samples": [{"sweep_s": s, "sequential_s": q, "max_pixel_diff": d} for s, q, d in samples],
    }
    print("\n" + "\n".join(sweep_tables(result)))
    write_result(result, out)
    return result


def sweep_tables(result: dict) -> list[str]:
    """The table ``bench sweep`` prints and docs/benchmarks.md shows."""
    request = result["request"]
    return [
        f"A {result['cells']}-cell sweep ({' × '.join(a['field'] for a in result['axes'])}) against the same "
        f"{result['cells']} requests one after another, {request['width']}², prior {request['prior_steps']} + decoder "
        f"{request['steps']} steps, median of {result['rounds']} rounds"
        + (f", step batches of up to {result['max_batch']}" if result.get("max_batch") else "") + ":",
        "",
        "| | wall s | images/s |",
        "| --- | ---: | ---: |",
        f"| one `/v1/sweep` | {result['sweep_s']:.2f} | {result['sweep_images_per_s']:.2f} |",
        f"| {result['cells']} requests, one at a time | {result['sequential_s']:.2f} | "
        f"{result['sequential_images_per_s']:.2f} |",
        "",
        f"**sweep / one at a time (throughput): {result['throughput_ratio']:.2f}×** (target ≥ {result['target_ratio']:g}×); "
        f"largest pixel difference between a cell and the same request sent alone: {result['max_pixel_diff']}.",
    ]
