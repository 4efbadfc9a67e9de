"""The sweep's labelled grid: its size, where each cell lands, and labels in its headers. No service."""

import numpy as np
import pytest
from PIL import Image, ImageFont

from serve.http.grid import BACKGROUND, MAX_GRID_SIDE, GridAxis, grid_layout, render_grid, wrap

STEPS = GridAxis("steps", ("4", "8", "16"))
SEED = GridAxis("seed", ("1", "2"))
PROMPT = GridAxis("prompt", ("a red circle", "a blue square on a white background"))


def tiles(count: int, size=(64, 64)) -> list[Image.Image]:
    """Each a solid colour of its own."""
    return [Image.new("RGB", size, (10 + 20 * i, 200 - 10 * i, 100)) for i in range(count)]


def has_ink(image: Image.Image, box: tuple[int, int, int, int]) -> bool:
    return bool((np.asarray(image.crop(box)) != BACKGROUND).any())


@pytest.mark.parametrize("axes", [[STEPS], [STEPS, SEED], [STEPS, SEED, PROMPT]])
def test_every_cell_sits_where_the_layout_says(axes):
    count = int(np.prod([len(axis.values) for axis in axes]))
    grid = render_grid(tiles(count), axes)
    layout = grid_layout((64, 64), axes)
    assert grid.size == layout.size
    assert (layout.columns, layout.rows, layout.planes) == (3, len(axes[1].values) if len(axes) > 1 else 1,
                                                           len(axes[2].values) if len(axes) > 2 else 1)
    pixels = np.asarray(grid)
    for index, tile in enumerate(tiles(count)):
        x, y = layout.cell_origin(index)
        assert (pixels[y:y + 64, x:x + 64] == np.asarray(tile)).all(), index
    # Axis 0 runs along the columns, axis 1 down the rows, axis 2 over the planes.
    assert layout.cell_origin(1)[1] == layout.cell_origin(0)[1] and layout.cell_origin(1)[0] > layout.cell_origin(0)[0]
    if len(axes) > 1:
        assert layout.cell_origin(3)[0] == layout.cell_origin(0)[0] and layout.cell_origin(3)[1] > layout.cell_origin(0)[1]
    if len(axes) > 2:
        assert layout.cell_origin(6)[1] >= layout.plane_height


def test_headers_carry_labels_and_the_rest_stays_blank():
    grid = render_grid(tiles(6), [STEPS, SEED])
    layout = grid_layout((64, 64), [STEPS, SEED])
    width, _ = grid.size
    for column in range(3):  # each column's header is drawn on
        x = layout.left + column * (64 + 2)
        assert has_ink(grid, (x, 0, x + 64, layout.top)), column
    for row in range(2):  # each row's header is drawn on
        y = layout.top + row * (64 + 2)
        assert has_ink(grid, (0, y, layout.left, y + 64)), row
    assert not has_ink(grid, (0, 0, layout.left, layout.top))  # the corner
    assert layout.left > 0 and layout.top > 0 and grid_layout((64, 64), [STEPS]).left == 0


def test_a_third_axis_titles_each_plane():
    axes = [STEPS, SEED, PROMPT]
    grid = render_grid(tiles(12), axes)
    layout = grid_layout((64, 64), axes)
    assert layout.title > 0 and grid.size[1] == 2 * layout.plane_height
    for plane in range(2):
        top = plane * layout.plane_height
        assert has_ink(grid, (0, top, grid.size[0], top + layout.title)), plane


def test_long_labels_wrap_within_the_cell_and_end_in_an_ellipsis():
    font = ImageFont.load_default(12)
    lines = wrap("prompt: " + "a very long prompt about many things " * 5, font, 56, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(font.getlength(line) <= 56 for line in lines)
    assert wrap("steps: 4", font, 56) == ["steps: 4"]


def test_large_tiles_are_scaled_to_bound_the_grid():
    axes = [GridAxis("seed", tuple(map(str, range(16))))]
    layout = grid_layout((1024, 1024), axes)
    assert layout.tile == (512, 512) and 16 * layout.tile[0] <= MAX_GRID_SIDE
    grid = render_grid(tiles(16, (1024, 1024)), axes)
    assert grid.size == layout.size


def test_wrong_tile_count_or_axes_are_refused():
    with pytest.raises(ValueError, match="5 tiles for a grid of 6 cells"):
        render_grid(tiles(5), [STEPS, SEED])
    with pytest.raises(ValueError, match="1 to 3 axes"):
        grid_layout((64, 64), [STEPS, SEED, PROMPT, STEPS])
