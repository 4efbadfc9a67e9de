"""Precision and speed options (``args.performance``): settings, bucket padding, and parity of
bf16, attention kernels, channels_last and torch.compile with the plain float32 path, on the
tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.denoiser import DenoiserModel
from deployments.messages import DenoiseParams, ImageEmbeddings
from deployments.performance import RECOMPILE_LIMIT, ModelOptions, compiled, pad_rows, padded_size, set_attention
from serve.graph.local import LocalCalls
from serve.settings import ConfigError, parse_service_settings
from tests.reference import MAX_PIXEL_DIFF, max_diff, spec

BF16_MEAN_PIXEL_DIFF = 12.0
"""Bound on the mean |bf16 - fp32| pixel difference (of 255) of a whole tiny-checkpoint generation.
Measured on 2 cores (torch 2.13, CPU): 4.98 to 8.23 over four images; the bound is ~1.5x the
worst. The *max* pixel difference is no useful bound here: the random-weight tiny model draws
saturated noise, where bf16 rounding flips single pixels between 0 and 255 (measured max 255;
on the trained embedded model: mean 0.59 to 1.31, max 44 to 139, at shape edges)."""


# --- settings -------------------------------------------------------------------------------------


def test_each_stage_gets_the_default_its_own_keys_and_the_global_dtype():
    settings = parse_service_settings({"performance": {
        "default": {"channels_last": True, "attention": "eager"},
        "stages": {"Denoiser": {"dtype": "bfloat16", "compile": True, "compile_mode": "max-autotune-no-cudagraphs",
                                "batch_buckets": [2, 6]}},
    }})
    denoiser = settings.performance.resolve("Denoiser", settings.models.dtype)
    assert (denoiser.dtype, denoiser.attention, denoiser.channels_last, denoiser.compile) == ("bfloat16", "eager", True, True)
    assert (denoiser.compile_mode, denoiser.batch_buckets) == ("max-autotune-no-cudagraphs", [2, 6])
    movq = settings.performance.resolve("MovqDecoder", settings.models.dtype)
    assert (movq.dtype, movq.channels_last, movq.compile) == ("float32", True, False)
    # channels_last in the default applies where it can: not to the prior (no convolutions).
    prior = settings.performance.resolve("Prior", settings.models.dtype)
    assert (prior.attention, prior.channels_last) == ("eager", False)


def test_null_dtype_is_the_models_dtype_and_bfloat16_runs_on_cpu():
    settings = parse_service_settings({"models": {"dtype": "bfloat16"},
                                       "performance": {"stages": {"MovqDecoder": {"dtype": "float32"}}}})
    assert settings.performance.resolve("Denoiser", settings.models.dtype).dtype == "bfloat16"
    assert settings.performance.resolve("MovqDecoder", settings.models.dtype).dtype == "float32"


@pytest.mark.parametrize(("performance", "models", "expected"), [
    ({"stages": {"Unet": {}}}, {}, "unknown stage 'Unet'; name a deployment of"),
    ({"stages": {"Prior": {"channels_last": True}}}, {}, "Prior: channels_last cannot apply to a prior stage"),
    ({"stages": {"TextEncoder": {"compile": True}}}, {}, "compile cannot apply to a text_encoder stage"),
    ({"stages": {"MovqDecoder": {"batch_buckets": [1, 2]}}}, {}, "batch_buckets cannot apply to a movq stage"),
    ({"default": {"dtype": "float16"}}, {}, "performance.default.dtype: float16 needs a GPU device"),
    ({"stages": {"Denoiser": {"dtype": "float16"}}}, {}, "performance.stages.Denoiser.dtype: float16 needs a GPU"),
    ({}, {"dtype": "float16"}, "dtype float16 needs a GPU device"),
    ({"default": {"attention": "flash"}}, {}, "args.performance.default.attention: Input should be 'sdpa' or 'eager'"),
    ({"default": {"compile_mode": "fast"}}, {}, "args.performance.default.compile_mode"),
    ({"default": {"batch_buckets": [4, 2]}}, {}, "[4, 2] must be strictly increasing"),
    ({"default": {"batch_buckets": [0]}}, {}, "args.performance.default.batch_buckets.0"),
    ({"default": {"fast": True}}, {}, "args.performance.default.fast: Extra inputs are not permitted"),
])
def test_bad_performance_settings_name_the_field(performance, models, expected):
    with pytest.raises(ConfigError) as error:
        parse_service_settings({"models": models, "performance": performance})
    assert expected in str(error.value)


def test_float16_is_fine_on_a_gpu():
    settings = parse_service_settings({"models": {"device": "cuda", "dtype": "float16"},
                                       "performance": {"stages": {"MovqDecoder": {"dtype": "float32"}}}})
    assert settings.performance.resolve("Denoiser", settings.models.dtype).dtype == "float16"


def test_the_graph_builder_hands_each_stage_its_own_options():
    from serve.graph.build import stage_runtime

    settings = parse_service_settings({"performance": {"stages": {
        "Denoiser": {"dtype": "bfloat16", "channels_last": True, "compile": True, "batch_buckets": [4, 8]}}}})
    assert stage_runtime(settings, "Denoiser") == {"device": "cpu", "dtype": "bfloat16", "options": ModelOptions(
        attention="sdpa", channels_last=True, compile=True, compile_mode="default", batch_buckets=(4, 8))}
    assert stage_runtime(settings, "InpaintDenoiser") == {"device": "cpu", "dtype": "float32", "options": ModelOptions()}
    assert stage_runtime(settings, "Florence2") == {"device": "cpu", "dtype": "float32"}  # takes no options


# --- bucket padding (the policy, on plain tensors) ------------------------------------------------


@pytest.mark.parametrize(("rows", "buckets", "expected"), [
    (1, (1, 2, 4), 1), (3, (1, 2, 4), 4), (4, (1, 2, 4), 4), (5, (1, 2, 4), 5), (3, None, 3), (3, (), 3), (2, (8, 4), 4),
])
def test_a_batch_is_padded_to_the_next_bucket(rows, buckets, expected):
    assert padded_size(rows, buckets) == expected


def test_padding_rows_are_copies_of_the_first_and_the_real_rows_are_kept():
    batch = torch.arange(12.0).reshape(3, 2, 2)
    padded = pad_rows(batch, 5)
    assert padded.shape == (5, 2, 2)
    assert torch.equal(padded[:3], batch) and torch.equal(padded[3], batch[0]) and torch.equal(padded[4], batch[0])
    assert pad_rows(batch, 3) is batch and pad_rows(batch, 2) is batch


# --- the tiny checkpoint ---------------------------------------------------------------------------


def _embeddings(model: DenoiserModel, count: int, seed: int) -> ImageEmbeddings:
    generator = np.random.default_rng(seed)
    dim = model.unet.config.encoder_hid_dim
    rows = generator.standard_normal((2, count, dim)).astype(np.float32)
    return ImageEmbeddings(rows[0], rows[1], list(range(seed, seed + count)))


def _denoise(model: DenoiserModel, counts=(1, 1), guidance=(4.0, 1.0), steps: int = 3) -> np.ndarray:
    """Requests of ``counts`` images (guided: 2 U-Net rows an image; not: 1) stepped together;
    by default 3 rows a step."""
    states = [state for i, (count, scale) in enumerate(zip(counts, guidance))
              for state in model.start_all(_embeddings(model, count, seed=10 * i), DenoiseParams(64, 64, steps, scale))]
    while not all(state.finished for state in states):
        model.step(states)
    return model.finish_all(states)


@pytest.fixture(scope="module")
def unet_rows(tiny_checkpoint):
    """A tiny decoder and the batch sizes its U-Net runs."""
    model = DenoiserModel.from_pretrained(tiny_checkpoint.decoder)
    seen: list[int] = []
    model.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["sample"].shape[0]), with_kwargs=True)
    return model, seen


class RowwiseUNet:
    """A stand-in U-Net whose every output row depends on its own input row alone, exactly
    (elementwise math): padded and unpadded batches must then give bit-identical latents."""

    def __init__(self, real) -> None:
        self.config, self.channels, self.rows = real.config, real.config.out_channels // 2, []

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, return_dict):
        self.rows.append(sample.shape[0])
        embed = added_cond_kwargs["image_embeds"][:, :1, None, None]
        noise = 0.1 * sample[:, : self.channels] + embed + 1e-3 * timestep[:, None, None, None]
        return (torch.cat([noise, noise], dim=1),)


def test_padded_steps_give_exactly_the_unpadded_latents(unet_rows):
    model, _ = unet_rows
    real = model.unet
    model.unet = fake = RowwiseUNet(real)
    try:
        plain = _denoise(model)
        unpadded_rows, fake.rows = fake.rows, []
        model.buckets = (1, 2, 4, 8)
        padded = _denoise(model)
    finally:
        model.unet, model.buckets = real, None
    # 3 rows a step (a guided image and an unguided one), padded to 4.
    assert set(unpadded_rows) == {3} and set(fake.rows) == {4}
    np.testing.assert_array_equal(padded, plain)


def test_padding_on_the_tiny_unet_changes_only_float_rounding(unet_rows):
    """The real U-Net's row results depend on the batch's shape in the last bits (BLAS blocking),
    padded or not; padding must add nothing beyond that (measured: 2.1e-5 at most)."""
    model, seen = unet_rows
    seen.clear()
    plain = _denoise(model)
    assert set(seen) == {3}
    model.buckets = (1, 2, 4, 8)
    seen.clear()
    try:
        padded = _denoise(model)
    finally:
        model.buckets = None
    assert set(seen) == {4}
    np.testing.assert_allclose(padded, plain, rtol=0, atol=1e-4)


def test_sdpa_is_set_explicitly_and_eager_switches_every_attention(tiny_checkpoint):
    from diffusers.models.attention_processor import Attention

    def kinds(module):
        return {type(m.processor).__name__ for m in module.modules() if isinstance(m, Attention)}

    model = DenoiserModel.from_pretrained(tiny_checkpoint.decoder, options=ModelOptions(attention="eager"))
    assert kinds(model.unet) == {"AttnAddedKVProcessor"}
    set_attention(model.unet, "sdpa")
    assert kinds(model.unet) == {"AttnAddedKVProcessor2_0"}


@pytest.fixture(scope="module")
def fp32(tiny_checkpoint):
    return LocalCalls(tiny_checkpoint)


@pytest.mark.parametrize("options", [ModelOptions(attention="eager"), ModelOptions(channels_last=True)], ids=["eager", "channels_last"])
def test_attention_and_memory_format_keep_the_pictures(fp32, tiny_checkpoint, options):
    other = LocalCalls(tiny_checkpoint, options=options)
    assert other.text.text_encoder.config._attn_implementation == other.images.encoder.config._attn_implementation \
        == options.attention
    if options.channels_last:
        weight = other.decoders["text2img"].unet.conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    for s in (spec(seeds=(4, 5), negative_prompt="dog"), spec(steps=4, guidance_scale=1.0)):
        for mine, theirs in zip(other.generate(s), fp32.generate(s), strict=True):
            assert max_diff(mine, theirs) <= MAX_PIXEL_DIFF


def test_bfloat16_on_cpu_stays_within_its_stated_bound(fp32, tiny_checkpoint):
    bf16 = LocalCalls(tiny_checkpoint, dtype="bfloat16")
    assert bf16.decoders["text2img"].unet.dtype == bf16.movq.movq.dtype == torch.bfloat16
    s = spec(prompt="a red circle on a white background", seeds=(1, 2, 3))
    mine, theirs = bf16.generate(s), fp32.generate(s)
    diffs = [float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) for a, b in zip(mine, theirs, strict=True)]
    assert 0 < max(diffs) <= BF16_MEAN_PIXEL_DIFF, diffs
    # The bound is far below what a different picture gives: another seed's image.
    assert np.abs(theirs[0].astype(np.int16) - theirs[1].astype(np.int16)).mean() > 5 * BF16_MEAN_PIXEL_DIFF


def counting_backend():
    """A ``torch.compile`` backend that records each graph Dynamo hands it and runs it as traced."""
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return graphs, counting


def test_a_compiled_unet_traces_once_per_bucket_and_keeps_the_latents(tiny_checkpoint):
    """Dynamo with a counting backend (no code generation, seconds): padding to one bucket
    means one graph for step batches of 3 and 4 rows, and the results are the eager ones."""
    graphs, counting = counting_backend()
    torch._dynamo.reset()
    plain = _denoise(DenoiserModel.from_pretrained(tiny_checkpoint.decoder))
    model = DenoiserModel.from_pretrained(tiny_checkpoint.decoder)
    compiled(model.unet, ModelOptions(compile=True), backend=counting)
    model.buckets = (4,)
    result = _denoise(model)  # 3 rows, padded to 4
    traced = len(graphs)
    _denoise(model, counts=(2,), guidance=(4.0,))  # 4 rows: the same graph
    torch._dynamo.reset()
    assert traced >= 1 and len(graphs) == traced
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
    np.testing.assert_allclose(result, plain, rtol=0, atol=1e-4)  # batch-shape rounding, as above


def test_a_compiled_movq_decoder_keeps_the_pixels(tiny_checkpoint):
    from deployments.movq import MovqModel

    graphs, counting = counting_backend()
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    plain = MovqModel.from_pretrained(tiny_checkpoint.decoder).decode(latents)
    torch._dynamo.reset()
    model = MovqModel.from_pretrained(tiny_checkpoint.decoder, options=ModelOptions(channels_last=True))
    compiled(model.movq.decoder, ModelOptions(compile=True), backend=counting)
    result = model.decode(latents)
    torch._dynamo.reset()
    assert graphs and model.channels_last
    assert max_diff(result, plain) <= MAX_PIXEL_DIFF


@pytest.mark.slow
def test_an_inductor_compiled_unet_matches_eager(tiny_checkpoint):
    """Inductor's code generation on the tiny U-Net (88 s on 2 cores: hence slow)."""
    plain = _denoise(DenoiserModel.from_pretrained(tiny_checkpoint.decoder))
    torch._dynamo.reset()
    model = DenoiserModel.from_pretrained(tiny_checkpoint.decoder, options=ModelOptions(compile=True, batch_buckets=(4,)))
    result = _denoise(model)
    torch._dynamo.reset()
    assert model.buckets == (4,) and model.unet._compiled_call_impl is not None
    np.testing.assert_allclose(result, plain, rtol=0, atol=1e-4)


# --- MOVQ decode in chunks ------------------------------------------------------------------------


def _counting_decoder(model) -> list[int]:
    """Rows of each MOVQ decoder forward of ``model``, recorded as they run."""
    rows: list[int] = []
    forward = model._decode_forward
    model._decode_forward = lambda sample: (rows.append(sample.shape[0]), forward(sample))[1]
    return rows


@pytest.mark.parametrize(("chunk", "forwards"), [(0, [5]), (2, [2, 2, 1]), (5, [5]), (8, [5])])
def test_decode_in_chunks_runs_that_many_images_per_forward_and_keeps_the_pixels(tiny_checkpoint, chunk, forwards):
    from deployments.movq import MovqModel

    latents = np.random.default_rng(1).standard_normal((5, 4, 8, 8)).astype(np.float32)
    whole = MovqModel.from_pretrained(tiny_checkpoint.decoder)
    expected = np.stack([whole.decode(latents[i : i + 1])[0] for i in range(5)])  # one image per forward
    model = MovqModel.from_pretrained(tiny_checkpoint.decoder, options=ModelOptions(decode_chunk=chunk))
    rows = _counting_decoder(model)
    chunks = list(model.decode_chunks(latents))
    assert rows == forwards and [len(c) for c in chunks] == forwards
    assert model.stream is None  # CPU: no CUDA stream
    assert max_diff(np.concatenate(chunks), expected) <= MAX_PIXEL_DIFF
    assert not np.array_equal(chunks[0][0], np.concatenate(chunks)[-1])  # distinct images: order is checked


def test_chunked_decode_rows_keep_each_requests_images_in_order(tiny_checkpoint):
    """Several requests' latents of two sizes, decoded two images per forward: every image
    comes back to its own request in its own place."""
    from deployments.movq import MovqModel

    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in ((3, 4, 8, 8), (1, 4, 6, 8), (2, 4, 8, 8))]
    model = MovqModel.from_pretrained(tiny_checkpoint.decoder, options=ModelOptions(decode_chunk=2))
    rows = _counting_decoder(model)
    decoded = model.decode_many(arrays)
    assert sorted(rows) == [1, 1, 2, 2]  # 5 images of 8x8 in 2+2+1, one of 6x8
    for array, images in zip(arrays, decoded, strict=True):
        assert images.shape[0] == array.shape[0]
        for latent, image in zip(array, images):
            assert max_diff(image, model.decode(latent[None])[0]) <= MAX_PIXEL_DIFF


def test_decode_chunk_is_a_movq_option_only():
    from serve.graph.build import stage_runtime

    settings = parse_service_settings({"performance": {"stages": {"MovqDecoder": {"decode_chunk": 4}}}})
    assert stage_runtime(settings, "MovqDecoder")["options"].decode_chunk == 4
    with pytest.raises(ConfigError, match="decode_chunk cannot apply to a denoiser stage"):
        parse_service_settings({"performance": {"stages": {"Denoiser": {"decode_chunk": 4}}}})
    with pytest.raises(ConfigError, match="decode_chunk"):
        parse_service_settings({"performance": {"default": {"decode_chunk": -1}}})



def test_settings_with_stage_overrides_survive_the_dump_the_ingress_validates():
    """The graph hands the Ingress ``model_dump(mode="json")``: every stage's override, of any
    role, must validate again and resolve to the same options."""
    from serve.settings import ServiceSettings

    settings = parse_service_settings({"performance": {"stages": {
        "Prior": {"dtype": "bfloat16"}, "Denoiser": {"channels_last": True}, "MovqDecoder": {"decode_chunk": 2}}}})
    again = ServiceSettings.model_validate(settings.model_dump(mode="json"))
    for name in ("Prior", "Denoiser", "MovqDecoder", "TextEncoder"):
        assert again.performance.resolve(name, "float32") == settings.performance.resolve(name, "float32")
    assert again.performance.resolve("MovqDecoder", "float32").decode_chunk == 2


def test_a_graph_step_starts_a_new_cuda_graph_step_and_clones_the_outputs(monkeypatch):
    """With CUDA graphs (compile mode reduce-overhead) a replay overwrites the last outputs:
    each forward marks a new step and hands back copies. Without them, the forward is untouched."""
    from deployments.performance import cuda_graphs, graph_step

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    buffer = torch.zeros(2)

    def forward(x):
        buffer.copy_(x)  # as a replayed graph: the same output storage every call
        return (buffer, "kept")

    assert graph_step(forward, False) is forward
    safe = graph_step(forward, True)
    first, tag = safe(torch.ones(2))
    safe(torch.full((2,), 5.0))
    assert marks == [1, 1] and tag == "kept"
    assert first.tolist() == [1.0, 1.0]  # not overwritten by the second call
    assert cuda_graphs(ModelOptions(compile=True, compile_mode="reduce-overhead"))
    assert not cuda_graphs(ModelOptions(compile_mode="reduce-overhead")) and not cuda_graphs(ModelOptions(compile=True))
