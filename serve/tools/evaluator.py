"""An evaluator that knows nothing about the model: colour and shape from pixels and geometry.

* background: the median colour of the image's border;
* foreground: pixels far (Euclidean RGB distance) from the background, largest
  4-connected component;
* colour: a vote of the foreground's saturated pixels by hue band;
* shape: the foreground's fill ratio of its bounding box (square ≈ 1, circle ≈ π/4,
  upright triangle ≈ 1/2) and its width near the top against near the bottom.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

# Hue bands in degrees: [start, end) -> name (red wraps around 0).
HUE_BANDS = (
    (0, 15, "red"),
    (15, 40, "orange"),
    (40, 75, "yellow"),
    (75, 170, "green"),
    (170, 195, "cyan"),
    (195, 255, "blue"),
    (255, 340, "purple"),
    (340, 360, "red"),
)
FOREGROUND_DISTANCE = 60.0
MIN_AREA = 20  # pixels; less is "nothing drawn"
MIN_SATURATION = 0.35
MIN_VALUE = 0.25


def background_colour(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3), image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    return np.median(border.astype(np.float32), axis=0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, current = 0, 0, 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def foreground_mask(image: np.ndarray) -> np.ndarray:
    distance = np.linalg.norm(image.astype(np.float32) - background_colour(image), axis=-1)
    return _largest_component(distance > FOREGROUND_DISTANCE)


def _hue_name(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32) / 255.0
    maximum, minimum = rgb.max(-1), rgb.min(-1)
    delta = maximum - minimum
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(delta == 0, 1, delta)
    hue = np.where(maximum == r, ((g - b) / safe) % 6, np.where(maximum == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    saturation = np.where(maximum == 0, 0, delta / np.where(maximum == 0, 1, maximum))
    names = np.full(hue.shape, "", dtype=object)
    for start, end, name in HUE_BANDS:
        names[(hue >= start) & (hue < end)] = name
    names[(saturation < MIN_SATURATION) | (maximum < MIN_VALUE)] = ""
    return names


def dominant_colour(image: np.ndarray) -> str | None:
    """The colour name most foreground pixels vote for; None if nothing is drawn."""
    mask = foreground_mask(image)
    if mask.sum() < MIN_AREA:
        return None
    votes = Counter(name for name in _hue_name(image[mask]) if name)
    return votes.most_common(1)[0][0] if votes else None


def shape_of(image: np.ndarray) -> str | None:
    """'square', 'circle', 'triangle', or None when the foreground is none of them."""
    mask = foreground_mask(image)
    area = int(mask.sum())
    if area < MIN_AREA:
        return None
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    height, width = bottom - top + 1, right - left + 1
    if max(height, width) > 1.6 * min(height, width):
        return None  # none of the shapes is that elongated
    fill = area / float(height * width)
    rows = mask[top : bottom + 1, left : right + 1].sum(axis=1).astype(np.float32)
    third = max(1, height // 4)
    top_width, bottom_width = rows[:third].mean(), rows[-third:].mean()
    taper = top_width / max(bottom_width, 1.0)
    if fill >= 0.86 and taper > 0.8:
        return "square"
    if 0.68 <= fill < 0.86 and 0.6 < taper < 1.6:
        return "circle"
    if 0.35 <= fill < 0.68 and taper < 0.5:
        return "triangle"
    return None


def mean_pixel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference per channel, in 0-255 units."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())
