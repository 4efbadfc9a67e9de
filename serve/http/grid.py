"""The labelled image grid of a parameter sweep (``POST /v1/sweep``), drawn as sdnext's XYZ grid.

Axis 0 runs along the columns, axis 1 down the rows; a third axis splits the cells into one
grid per value, stacked top to bottom, each under a title band naming that value. Header cells
read ``<field>: <value>``. Pure: tiles in, one PIL image out; :func:`grid_layout` says where
everything goes (the tests check the drawing against it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
GAP = 2
"""Pixels between tiles."""
PAD = 4
"""Pixels around a label."""
MAX_GRID_SIDE = 8192
"""Tiles are scaled down (never up) so that neither side of the tiles' area exceeds this."""
MAX_LABEL_LINES = 3
ROW_HEADER_MIN = 96
"""The row header is at least this wide (a 64-pixel tile is too narrow for a label), at most a tile's width beyond it."""


@dataclass(frozen=True)
class GridAxis:
    """One axis of the grid: the swept field's name and a label per value."""

    field: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class GridLayout:
    """Where a grid's parts go, in pixels; cell ``i`` is column ``i % columns``, row
    ``(i // columns) % rows``, plane ``i // (columns * rows)``."""

    tile: tuple[int, int]
    columns: int
    rows: int
    planes: int
    font_size: int
    left: int
    """Row-header width (0 with one axis)."""
    top: int
    """Column-header height."""
    title: int
    """Each plane's title band (0 with fewer than three axes)."""

    @property
    def line_height(self) -> int:
        return self.font_size + 2

    @property
    def plane_height(self) -> int:
        return self.title + self.top + self.rows * (self.tile[1] + GAP)

    @property
    def size(self) -> tuple[int, int]:
        return self.left + self.columns * (self.tile[0] + GAP), self.planes * self.plane_height

    def cell_origin(self, index: int) -> tuple[int, int]:
        """The top-left pixel of cell ``index``'s tile."""
        column, rest = index % self.columns, index // self.columns
        row, plane = rest % self.rows, rest // self.rows
        return (self.left + column * (self.tile[0] + GAP),
                plane * self.plane_height + self.title + self.top + row * (self.tile[1] + GAP))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size)


def wrap(text: str, font, width: int, max_lines: int = MAX_LABEL_LINES) -> list[str]:
    """``text`` in lines no wider than ``width`` (words, else characters), at most ``max_lines``;
    a cut ends in an ellipsis."""
    lines: list[str] = []
    current = ""
    for char in text:
        candidate = current + char
        if font.getlength(candidate) <= width or not current:
            current = candidate
            continue
        cut = current.rfind(" ")
        if char != " " and cut > 0:  # carry the word over
            lines.append(current[:cut])
            current = current[cut + 1:] + char
        else:
            lines.append(current.rstrip())
            current = char.lstrip()
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = [*lines[:max_lines - 1], last + "…"]
    return lines or [""]


def _label(axis: GridAxis, index: int) -> str:
    return f"{axis.field}: {axis.values[index]}"


def grid_layout(tile: tuple[int, int], axes: Sequence[GridAxis]) -> GridLayout:
    """The layout of a grid of ``tile``-sized images over one to three ``axes``."""
    if not 1 <= len(axes) <= 3:
        raise ValueError(f"a grid has 1 to 3 axes, got {len(axes)}")
    columns = len(axes[0].values)
    rows = len(axes[1].values) if len(axes) > 1 else 1
    planes = len(axes[2].values) if len(axes) > 2 else 1
    scale = min(1.0, MAX_GRID_SIDE / (columns * tile[0]), MAX_GRID_SIDE / (rows * planes * tile[1]))
    tile = (max(1, int(tile[0] * scale)), max(1, int(tile[1] * scale)))
    font_size = min(32, max(12, tile[1] // 12))
    font = _font(font_size)
    line = font_size + 2
    lines = max(len(wrap(_label(axes[0], i), font, tile[0] - 2 * PAD)) for i in range(columns))
    top = lines * line + 2 * PAD
    left = 0
    if len(axes) > 1:
        widest = max(font.getlength(_label(axes[1], i)) for i in range(rows))
        left = int(min(max(widest, ROW_HEADER_MIN - 2 * PAD), ROW_HEADER_MIN + tile[0])) + 2 * PAD
    title = line + 2 * PAD if len(axes) > 2 else 0
    return GridLayout(tile, columns, rows, planes, font_size, left, top, title)


def render_grid(tiles: Sequence[Image.Image], axes: Sequence[GridAxis]) -> Image.Image:
    """The labelled grid of ``tiles`` (one per cell, in cell order; all one size)."""
    layout = grid_layout(tiles[0].size, axes)
    expected = layout.columns * layout.rows * layout.planes
    if len(tiles) != expected:
        raise ValueError(f"{len(tiles)} tiles for a grid of {expected} cells")
    grid = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font(layout.font_size)
    width = layout.size[0]
    for plane in range(layout.planes):
        y0 = plane * layout.plane_height
        if layout.title:
            text = wrap(_label(axes[2], plane), font, width - 2 * PAD, 1)[0]
            draw.text(((width - font.getlength(text)) / 2, y0 + PAD), text, fill=INK, font=font)
        for column in range(layout.columns):
            x = layout.left + column * (layout.tile[0] + GAP)
            for number, text in enumerate(wrap(_label(axes[0], column), font, layout.tile[0] - 2 * PAD)):
                draw.text((x + PAD, y0 + layout.title + PAD + number * layout.line_height), text, fill=INK, font=font)
        if len(axes) > 1:
            fits = max(1, (layout.tile[1] - 2 * PAD) // layout.line_height)
            for row in range(layout.rows):
                y = y0 + layout.title + layout.top + row * (layout.tile[1] + GAP)
                for number, text in enumerate(wrap(_label(axes[1], row), font, layout.left - 2 * PAD, fits)):
                    draw.text((PAD, y + PAD + number * layout.line_height), text, fill=INK, font=font)
    for index, tile in enumerate(tiles):
        if tile.size != tiles[0].size:
            raise ValueError(f"tile {index} is {tile.size}, not {tiles[0].size} like tile 0")
        if tile.size != layout.tile:
            tile = tile.resize(layout.tile, Image.LANCZOS)
        grid.paste(tile.convert("RGB"), layout.cell_origin(index))
    return grid
