"""``bench gpu``'s pure parts: the option sweep's parsing, per-stage memory from /metrics, the ratios."""

import pytest

from serve.settings import ConfigError
from serve.tools.bench_gpu import AS_CONFIGURED, parse_options, ratios, stage_memory

pytestmark = pytest.mark.unit


def test_options_start_with_the_service_as_configured():
    assert parse_options(None) == {AS_CONFIGURED: None}
    assert parse_options(['eager={"default": {"attention": "eager"}}']) == {
        AS_CONFIGURED: None, "eager": {"default": {"attention": "eager"}}}


@pytest.mark.parametrize("item", ["compile", "compile={", "=1", "x=[1]", f"{AS_CONFIGURED}={{}}"])
def test_bad_options_are_refused_naming_them(item):
    with pytest.raises(ConfigError, match="--option"):
        parse_options([item])


def test_stage_memory_reads_the_gauges_largest_over_replicas():
    text = "\n".join([
        '# HELP kandinsky_serve_gpu_memory_allocated_bytes CUDA memory allocated by the replica.',
        'kandinsky_serve_gpu_memory_allocated_bytes{Component="x",stage="Denoiser"} 2.5e+09',
        'kandinsky_serve_gpu_memory_allocated_bytes{Component="y",stage="Denoiser"} 3e+09',
        'kandinsky_serve_gpu_memory_reserved_bytes{stage="Denoiser"} 4e+09',
        'kandinsky_serve_gpu_memory_reserved_bytes{stage="MovqDecoder"} 1e+09',
        'kandinsky_serve_step_batch_size_count{stage="Denoiser"} 7',
    ])
    assert stage_memory(text) == {"Denoiser": {"allocated_bytes": 3e9, "reserved_bytes": 4e9},
                                  "MovqDecoder": {"reserved_bytes": 1e9}}


def test_stage_memory_sets_each_peak_against_the_smallest_budget():
    text = "\n".join([
        'kandinsky_serve_gpu_memory_peak_bytes{Component="x",stage="MovqDecoder"} 9e+09',
        'kandinsky_serve_gpu_memory_peak_bytes{Component="y",stage="MovqDecoder"} 5e+09',
        'kandinsky_serve_gpu_memory_budget_bytes{Component="x",stage="MovqDecoder"} 8e+09',
        'kandinsky_serve_gpu_memory_budget_bytes{Component="y",stage="MovqDecoder"} 1.6e+10',
        'kandinsky_serve_gpu_memory_peak_bytes{stage="Prior"} 2e+09',
    ])
    memory = stage_memory(text)
    assert memory["MovqDecoder"] == {"peak_bytes": 9e9, "budget_bytes": 8e9, "peak_over_budget": 9e9 / 8e9}
    assert memory["Prior"] == {"peak_bytes": 2e9}  # no budget exported (no GPU share): no ratio


def test_ratios_against_diffusers():
    result = {
        "diffusers": {"768": {"latency": {"p50_s": 4.0}, "sequential_images_per_s": 0.25}},
        "served": {AS_CONFIGURED: {"sizes": {"768": {"latency": {"p50_s": 4.2}, "images_per_s": {"1": 0.24, "8": 0.6}}}}},
        "load": {"p99_step_over_request": 0.4},
    }
    assert ratios(result) == {AS_CONFIGURED: {"768": {"latency_served_over_diffusers": pytest.approx(1.05),
                                                      "best_throughput_over_diffusers_sequential": pytest.approx(2.4)}},
                              "p99_step_over_request_at_70": 0.4}
