"""The CUDA code paths of ``args.performance`` on the tiny checkpoint: float16, the MOVQ's own
decode stream, CUDA graphs through ``torch.compile`` and the GPU memory gauges. Marked ``gpu``
(out of the default run) and skipped without a CUDA device; ``cluster/gpu-bench.sh tests`` runs
them on a lent GPU machine.

The bounds are the CPU tests' (tests/unit/test_performance.py): float16 keeps more mantissa
than bfloat16, so bfloat16's bound on the mean pixel difference holds it loosely."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.denoiser import DenoiserModel
from deployments.movq import MovqModel
from deployments.performance import ModelOptions
from serve.graph.local import LocalCalls
from tests.reference import MAX_PIXEL_DIFF, max_diff, spec
from tests.unit.test_performance import BF16_MEAN_PIXEL_DIFF, _denoise

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def cpu_fp32(tiny_checkpoint):
    return LocalCalls(tiny_checkpoint)


@pytest.mark.parametrize(("dtype", "options"), [
    ("float32", ModelOptions()),
    ("float16", ModelOptions(channels_last=True, decode_chunk=1)),  # configs/gpu.yaml's choices
], ids=["fp32", "fp16-channels_last-chunked"])
def test_a_generation_on_cuda_stays_within_the_bound_of_cpu_float32(cpu_fp32, tiny_checkpoint, dtype, options):
    cuda = LocalCalls(tiny_checkpoint, dtype=dtype, options=options, device="cuda")
    s = spec(prompt="a red circle on a white background", seeds=(1, 2))
    mine, theirs = cuda.generate(s), cpu_fp32.generate(s)
    diffs = [_mean_diff(a, b) for a, b in zip(mine, theirs, strict=True)]
    assert max(diffs) <= BF16_MEAN_PIXEL_DIFF, diffs
    assert _mean_diff(theirs[0], theirs[1]) > 5 * BF16_MEAN_PIXEL_DIFF  # another seed is far off


def test_chunked_decode_on_its_stream_matches_one_forward(tiny_checkpoint):
    latents = np.random.default_rng(3).standard_normal((5, 4, 8, 8)).astype(np.float32)
    whole = MovqModel.from_pretrained(tiny_checkpoint.decoder, device="cuda").decode(latents)
    model = MovqModel.from_pretrained(tiny_checkpoint.decoder, device="cuda", options=ModelOptions(decode_chunk=2))
    assert model.stream is not None and model.stream != torch.cuda.current_stream()
    chunks = list(model.decode_chunks(latents))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert max_diff(np.concatenate(chunks), whole) <= MAX_PIXEL_DIFF


def test_cuda_graphs_through_compile_keep_the_latents(tiny_checkpoint):
    """``compile_mode: reduce-overhead`` (Inductor with CUDA graphs) on a bucketed U-Net."""
    eager = _denoise(DenoiserModel.from_pretrained(tiny_checkpoint.decoder, device="cuda"))
    torch._dynamo.reset()
    options = ModelOptions(compile=True, compile_mode="reduce-overhead", batch_buckets=(4,))
    model = DenoiserModel.from_pretrained(tiny_checkpoint.decoder, device="cuda", options=options)
    first = _denoise(model)
    again = _denoise(model)  # replayed graphs
    torch._dynamo.reset()
    np.testing.assert_allclose(first, eager, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(again, first)


def test_the_memory_gauges_read_the_device(tiny_checkpoint, monkeypatch):
    from deployments import metrics
    from tests.unit.test_metrics_gpu import FakeGauge

    monkeypatch.setattr(metrics, "make", FakeGauge)
    model = MovqModel.from_pretrained(tiny_checkpoint.decoder, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    model.decode(np.zeros((4, 4, 16, 16), np.float32))
    stage = metrics.StageMetrics("MovqDecoder", "cuda", gpu_share=0.5)
    stage.batch(4, 0.1, [])
    total = torch.cuda.get_device_properties("cuda").total_memory
    assert stage.gpu_peak.values["MovqDecoder"] >= stage.gpu_reserved.values["MovqDecoder"] > 0
    assert stage.gpu_budget.values["MovqDecoder"] == int(0.5 * total)
