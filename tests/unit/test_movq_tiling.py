"""Tiled MOVQ decoding and encoding (deployments/tiling.py, MovqModel), without Ray.

The bounds below were measured on the embedded trained tiny model (serve/embedded), decoding
latents that its own encoder made from a mosaic of its training scenes, cropped so that the
scenes' edges do not fall on tile edges. Tiled vs whole, uint8 pixels (0..255):

=================  =========  ==========  =============  =============================
size               tile/over  tiles       mean |diff|    max |diff|   seam ratio
=================  =========  ==========  =============  =============================
256x256            128/32     3x3         3.16 (11.44)   41 (119)     1.46 (no blending: 16.1)
512x512            256/64     3x3         2.66 (5.53)    46 (70)      1.08 (no blending: 17.7)
192x320            128/32     2x3         2.25 (6.86)    33 (86)      1.13
=================  =========  ==========  =============  =============================

In brackets: each tile normalised by its own GroupNorm statistics. Most of that difference
is the statistics (a tile's are not the image's; with the whole image's own statistics the
256x256 decode differs by 0.05 on average), so the tiles share theirs: a first pass over
every tile records each GroupNorm's statistics, pooled into one mean and variance per norm
(deployments.tiling.SharedGroupNorms), which the blended pass uses. What remains is each
tile's zero-padded border seen through the upstream layers. Encoding 256x256 in 3x3 tiles
of 128/32: latents differ by 0.15 on average, 0.54 at most (per-tile statistics: 0.73 and
2.55; their mean magnitude is 1.84). Tiles this small against 64-pixel scenes are a worst
case; the bounds shrink as tiles grow. The seam ratio is the mean jump of the error across a
tile edge over its mean jump elsewhere: blending keeps it near 1, where abutting tiles
without blending give ~16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.movq import MovqModel
from deployments.tiling import ramp, spans, tiled, weights

MEASURED = {  # (height, width, tile, overlap): (mean bound, max bound); measured 3.16/41, 2.66/46, 2.25/33
    (256, 256, 128, 32): (3.7, 50),
    (512, 512, 256, 64): (3.1, 55),
    (192, 320, 128, 32): (2.7, 40),
}
SEAM_FACTOR = 2.0  # measured 1.08 to 1.46 with blending, 16 to 18 without
ENCODE_MEAN, ENCODE_MAX = 0.2, 0.65  # measured 0.15 and 0.54


@pytest.fixture(scope="module")
def movq():
    from serve.embedded import trained_checkpoint

    torch.manual_seed(0)
    return MovqModel.from_pretrained(trained_checkpoint()[1])


def tiled_like(model: MovqModel, tile: int, overlap: int) -> MovqModel:
    return MovqModel(model.movq, model.device, tile, overlap)


def mosaic(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Training scenes (64 px each) side by side, cropped 24 px in: their edges fall off the tile grid."""
    from serve.training.data import render, sample_scenes

    rows, cols = height // 64 + 1, width // 64 + 1
    cells = [render(scene) for scene in sample_scenes(rows * cols, seed)]
    big = np.concatenate([np.concatenate(cells[r * cols : (r + 1) * cols], 1) for r in range(rows)], 0)
    return big[24 : 24 + height, 24 : 24 + width]


def pixels_and_latents(model: MovqModel, height: int, width: int) -> tuple[torch.Tensor, np.ndarray]:
    pixels = model.image_processor.preprocess(Image.fromarray(mosaic(height, width)), height=height, width=width)
    with torch.inference_mode():
        return pixels, model.movq.encode(pixels)["latents"].numpy()


def tile_edges(model: MovqModel, size: int) -> list[int]:
    """Interior tile edges (starts and ends) along one side, in pixels."""
    latent = size // model.scale
    return sorted({p * model.scale for span in spans(latent, model.tile, model.overlap) for p in span} - {0, size})


def seam_ratio(tiled: np.ndarray, whole: np.ndarray, edges_y: list[int], edges_x: list[int]) -> float:
    """The mean jump of the error across tile edges over its mean jump elsewhere (the worse axis)."""
    error = tiled.astype(np.float64) - whole
    ratios = []
    for axis, edges in ((1, edges_x), (0, edges_y)):
        jump = np.abs(np.diff(error, axis=axis)).mean(axis=tuple(a for a in (0, 1, 2) if a != axis))
        at_edge = np.zeros(len(jump), bool)
        at_edge[[p - 1 for p in edges]] = True  # the step from pixel p-1 to p
        ratios.append(jump[at_edge].mean() / jump[~at_edge].mean())
    return max(ratios)


# --- the tile grid and its weights -----------------------------------------------------------


@pytest.mark.parametrize("size,tile,overlap", [(32, 16, 4), (40, 16, 4), (24, 16, 4), (33, 16, 0), (100, 17, 8), (16, 16, 4),
                                               (9, 16, 4), (256, 128, 16), (257, 128, 64)])
def test_tiles_cover_the_side_and_their_weights_sum_to_one(size, tile, overlap):
    tiles = spans(size, tile, overlap)
    assert tiles[0][0] == 0 and tiles[-1][1] == size
    assert all(end - start == min(tile, size) for start, end in tiles)
    assert all(next_start <= end - overlap for (_, end), (next_start, _) in zip(tiles, tiles[1:])), "overlap kept"
    for scale in (1, 8):
        total = np.zeros(size * scale)
        for (start, end), w in zip(tiles, weights(tiles, scale)):
            assert w.shape == ((end - start) * scale,) and (w >= 0).all() and (w <= 1).all()
            total[start * scale : end * scale] += w.numpy()
        np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_an_edge_shared_with_a_neighbour_weighs_next_to_nothing():
    tiles = spans(40, 16, 4)
    first, middle, last = weights(tiles, 8)
    assert first[0] == 1 and last[-1] == 1, "the image's own border is not faded"
    assert first[-1] < 1e-3 and middle[0] < 1e-3 and middle[-1] < 1e-3 and last[0] < 1e-3
    np.testing.assert_allclose((ramp(8) + ramp(8).flip(0)).numpy(), 1.0, atol=1e-6)


# --- decoding --------------------------------------------------------------------------------


def test_at_or_below_the_tile_size_decoding_is_byte_identical_and_whole(movq):
    _, latents = pixels_and_latents(movq, 256, 192)
    model = tiled_like(movq, 256, 64)
    assert not model.tiles(latents.shape[-2:])
    assert np.array_equal(model.decode(latents), movq.decode(latents))
    pixels, _ = pixels_and_latents(movq, 256, 192)
    with torch.inference_mode():
        assert torch.equal(model._encode_pixels(pixels), movq._encode_pixels(pixels))


@pytest.mark.parametrize("height,width,tile,overlap", list(MEASURED))
def test_tiled_decode_stays_within_the_measured_bound_of_the_whole_decode(movq, height, width, tile, overlap):
    _, latents = pixels_and_latents(movq, height, width)
    model = tiled_like(movq, tile, overlap)
    seen = []
    forward = model._decode_forward
    model._decode_forward = lambda sample: seen.append(tuple(sample.shape[-2:])) or forward(sample)
    tiled, whole = model.decode(latents), movq.decode(latents)
    assert tiled.shape == whole.shape == (1, height, width, 3) and tiled.dtype == np.uint8
    assert len(seen) > 1 and all(max(shape) <= tile // model.scale for shape in seen), "every forward is one tile"
    diff = np.abs(tiled.astype(np.int16) - whole)
    mean_bound, max_bound = MEASURED[(height, width, tile, overlap)]
    assert 0 < diff.mean() <= mean_bound and diff.max() <= max_bound, (diff.mean(), diff.max())
    ratio = seam_ratio(tiled[0], whole[0], tile_edges(model, height), tile_edges(model, width))
    assert ratio <= SEAM_FACTOR, f"a seam: the error jumps {ratio:.2f}x more across tile edges than elsewhere"


def test_shared_norm_statistics_cut_the_tiles_error_to_under_half(movq):
    _, latents = pixels_and_latents(movq, 256, 256)
    model = tiled_like(movq, 128, 32)
    whole = movq.decode(latents)
    with torch.inference_mode():
        sample = torch.tensor(latents)
        own = tiled(model._decode_forward, sample, tuple(sample.shape[-2:]), model.tile, model.overlap, 1, model.scale)
    own = ((own * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    shared = model.decode(latents)
    own_error, shared_error = (np.abs(image.astype(np.int16) - whole).mean() for image in (own, shared))
    assert shared_error < own_error / 2, (shared_error, own_error)


def test_the_seam_measure_sees_tiles_that_abut_without_blending(movq):
    _, latents = pixels_and_latents(movq, 256, 256)
    model = tiled_like(movq, 128, 0)  # two tiles a side, cut hard
    ratio = seam_ratio(model.decode(latents)[0], movq.decode(latents)[0], tile_edges(model, 256), tile_edges(model, 256))
    assert ratio > 4 * SEAM_FACTOR, ratio


def test_decode_many_tiles_each_size_of_a_mixed_batch(movq):
    _, big = pixels_and_latents(movq, 192, 320)
    _, small = pixels_and_latents(movq, 64, 64)
    model = tiled_like(movq, 128, 32)
    both = model.decode_many([big, small, np.concatenate([big, big])])
    assert [a.shape for a in both] == [(1, 192, 320, 3), (1, 64, 64, 3), (2, 192, 320, 3)]
    assert np.array_equal(both[0][0], both[2][1]) and np.array_equal(both[1], movq.decode(small))


# --- encoding --------------------------------------------------------------------------------


def test_tiled_encode_stays_within_the_measured_bound_of_the_whole_encode(movq):
    from deployments.messages import InitImage

    image = mosaic(256, 256)
    model = tiled_like(movq, 128, 32)
    [(tiled, _)] = model.encode([InitImage(image, 256, 256)])
    [(whole, _)] = movq.encode([InitImage(image, 256, 256)])
    assert tiled.shape == whole.shape == (1, 4, 32, 32)
    diff = np.abs(tiled - whole)
    assert 0 < diff.mean() <= ENCODE_MEAN and diff.max() <= ENCODE_MAX, (diff.mean(), diff.max())


def test_tiled_inpainting_input_keeps_its_mask(movq):
    from deployments.messages import InitImage

    mask = np.zeros((192, 320), np.uint8)
    mask[:, 160:] = 255
    model = tiled_like(movq, 128, 32)
    [(latents, keep)] = model.encode([InitImage(mosaic(192, 320), 320, 192, mask=mask)])
    [(_, whole_keep)] = movq.encode([InitImage(mosaic(192, 320), 320, 192, mask=mask)])
    assert latents.shape == (1, 4, 24, 40) and np.array_equal(keep, whole_keep)


# --- settings --------------------------------------------------------------------------------


def test_tile_settings_are_checked_with_what_to_change():
    from pydantic import ValidationError

    from serve.settings import MovqSettings, parse_service_settings

    assert parse_service_settings({}).movq == MovqSettings(tile_size=1152, tile_overlap=128)
    assert parse_service_settings({"movq": {"tile_size": None}}).movq.tile_size is None
    with pytest.raises(ValidationError, match="lower tile_overlap to at most 256"):
        MovqSettings(tile_size=512, tile_overlap=320)
    with pytest.raises(ValidationError, match="multiple of 8"):
        MovqSettings(tile_size=1020)
    with pytest.raises(ValidationError, match="0 \\(never tile\\) or at least 64"):
        MovqSettings(tile_size=32, tile_overlap=8)
    with pytest.raises(ValueError, match="scale factor 8"):
        MovqModel(_fake_movq(), "cpu", 100, 0)
    with pytest.raises(ValueError, match="lower the overlap"):
        MovqModel(_fake_movq(), "cpu", 64, 40)


def _fake_movq():
    """Enough of a VQModel for MovqModel's constructor."""
    from types import SimpleNamespace

    return SimpleNamespace(dtype=torch.float32, config=SimpleNamespace(block_out_channels=[1, 1, 1, 1], latent_channels=4))


def test_movq_memory_bench_smoke(tmp_path):
    """Two fresh processes (whole and tiled decode at 128², tiles of 64): the table and the JSON."""
    import json

    from serve.tools.bench_movq import bench_movq_memory

    result = bench_movq_memory(tmp_path / "movq.json", sizes="128", ops="decode", tile_size=64, tile_overlap=16, threads=1)
    rows = result["rows"]
    assert [(r["tiled"], r["tiles"]) for r in rows] == [(False, 1), (True, 9)]
    assert all(r["peak_rss_over_load_mb"] >= 0 and r["seconds"] > 0 for r in rows)
    assert json.loads((tmp_path / "movq.json").read_text())["rows"] == rows
