import shutil

import pytest

from deployments.denoiser import DenoiserModel
from deployments.loading import DECODER_LAYOUT, PRIOR_LAYOUT, CheckpointError, check_layout
from deployments.text_encoder import TextEncoderModel
from serve.graph.build import resolve_model_paths
from serve.settings import ModelSettings


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"prior checkpoint directory {tmp_path / 'nope'} does not exist"):
        check_layout(tmp_path / "nope", PRIOR_LAYOUT, "prior")


def test_incomplete_directory_lists_what_is_missing(tiny_checkpoint, tmp_path):
    decoder = tmp_path / "decoder"
    shutil.copytree(tiny_checkpoint[1], decoder)
    shutil.rmtree(decoder / "movq")
    (decoder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError) as error:
        check_layout(decoder, DECODER_LAYOUT, "decoder")
    message = str(error.value)
    assert str(decoder) in message
    assert "movq/" in message and "unet/*.safetensors" in message


def test_pickle_weights_are_refused(tiny_checkpoint, tmp_path):
    decoder = tmp_path / "decoder"
    shutil.copytree(tiny_checkpoint[1], decoder)
    weights = decoder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match="only .safetensors weights are loaded"):
        DenoiserModel.from_pretrained(decoder)


def test_stage_loader_checks_its_own_parts(tiny_checkpoint, tmp_path):
    prior = tmp_path / "prior"
    shutil.copytree(tiny_checkpoint[0], prior)
    shutil.rmtree(prior / "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer/"):
        TextEncoderModel.from_pretrained(prior)


def test_configured_paths_are_checked_at_start_up(tmp_path):
    models = ModelSettings(prior_path=tmp_path / "p", decoder_path=tmp_path / "d")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_paths(models)


def test_embedded_default_is_the_shipped_model_with_derived_variants(tmp_path, monkeypatch):
    import serve.embedded
    from serve.embedded import EMBEDDED_DIR

    calls = []
    real = serve.embedded.derive_variant
    monkeypatch.setattr(serve.embedded, "derive_variant", lambda *a: calls.append(a[1]) or real(*a))
    paths = resolve_model_paths(ModelSettings(embedded_dir=tmp_path))
    again = resolve_model_paths(ModelSettings(embedded_dir=tmp_path))
    assert paths == again and sorted(calls) == ["decoder_controlnet", "decoder_inpaint"]  # derived once
    assert (paths.prior, paths.decoder) == (EMBEDDED_DIR / "prior", EMBEDDED_DIR / "decoder")
    assert paths.inpaint_decoder.is_relative_to(tmp_path) and paths.controlnet_decoder.is_relative_to(tmp_path)
    check_layout(paths.prior, PRIOR_LAYOUT, "prior")


def test_derived_variants_compute_what_the_decoder_computes(tmp_path):
    """The variants' extra inputs (masked-image latents and mask; the depth hint) weigh zero."""
    import torch
    from diffusers import UNet2DConditionModel

    from serve.embedded import embedded_checkpoint

    paths = embedded_checkpoint(tmp_path)
    load = lambda root: UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", use_safetensors=True, local_files_only=True)
    decoder, inpaint, controlnet = load(paths.decoder), load(paths.inpaint_decoder), load(paths.controlnet_decoder)
    assert (inpaint.config.in_channels, controlnet.config.addition_embed_type) == (9, "image_hint")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    embeds = torch.randn(2, decoder.config.encoder_hid_dim, generator=generator)
    with torch.no_grad():
        expected = decoder(latents, 500, None, added_cond_kwargs={"image_embeds": embeds}).sample
        extra = torch.randn(2, 5, 8, 8, generator=generator)
        got_inpaint = inpaint(torch.cat([latents, extra], 1), 500, None, added_cond_kwargs={"image_embeds": embeds}).sample
        hint = torch.rand(2, 3, 64, 64, generator=generator)
        got_controlnet = controlnet(latents, 500, None, added_cond_kwargs={"image_embeds": embeds, "hint": hint}).sample
    torch.testing.assert_close(got_inpaint, expected)
    torch.testing.assert_close(got_controlnet, expected)


def test_every_stage_loads_the_embedded_model():
    """The shipped weights through the stages' own loaders (float32, safetensors only), and within budget."""
    from deployments.movq import MovqModel
    from deployments.prior import PriorModel
    from serve.embedded import EMBEDDED_DIR, trained_checkpoint

    prior, decoder = trained_checkpoint()
    TextEncoderModel.from_pretrained(prior)
    PriorModel.from_pretrained(prior)
    DenoiserModel.from_pretrained(decoder)
    MovqModel.from_pretrained(decoder)
    weights = sum(path.stat().st_size for path in EMBEDDED_DIR.rglob("*.safetensors"))
    assert weights <= 25 * 2**20, f"embedded weights are {weights / 2**20:.1f} MiB, over the 25 MiB budget"


def test_derived_variants_follow_the_decoders_movq(tmp_path):
    """A MOVQ retrained alone (the U-Net unchanged) gets variants derived anew, with that MOVQ."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from serve.embedded import EMBEDDED_DIR, with_derived_variants

    prior, decoder = EMBEDDED_DIR / "prior", tmp_path / "decoder"
    shutil.copytree(EMBEDDED_DIR / "decoder", decoder)
    first = with_derived_variants(prior, decoder, tmp_path / "cache")
    weights = decoder / "movq" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["post_quant_conv.weight"] = state["post_quant_conv.weight"] * 0.5
    save_file(state, weights, metadata={"format": "pt"})
    second = with_derived_variants(prior, decoder, tmp_path / "cache")
    assert second.inpaint_decoder != first.inpaint_decoder
    for variant in (second.inpaint_decoder, second.controlnet_decoder):
        derived = load_file(variant / "movq" / "diffusion_pytorch_model.safetensors")
        torch.testing.assert_close(derived["post_quant_conv.weight"], state["post_quant_conv.weight"])
