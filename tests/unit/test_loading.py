import shutil

import pytest

from deployments.denoiser import DenoiserModel
from deployments.loading import DECODER_LAYOUT, PRIOR_LAYOUT, CheckpointError, check_layout
from deployments.text_encoder import TextEncoderModel
from serve.graph import resolve_model_paths
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


def test_embedded_default_is_the_shipped_trained_model():
    from serve.embedded import EMBEDDED_DIR

    prior, decoder = resolve_model_paths(ModelSettings())
    assert (prior, decoder) == (EMBEDDED_DIR / "prior", EMBEDDED_DIR / "decoder")
    check_layout(prior, PRIOR_LAYOUT, "prior")
    check_layout(decoder, DECODER_LAYOUT, "decoder")


def test_random_tiny_checkpoint_is_created_once(tmp_path, monkeypatch):
    import serve.tiny

    calls = []
    real = serve.tiny.make_tiny
    monkeypatch.setattr(serve.tiny, "make_tiny", lambda out, seed: calls.append(seed) or real(out, seed))
    first = serve.tiny.ensure_tiny(tmp_path, 0)
    second = serve.tiny.ensure_tiny(tmp_path, 0)
    assert first == second and calls == [0]
    check_layout(first[0], PRIOR_LAYOUT, "prior")
    check_layout(first[1], DECODER_LAYOUT, "decoder")


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
