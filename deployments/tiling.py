"""Overlapping tiles blended with weights that sum to one: run a convolutional model (the MOVQ
decoder or encoder) on a large input with the memory of one tile.

The tile grid is laid out on the latent grid (the coarser side of the model), so that input and
output tiles line up exactly at any scale factor. Each output pixel is a convex combination of
the tiles covering it: inside an overlap one tile's weight falls as its neighbour's rises, on a
cosine ramp across the whole overlap, so no edge of a tile (where its zero padding shows) has
weight in the result and no seam appears. The grid is separable: each tile's 2-D weight is the
product of a row weight and a column weight, both normalised to sum to one over the tiles.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch


def spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the fewest tiles of ``tile`` that cover ``size`` with at least ``overlap``
    shared between neighbours; the starts are spread evenly, so the overlaps are as wide as that
    number of tiles allows (wider overlaps blend more smoothly). One span when ``size <= tile``."""
    if size <= tile:
        return [(0, size)]
    count = math.ceil((size - overlap) / (tile - overlap))
    starts = [round(i * (size - tile) / (count - 1)) for i in range(count)]
    return [(start, start + tile) for start in starts]


def ramp(length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``length`` rising weights in (0, 1), sampled at pixel centres: ``ramp(n) + ramp(n).flip(0) == 1``."""
    t = (torch.arange(length, dtype=torch.float64) + 0.5) / length
    return torch.sin(t * (math.pi / 2)).square().to(dtype)


def weights(tiles: list[tuple[int, int]], scale: int = 1) -> list[torch.Tensor]:
    """One weight vector per span of ``tiles`` (in units ``scale`` times finer): a ramp up across the
    overlap with the previous tile, a ramp down across the overlap with the next, 1 elsewhere;
    normalised so that at every position the weights of the tiles covering it sum to one."""
    size = tiles[-1][1] * scale
    raw = []
    for index, (start, end) in enumerate(tiles):
        w = torch.ones((end - start) * scale, dtype=torch.float64)
        if index > 0 and tiles[index - 1][1] > start:
            up = (tiles[index - 1][1] - start) * scale
            w[:up] *= ramp(up, torch.float64)
        if index + 1 < len(tiles) and tiles[index + 1][0] < end:
            down = (end - tiles[index + 1][0]) * scale
            w[len(w) - down:] *= ramp(down, torch.float64).flip(0)
        raw.append(w)
    # Where the ramps of neighbouring tiles are complementary this is a no-op; it makes the
    # weights a partition of unity also where three tiles meet or the overlaps differ.
    total = torch.zeros(size, dtype=torch.float64)
    for (start, end), w in zip(tiles, raw):
        total[start * scale : end * scale] += w
    return [(w / total[start * scale : end * scale]).float() for (start, end), w in zip(tiles, raw)]


def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    latent_size: tuple[int, int],
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
) -> torch.Tensor:
    """``fn`` applied to overlapping tiles of ``x`` (N, C, H, W) and blended, as float32.

    ``tile`` and ``overlap`` are in latent pixels, ``latent_size`` is (h, w); ``x`` has
    ``in_scale`` pixels per latent pixel and ``fn``'s output ``out_scale`` (decoding: 1 and 8;
    encoding: 8 and 1).
    """
    rows, cols = (spans(size, tile, overlap) for size in latent_size)
    row_weights, col_weights = weights(rows, out_scale), weights(cols, out_scale)
    out = None
    for (top, bottom), wy in zip(rows, row_weights):
        for (left, right), wx in zip(cols, col_weights):
            piece = fn(x[..., top * in_scale : bottom * in_scale, left * in_scale : right * in_scale]).float()
            if out is None:
                out = piece.new_zeros((*piece.shape[:2], latent_size[0] * out_scale, latent_size[1] * out_scale))
            weight = wy.to(piece.device)[:, None] * wx.to(piece.device)[None, :]
            out[..., top * out_scale : bottom * out_scale, left * out_scale : right * out_scale] += piece * weight
    return out


class SharedGroupNorms:
    """Every ``GroupNorm`` of a module normalised alike in every tile.

    A tile's own statistics differ from the whole image's (a tile of sky is not the picture),
    which shifts each tile's colours: the dominant error of naive tiling. :meth:`recording`
    notes each norm's per-sample, per-group mean and variance, call by call, over a pass of
    every tile; :meth:`pool` combines each norm's tiles into one mean and variance (the law
    of total variance: the tiles are the same size); :meth:`replaying` then normalises every
    tile with those, in call order.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.replayed = 0

    @contextmanager
    def recording(self):
        self.stats = []

        def record(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
            groups = x.float().reshape(x.shape[0], norm.num_groups, -1)
            self.stats.append((groups.mean(-1), groups.var(-1, unbiased=False)))
            return torch.nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)

        with self._patched(record):
            yield self

    def pool(self, tiles: int) -> None:
        """The recorded statistics of ``tiles`` passes -> one mean and variance per norm call."""
        calls = len(self.stats) // tiles
        if not calls or calls * tiles != len(self.stats):
            raise RuntimeError(f"{len(self.stats)} GroupNorm calls recorded over {tiles} tiles")
        pooled = []
        for call in range(calls):
            means = torch.stack([self.stats[tile * calls + call][0] for tile in range(tiles)])
            variances = torch.stack([self.stats[tile * calls + call][1] for tile in range(tiles)])
            mean = means.mean(0)
            pooled.append((mean, (variances + (means - mean).square()).mean(0)))
        self.stats = pooled

    @contextmanager
    def replaying(self):
        """Within, each pass of the module (one tile) reuses the pooled statistics in order."""

        def replay(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
            mean, var = self.stats[self.replayed % len(self.stats)]
            self.replayed += 1
            groups = x.float().reshape(x.shape[0], norm.num_groups, -1)
            normed = ((groups - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape).to(x.dtype)
            if norm.affine:
                shape = (1, -1) + (1,) * (x.dim() - 2)
                normed = normed * norm.weight.reshape(shape) + norm.bias.reshape(shape)
            return normed

        self.replayed = 0
        with self._patched(replay):
            yield self

    @contextmanager
    def _patched(self, forward: Callable[[torch.nn.GroupNorm, torch.Tensor], torch.Tensor]):
        for norm in self.norms:
            norm.forward = lambda x, norm=norm: forward(norm, x)
        try:
            yield
        finally:
            for norm in self.norms:
                del norm.forward


def tiled_with_shared_norms(
    fn: Callable[[torch.Tensor], torch.Tensor],
    module: torch.nn.Module,
    x: torch.Tensor,
    latent_size: tuple[int, int],
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
) -> torch.Tensor:
    """:func:`tiled`, with ``module``'s GroupNorms normalised alike in every tile by their
    statistics pooled over a first pass of every tile (:class:`SharedGroupNorms`): twice
    the tiles' work, the memory of one tile."""
    norms = SharedGroupNorms(module)
    with norms.recording():
        tiled(fn, x, latent_size, tile, overlap, in_scale, out_scale)
    count = len(spans(latent_size[0], tile, overlap)) * len(spans(latent_size[1], tile, overlap))
    norms.pool(count)
    with norms.replaying():
        out = tiled(fn, x, latent_size, tile, overlap, in_scale, out_scale)
    if norms.replayed != count * len(norms.stats):
        raise RuntimeError("the tiles called other GroupNorms than the recording pass")
    return out
