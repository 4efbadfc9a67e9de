"""``kandinsky-serve bench movq-memory``: the MOVQ stage's peak memory, whole vs in tiles.

Each measurement (one operation, one size, tiled or not) runs in a fresh Python process, so
that one measurement's allocations (and the allocator's cache) cannot hide another's: the
child loads the model, makes its input, notes its resident memory, runs ``MovqModel.decode``
(or ``encode``) once and reports its peak RSS (``ru_maxrss``) less that baseline, the seconds
taken and, on CUDA, ``torch.cuda.max_memory_allocated`` less what was allocated before.

The default model is the embedded tiny MOVQ; ``--full-size`` builds the architecture of
``kandinsky-community/kandinsky-2-2-decoder``'s MOVQ (random weights: memory and time do not
depend on them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from serve.tools.provenance import write_result
from serve.training.full_size import MOVQ as FULL_SIZE_MOVQ  # kandinsky-2-2-decoder/movq/config.json

CHILD_TIMEOUT_S = 1800


def build_model(full_size: bool, device: str, tile_size: int | None, tile_overlap: int):
    """The MOVQ stage's model: the embedded tiny one, or the full-size architecture seeded."""
    import torch
    from diffusers import VQModel

    from deployments.movq import MovqModel

    if not full_size:
        from serve.embedded import trained_checkpoint

        return MovqModel.from_pretrained(trained_checkpoint()[1], device, "float32", tile_size, tile_overlap)
    torch.manual_seed(0)
    return MovqModel(VQModel(**FULL_SIZE_MOVQ).eval().to(device), device, tile_size, tile_overlap)


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(spec: dict) -> dict:
    """One measurement, in this process (the child): ``spec`` has op, size, tiled, full_size,
    device, threads, tile_size, tile_overlap."""
    import gc
    import resource
    import time

    import numpy as np
    import torch

    from deployments.messages import InitImage

    torch.set_num_threads(spec["threads"])
    tile = spec["tile_size"] if spec["tiled"] else None
    model = build_model(spec["full_size"], spec["device"], tile, spec["tile_overlap"])
    size, rng = spec["size"], np.random.default_rng(0)
    if spec["op"] == "decode":
        latents = rng.standard_normal((1, model.movq.config.latent_channels, size // model.scale, size // model.scale), np.float32)
        run = lambda: model.decode(latents)  # noqa: E731
    else:
        image = InitImage(rng.integers(0, 256, (size, size, 3), np.uint8), size, size)
        run = lambda: model.encode([image])  # noqa: E731
    # One small call first: the first call's one-off set-up (thread pools, kernels) is no part of the figure.
    if spec["op"] == "decode":
        model.decode(latents[..., :8, :8])
    else:
        model.encode([InitImage(image.pixels[:64, :64], 64, 64)])
    cuda = spec["device"].startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    baseline = _rss_bytes()
    started = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    side = size // model.scale
    return {
        **{k: spec[k] for k in ("op", "size", "tiled")},
        "tiles": _tile_count(side, model.tile, model.overlap) if model.tiles((side, side)) else 1,
        "seconds": seconds,
        "rss_after_load_mb": baseline / 2**20,
        "peak_rss_over_load_mb": max(0, peak - baseline) / 2**20,
        "cuda_peak_mb": (torch.cuda.max_memory_allocated() - allocated) / 2**20 if cuda else None,
    }


def _tile_count(latent_side: int, tile: int, overlap: int) -> int:
    from deployments.tiling import spans

    return len(spans(latent_side, tile, overlap)) ** 2


def run_child(spec: dict) -> dict:
    """:func:`measure` in a fresh Python process."""
    done = subprocess.run([sys.executable, "-m", "serve.tools.bench_movq", json.dumps(spec)], capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_movq_memory(out: Path, sizes: str = "1024,2048", ops: str = "decode,encode", full_size: bool = False,
                      tile_size: int = 1024, tile_overlap: int = 128, device: str = "cpu", threads: int = 2,
                      **_: object) -> dict:
    """Each of ``ops`` at each of ``sizes`` (square), whole and in tiles (where the size is above
    ``tile_size``; at or below it tiling changes nothing), each in a fresh process."""
    rows = []
    for op in ops.split(","):
        for size in (int(s) for s in sizes.split(",")):
            for tiled in (False, True) if size > tile_size else (False,):
                spec = {"op": op, "size": size, "tiled": tiled, "full_size": full_size, "device": device,
                        "threads": threads, "tile_size": tile_size, "tile_overlap": tile_overlap}
                rows.append(run_child(spec))
                print(_row_line(rows[-1]), flush=True)
    result = {"benchmark": "movq_memory", "model": "full-size (kandinsky-2-2-decoder MOVQ, random weights)"
              if full_size else "embedded tiny", "device": device, "threads": threads, "tile_size": tile_size,
              "tile_overlap": tile_overlap, "rows": rows}
    from serve.tools.bench_docs import movq_memory_table

    print("\n" + "\n".join(movq_memory_table(result)))
    write_result(result, out)
    return result


def _row_line(row: dict) -> str:
    return (f"{row['op']} {row['size']}² {'tiled' if row['tiled'] else 'whole'}: {row['peak_rss_over_load_mb']:.0f} MB "
            f"over the loaded model, {row['seconds']:.2f} s")


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
