"""The deployed graph (shared Ray instance) against diffusers' pipelines."""

from __future__ import annotations

import asyncio

import pytest

from tests.reference import MAX_PIXEL_DIFF, decode_png, max_diff, reference_images, spec


def _generate(handle, s, request_id="t"):
    return handle.generate.remote(s, request_id).result(timeout_s=120)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"negative_prompt": "blue square, low quality"},
        {"width": 128, "height": 64, "seeds": (21, 22)},
        {"width": 64, "height": 128, "negative_prompt": "dark"},
    ],
    ids=["64x64", "64x64-negative", "128x64-two-images", "64x128-negative"],
)
def test_served_images_match_diffusers(served_app, tiny_checkpoint, overrides):
    _, handle = served_app
    s = spec(**overrides)
    result = _generate(handle, s)
    assert result.seeds == list(s.seeds) and result.media_type == "image/png"
    for data, reference in zip(result.images, reference_images(tiny_checkpoint, s), strict=True):
        image = decode_png(data)
        assert image.shape == (s.height, s.width, 3)
        assert max_diff(image, reference) <= MAX_PIXEL_DIFF


def test_every_stage_reports_its_timing(served_app):
    _, handle = served_app
    result = _generate(handle, spec())
    assert set(result.timings) == {"text_encoder", "prior", "denoiser", "movq"}
    for timing in result.timings.values():
        assert timing.compute_ms > 0 and timing.queue_ms >= 0 and timing.batch_size >= 1


def test_same_image_alone_and_inside_a_batch_of_eight_mixed_requests(served_app):
    _, handle = served_app
    target = spec(prompt="a yellow star", negative_prompt="blurry", seeds=(77,))
    mates = [
        spec(prompt="a cat", seeds=(1,)),
        spec(prompt="a dog", width=128, seeds=(2,)),
        spec(prompt="a tree", steps=3, prior_steps=2, seeds=(3,)),
        spec(prompt="a boat", guidance_scale=1.0, seeds=(4,)),
        spec(prompt="a house", negative_prompt="red", seeds=(5,)),
        spec(prompt="the sea", height=128, seeds=(6,)),
        spec(prompt="a moon", prior_guidance_scale=7.5, guidance_scale=2.0, seeds=(7,)),
    ]
    alone = decode_png(_generate(handle, target).images[0])

    async def together():
        responses = [handle.generate.remote(s, f"mate{i}") for i, s in enumerate([*mates[:3], target, *mates[3:]])]
        return await asyncio.gather(*responses)

    results = asyncio.run(together())
    batched = results[3]
    # The target really shared batches: otherwise this test would prove nothing.
    assert batched.timings["denoiser"].batch_size > 1
    assert max(r.timings["prior"].batch_size for r in results) >= 4
    assert max_diff(decode_png(batched.images[0]), alone) <= MAX_PIXEL_DIFF


PERF_APP = "perf"


def test_each_stage_runs_with_its_own_performance_options(served_app, tiny_checkpoint):
    """``args.performance`` reaches the replicas: a bf16, channels_last, eager-attention Denoiser
    (everything else float32) gives what the same models give in process; the float32 graph differs."""
    import torch
    from ray import serve

    from deployments.performance import ModelOptions
    from serve.graph.build import build_graph
    from serve.graph.local import LocalCalls
    from tests.conftest import TEST_DEPLOYMENT_OPTIONS

    _, plain = served_app
    args = {"models": {"prior_path": str(tiny_checkpoint.prior), "decoder_path": str(tiny_checkpoint.decoder)},
            "performance": {"stages": {"Denoiser": {"dtype": "bfloat16", "channels_last": True, "attention": "eager"}}}}
    options = {name: {**opts, "ray_actor_options": {"num_cpus": 0.02}} for name, opts in TEST_DEPLOYMENT_OPTIONS.items()}
    handle = serve.run(build_graph(args, options), name=PERF_APP, route_prefix=f"/{PERF_APP}")
    try:
        s = spec(seeds=(3,))
        served = decode_png(_generate(handle, s).images[0])
    finally:
        serve.delete(PERF_APP)
    local = LocalCalls(tiny_checkpoint)
    local.decoders["text2img"] = LocalCalls(tiny_checkpoint, dtype="bfloat16", options=ModelOptions(
        attention="eager", channels_last=True)).decoders["text2img"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replicas (torch_threads: 1): bf16 rounding follows the threads' split
    try:
        expected = local.generate(s)[0]
    finally:
        torch.set_num_threads(threads)
    assert max_diff(served, expected) <= MAX_PIXEL_DIFF
    assert max_diff(served, decode_png(_generate(plain, s).images[0])) > 10
