"""The training package: data, tokenizer, the recipe's determinism and the prior fine-tuning command."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from serve.training.data import (
    COLOURS, FREE, HELD_OUT, LANGUAGES, caption, colour_word, described_matrix, describable, full_caption, load_caption_folder,
    random_attributes, render, sample_scenes, train_combos, write_caption_folder,
)


def _digest(root):
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*.safetensors"))
    }


def test_scenes_are_deterministic_and_held_out_combinations_stay_out():
    assert sample_scenes(50, seed=3) == sample_scenes(50, seed=3)
    assert sample_scenes(50, seed=3) != sample_scenes(50, seed=4)
    assert not set(HELD_OUT) & set(train_combos())
    assert {s.combo for s in sample_scenes(2000, seed=0)} == set(train_combos())
    assert {s.combo for s in sample_scenes(200, seed=0, held_out=True)} == set(HELD_OUT)
    image = render(sample_scenes(1, seed=0)[0])
    assert image.shape == (64, 64, 3) and image.dtype.name == "uint8"


def _hue(rgb) -> float:
    import colorsys

    return colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360


def test_free_colours_are_unnamed_and_far_from_the_palette():
    scenes = sample_scenes(3000, seed=5, free_fraction=0.3)
    free = [s for s in scenes if s.colour == FREE]
    assert 0.25 < len(free) / len(scenes) < 0.35
    assert {(s.shape, s.background) for s in free} == {(s.shape, s.background) for s in scenes}
    palette = [_hue(rgb) for rgb in COLOURS.values()]
    nearest = min(min(abs(_hue(s.rgb) - h), 360 - abs(_hue(s.rgb) - h)) for s in free for h in palette)
    assert nearest >= 20, f"a free colour is {nearest:.0f} degrees from a palette hue"
    rng = random.Random(0)
    names = {colour_word(c, lang) for c in COLOURS for lang in LANGUAGES} | {"желтый", "зеленый"}
    captions = [caption(s, lang, rng) for s in free[:300] for lang in LANGUAGES]
    assert not [text for text in captions if names & set(text.replace(":", " ").split())]
    assert all(s.colour != FREE for s in sample_scenes(500, seed=5))  # none unless asked
    with pytest.raises(ValueError, match="held-out"):
        sample_scenes(10, seed=5, held_out=True, free_fraction=0.3)


def test_described_matrix_matches_a_pair_by_pair_comparison():
    """The CLIP loss's targets: caption j describes image i when the scenes agree on every
    attribute caption j names. Many pairs match on some attributes and not on others."""
    rng = random.Random(3)
    scenes = sample_scenes(60, seed=4, free_fraction=0.3)
    attributes = [describable(s, random_attributes(rng)) for s in scenes]
    match = described_matrix(scenes, attributes)
    expected = torch.tensor(
        [[float(all(getattr(a, name) == getattr(b, name) for name in attributes[j])) for j, b in enumerate(scenes)] for a in scenes]
    )
    assert torch.equal(match, expected)
    assert len(scenes) < expected.sum() < expected.numel()  # more matches than the diagonal, and misses


def test_captions_name_the_scene_in_both_languages():
    scene = sample_scenes(1, seed=0)[0]
    rng = random.Random(0)
    english = caption(scene, "en", rng, {"colour", "shape", "background"})
    russian = caption(scene, "ru", rng, {"colour", "shape", "background"})
    assert scene.colour in english and scene.shape in english and scene.background in english
    assert any("\u0400" <= ch <= "\u04ff" for ch in russian)
    assert full_caption("red", "circle", "white", "ru") == "красный круг на белом фоне"
    assert full_caption("orange", "square", None, "en") == "an orange square"
    with pytest.raises(ValueError, match="unknown language"):
        caption(scene, "de", rng)


def test_trained_tokenizer_keeps_caption_words_whole_in_both_scripts():
    from serve.training.clip import MAX_TOKENS, build_trained_tokenizer

    tokenizer = build_trained_tokenizer()
    assert tokenizer.model_max_length == MAX_TOKENS
    for text in ("a red circle on a black background", "жёлтый треугольник на чёрном фоне", "ЗЕЛЕНАЯ ФИГУРА"):
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text.split()) + 2, tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == text.lower()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from serve.training.recipe import preset, train_tiny

    out = tmp_path_factory.mktemp("smoke")
    summary = train_tiny(out, preset("smoke"), progress=False)
    return out, summary


def test_recipe_is_deterministic_and_writes_the_published_layout(smoke_run, tmp_path):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    from serve.training.recipe import preset, train_tiny

    out, summary = smoke_run
    again = train_tiny(tmp_path, preset("smoke"), progress=False)
    assert _digest(out / "prior") == _digest(tmp_path / "prior")
    assert _digest(out / "decoder") == _digest(tmp_path / "decoder")
    assert again["weights_bytes"] == summary["weights_bytes"]
    assert (out / "work" / "logs" / "decoder.jsonl").is_file()
    prior = KandinskyV22PriorPipeline.from_pretrained(out / "prior", local_files_only=True, use_safetensors=True)
    decoder = KandinskyV22Pipeline.from_pretrained(out / "decoder", local_files_only=True, use_safetensors=True)
    embeds = prior("красный круг", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    image = decoder(image_embeds=embeds.image_embeds, negative_image_embeds=embeds.negative_image_embeds,
                    height=64, width=64, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_recipe_resumes_finished_stages(smoke_run):
    from serve.training.recipe import preset, train_tiny

    out, _ = smoke_run
    summary = train_tiny(out, preset("smoke"), progress=False)
    assert all(summary["stages"][name].get("cached") for name in ("clip", "movq", "movq_refine", "prior", "decoder"))


def test_latent_scale_retrains_only_the_decoder_and_ships_the_scaled_movq(smoke_run, tmp_path):
    import shutil

    from diffusers import VQModel

    from serve.training.data import render_batch, to_model_range
    from serve.training.recipe import preset, train_tiny

    out, summary = smoke_run
    work = tmp_path / "work"
    shutil.copytree(out / "work", work)  # the module's cache stays as the other tests expect it
    rescaled = train_tiny(tmp_path, preset("smoke", movq_latent_scale=3.0), work_dir=work, progress=False)
    assert all(rescaled["stages"][name].get("cached") for name in ("clip", "movq", "movq_refine", "prior"))
    assert not rescaled["stages"]["decoder"].get("cached")
    assert summary["config"]["movq_latent_scale"] == 2.0
    x = to_model_range(render_batch(sample_scenes(3, seed=4)))
    with torch.no_grad():
        shipped = VQModel.from_pretrained(out / "decoder" / "movq", local_files_only=True, use_safetensors=True).encode(x).latents
        larger = VQModel.from_pretrained(tmp_path / "decoder" / "movq", local_files_only=True, use_safetensors=True).encode(x).latents
    assert torch.allclose(larger, 1.5 * shipped, atol=1e-5)


def test_train_prior_command_fine_tunes_a_prior_on_a_folder(smoke_run, tmp_path):
    from serve.cli import main

    out, _ = smoke_run
    data = write_caption_folder(tmp_path / "data", 12, seed=5)
    assert len(load_caption_folder(data)) == 12
    code = main(["train", "prior", "--data", str(data), "--base", str(out / "prior"), "--out", str(tmp_path / "tuned"),
                 "--steps", "3", "--batch-size", "4", "--no-progress"])
    assert code == 0
    tuned, base = _digest(tmp_path / "tuned"), _digest(out / "prior")
    assert tuned.keys() == base.keys()
    assert tuned["prior/diffusion_pytorch_model.safetensors"] != base["prior/diffusion_pytorch_model.safetensors"]
    assert tuned["text_encoder/model.safetensors"] == base["text_encoder/model.safetensors"]


def test_caption_folder_without_captions_is_refused(tmp_path):
    data = write_caption_folder(tmp_path, 2, seed=0)
    (data / "scene00001.txt").unlink()
    with pytest.raises(ValueError, match="scene00001.txt"):
        load_caption_folder(data)


@pytest.mark.slow
def test_train_prior_with_ray_train_workers(smoke_run, tmp_path):
    """``--workers 2``: Ray Train's TorchTrainer, DDP over two CPU workers."""
    pytest.importorskip("pandas", reason="Ray Train needs the [train] extra")
    import ray

    from serve.cli import main

    out, _ = smoke_run
    data = write_caption_folder(tmp_path / "data", 16, seed=6)
    try:
        code = main(["train", "prior", "--data", str(data), "--base", str(out / "prior"), "--out", str(tmp_path / "tuned"),
                     "--steps", "4", "--batch-size", "4", "--workers", "2", "--no-progress"])
    finally:
        ray.shutdown()
    assert code == 0
    assert _digest(tmp_path / "tuned")["prior/diffusion_pytorch_model.safetensors"] != _digest(out / "prior")["prior/diffusion_pytorch_model.safetensors"]


def test_decoder_sees_other_embeddings_only_at_low_noise():
    """``mismatch``: rows with t < low_noise_t are sometimes conditioned on another row's
    embedding (image-to-image at low strength keeps its input); above it, a row sees its own
    embedding or the unconditional one."""
    from diffusers import DDPMScheduler

    from serve.training.decoder import decoder_loss

    seen = {}

    def unet(noisy, t, encoder_hidden_states, added_cond_kwargs):
        seen["t"], seen["condition"] = t, added_cond_kwargs["image_embeds"]
        return type("Out", (), {"sample": torch.zeros(noisy.shape[0], 2 * noisy.shape[1], *noisy.shape[2:])})()

    n = 512
    embeds = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4) + 1  # row i: all i + 1
    zero = torch.zeros(1, 4)
    decoder_loss(unet, DDPMScheduler(), torch.zeros(n, 4, 2, 2), embeds, zero, torch.Generator().manual_seed(0), 250, 0.5)
    row = seen["condition"][:, 0]
    own, unconditional = row == embeds[:, 0], row == 0
    low = seen["t"] < 250
    assert bool((own | unconditional)[~low].all())
    other = ~own & ~unconditional
    assert other.any() and bool(low[other].all())
    assert 0.25 < other[low].float().mean() < 0.6  # about half of the low-noise rows (less the unconditional ones)


def test_decoder_ships_the_moving_average_of_its_weights(monkeypatch):
    """``ema``: the U-Net ends with the average of its weights along the run (with the
    warm-up decay min(ema, (1 + k) / (10 + k))), not its last weights."""
    from diffusers import DDPMScheduler

    from serve.training import decoder as decoder_mod

    class FakeUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, noisy, t, encoder_hidden_states, added_cond_kwargs):
            sample = self.weight * torch.ones(noisy.shape[0], 2 * noisy.shape[1], *noisy.shape[2:])
            return type("Out", (), {"sample": sample})()

    trajectory = []
    real_step = decoder_mod.optimiser_step

    def recording_step(loss, optimizer, schedule, params):
        real_step(loss, optimizer, schedule, params)
        trajectory.append(float(params[0].detach()))

    monkeypatch.setattr(decoder_mod, "optimiser_step", recording_step)
    unet = FakeUNet()
    latents, embeds = torch.randn(8, 4, 2, 2) + 1.0, torch.randn(8, 4)
    decoder_mod.train_decoder(unet, DDPMScheduler(), latents, embeds, torch.zeros(1, 4), steps=6, batch_size=4, lr=0.1, progress=False, ema=0.5)
    expected = 0.0
    for k, weight in enumerate(trajectory):
        expected += (1.0 - min(0.5, (1 + k) / (10 + k))) * (weight - expected)
    assert len(set(trajectory)) == 6  # the weights moved at every step
    shipped = unet.weight.item()
    assert shipped == pytest.approx(expected, abs=1e-6)
    assert shipped != pytest.approx(trajectory[-1], abs=1e-4)


def test_movq_edge_term_penalises_soft_edges_only():
    from serve.training.movq import reconstruction_loss

    sharp = torch.full((1, 3, 16, 16), -1.0)
    sharp[..., 4:12, 4:12] = 1.0
    soft = torch.nn.functional.avg_pool2d(sharp, 3, stride=1, padding=1, count_include_pad=False)
    assert reconstruction_loss(sharp, sharp, edge_weight=1.0) == 0
    plain = reconstruction_loss(soft, sharp)
    assert reconstruction_loss(soft, sharp, edge_weight=1.0) > plain > 0
    shifted = sharp + 0.1  # the same edges, every pixel off by as much
    assert reconstruction_loss(shifted, sharp, edge_weight=1.0) == pytest.approx(reconstruction_loss(shifted, sharp).item())


def test_scaled_movq_encodes_larger_latents_and_decodes_the_same_images():
    """``scale_latents``: an exact reparametrisation, quantised decoding included."""
    from serve.training.data import render_batch, to_model_range
    from serve.training.movq import build_movq, scale_latents

    movq = build_movq(seed=3).eval()
    scaled = build_movq(seed=3).eval()
    scale_latents(scaled, 2.0)
    x = to_model_range(render_batch(sample_scenes(4, seed=2)))
    with torch.no_grad():
        latents, larger = movq.encode(x).latents, scaled.encode(x).latents
        assert torch.allclose(larger, 2.0 * latents, atol=1e-6)
        assert torch.allclose(scaled.decode(larger, force_not_quantize=True).sample, movq.decode(latents, force_not_quantize=True).sample, atol=1e-5)
        assert torch.allclose(scaled.decode(larger).sample, movq.decode(latents).sample, atol=1e-5)
        assert not torch.allclose(scaled.decode(latents, force_not_quantize=True).sample, movq.decode(latents, force_not_quantize=True).sample, atol=1e-3)


def test_scale_latents_refuses_a_movq_without_spatial_norms_and_leaves_it_whole():
    from diffusers import VQModel

    from serve.training.movq import scale_latents

    plain = VQModel(block_out_channels=(32,), norm_num_groups=8, latent_channels=4)
    before = {name: value.clone() for name, value in plain.state_dict().items()}
    with pytest.raises(ValueError, match="spatial norms"):
        scale_latents(plain, 2.0)
    assert all(torch.equal(before[name], value) for name, value in plain.state_dict().items())
