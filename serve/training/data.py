"""Procedural captioned scenes: one coloured shape on a plain background, 64×64.

Everything is deterministic from a seed. A scene is drawn with 4× supersampling
(anti-aliased edges) and captioned from templates in English and Russian; a
caption names any subset of the scene's attributes (colour, shape, size,
background), so the models also learn prompts such as "a red shape", "круг" or
"something blue" (what a negative prompt usually says).

``HELD_OUT`` (colour, shape, background) triples never appear in the training
set; evaluation draws from them.

A fraction of the training scenes (``free_fraction``) has a *free* colour: a hue
between the palette's (cyan, teal, lime, pink, ...), never named in a caption. They
show every shape in colours and on backgrounds of all kinds, so that the vision tower
learns shape apart from colour instead of recognising (colour, shape, background)
triples as wholes (without them it calls held-out purple triangles circles). No free
hue is near a palette hue, so no held-out triple is ever seen in pixels either.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 64
DATA_VERSION = 2  # bump when scenes or captions change: finished recipe stages are then not reused
SUPERSAMPLE = 4
LANGUAGES = ("en", "ru")

# name -> RGB. Hues are far apart (0°, 28°, 52°, 130°, 225°, 275°) so an evaluator can
# tell them apart from pixel statistics alone.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 25),
    "yellow": (235, 210, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "purple": (140, 55, 195),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 242),
    "black": (16, 16, 16),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (8.0, 12.0), "large": (15.0, 21.0)}  # half-extent in pixels
FREE = "free"  # the colour name of a scene with a free colour
FREE_HUES = ((80.0, 105.0), (155.0, 200.0), (300.0, 335.0))  # degrees, in the palette's gaps
COLOUR_JITTER = 14
BACKGROUND_JITTER = 8

# (colour, shape, background) combinations kept out of training: one per colour,
# every shape and background twice.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "black"),
    ("orange", "square", "white"),
    ("yellow", "circle", "black"),
    ("green", "circle", "white"),
    ("blue", "square", "gray"),
    ("purple", "triangle", "gray"),
)

# Caption vocabulary. Russian adjectives agree with the noun: the three shapes are
# masculine (круг, квадрат, треугольник), "фигура" (shape) is feminine. ё is also
# written as е, so both spellings are taught.
_EN_COLOUR = {c: c for c in COLOURS}
_EN_BACKGROUND = {"white": "white", "black": "black", "gray": "gray"}
_RU_COLOUR = {  # (masculine, feminine); variants with е for ё
    "red": [("красный", "красная")],
    "orange": [("оранжевый", "оранжевая")],
    "yellow": [("жёлтый", "жёлтая"), ("желтый", "желтая")],
    "green": [("зелёный", "зелёная"), ("зеленый", "зеленая")],
    "blue": [("синий", "синяя")],
    "purple": [("фиолетовый", "фиолетовая")],
}
_RU_SHAPE = {"circle": "круг", "square": "квадрат", "triangle": "треугольник"}
_RU_SIZE = {"small": ("маленький", "маленькая"), "large": ("большой", "большая")}
_RU_BACKGROUND = {"white": ["белом"], "black": ["чёрном", "черном"], "gray": ["сером"]}
_EN_SIZE = {"small": ["small", "little"], "large": ["large", "big"]}
_EN_PREFIX = ["", "", "a picture of ", "a drawing of ", "an image of "]
_RU_PREFIX = ["", "", "рисунок: ", "картинка: ", "изображение: "]


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    cx: float
    cy: float
    radius: float
    rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.background)


def all_combos() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def train_combos() -> list[tuple[str, str, str]]:
    return [combo for combo in all_combos() if combo not in HELD_OUT]


def _free_rgb(rng: random.Random) -> tuple[int, int, int]:
    import colorsys

    low, high = rng.choice(FREE_HUES)
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(low, high) / 360.0, rng.uniform(0.55, 0.95), rng.uniform(0.6, 0.95))
    return (round(r * 255), round(g * 255), round(b * 255))


def sample_scene(rng: random.Random, combos: list[tuple[str, str, str]], free: bool = False) -> Scene:
    colour, shape, background = rng.choice(combos)
    if free:
        colour = FREE
    size = rng.choice(sorted(SIZES))
    radius = rng.uniform(*SIZES[size])
    margin = radius + 3
    cx = rng.uniform(margin, IMAGE_SIZE - margin)
    cy = rng.uniform(margin, IMAGE_SIZE - margin)

    def jitter(rgb, amount):
        return tuple(int(min(255, max(0, v + rng.randint(-amount, amount)))) for v in rgb)

    rgb = _free_rgb(rng) if free else jitter(COLOURS[colour], COLOUR_JITTER)
    return Scene(shape, colour, background, size, cx, cy, radius, rgb, jitter(BACKGROUNDS[background], BACKGROUND_JITTER))


def sample_scenes(n: int, seed: int, held_out: bool = False, free_fraction: float = 0.0) -> list[Scene]:
    """``n`` scenes from the training combinations (or only the held-out ones); about
    ``free_fraction`` of them with a free colour (training only)."""
    if held_out and free_fraction:
        raise ValueError("held-out scenes are palette scenes (free_fraction must be 0)")
    rng = random.Random(seed)
    combos = list(HELD_OUT) if held_out else train_combos()
    return [sample_scene(rng, combos, free=free_fraction > 0 and rng.random() < free_fraction) for _ in range(n)]


def _coverage(scene: Scene, size: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, from a SUPERSAMPLE× grid."""
    fine = size * SUPERSAMPLE
    coords = (np.arange(fine, dtype=np.float32) + 0.5) / SUPERSAMPLE
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx, dy, r = x - scene.cx, y - scene.cy, scene.radius
    if scene.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif scene.shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif scene.shape == "triangle":
        # Upright isosceles triangle in the box [cx±r, cy±r]: apex at the top centre.
        t = (dy + r) / (2 * r)  # 0 at the apex row, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 array."""
    alpha = _coverage(scene, size)[..., None]
    image = np.asarray(scene.background_rgb, np.float32) * (1 - alpha) + np.asarray(scene.rgb, np.float32) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_batch(scenes: list[Scene]) -> torch.Tensor:
    """(N, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).contiguous()


# --- captions -------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_attributes(rng: random.Random) -> set[str]:
    """Which attributes a training caption names: colour and/or shape, maybe background and size."""
    attributes = set()
    roll = rng.random()
    if roll < 0.7:
        attributes |= {"colour", "shape"}
    elif roll < 0.85:
        attributes.add("colour")
    else:
        attributes.add("shape")
    if rng.random() < 0.5:
        attributes.add("background")
    if rng.random() < 0.35:
        attributes.add("size")
    return attributes


def caption(scene: Scene, lang: str, rng: random.Random, attributes: set[str] | None = None) -> str:
    """A caption naming ``attributes`` of ``scene`` (default: a random subset, always
    including the colour or the shape)."""
    if attributes is None:
        attributes = describable(scene, random_attributes(rng))
    if lang == "en":
        return _caption_en(scene, rng, attributes)
    if lang == "ru":
        return _caption_ru(scene, rng, attributes)
    raise ValueError(f"unknown language {lang!r}; expected one of {LANGUAGES}")


def _caption_en(scene: Scene, rng: random.Random, attributes: set[str]) -> str:
    words = []
    if "size" in attributes:
        words.append(rng.choice(_EN_SIZE[scene.size]))
    if "colour" in attributes:
        words.append(_EN_COLOUR[scene.colour])
    words.append(scene.shape if "shape" in attributes else "shape")
    if "shape" not in attributes and "size" not in attributes and rng.random() < 0.3:
        text = f"something {_EN_COLOUR[scene.colour]}" if rng.random() < 0.5 else _EN_COLOUR[scene.colour]
    else:
        phrase = " ".join(words)
        text = rng.choice(_EN_PREFIX) + (f"{_article(phrase)} {phrase}" if rng.random() < 0.8 else phrase)
    if "background" in attributes:
        text += f" on a {_EN_BACKGROUND[scene.background]} background"
    return text


def _caption_ru(scene: Scene, rng: random.Random, attributes: set[str]) -> str:
    feminine = "shape" not in attributes  # "фигура"
    gender = 1 if feminine else 0
    words = []
    if "size" in attributes:
        words.append(_RU_SIZE[scene.size][gender])
    if "colour" in attributes:
        words.append(rng.choice(_RU_COLOUR[scene.colour])[gender])
    words.append(_RU_SHAPE[scene.shape] if "shape" in attributes else "фигура")
    if feminine and "size" not in attributes and rng.random() < 0.3:
        text = rng.choice(_RU_COLOUR[scene.colour])[0]  # a bare colour word
    else:
        text = rng.choice(_RU_PREFIX) + " ".join(words)
    if "background" in attributes:
        text += f" на {rng.choice(_RU_BACKGROUND[scene.background])} фоне"
    return text


def describable(scene: Scene, attributes: set[str]) -> set[str]:
    """``attributes`` less what a caption of ``scene`` cannot name (a free colour has no name)."""
    if scene.colour == FREE:
        return (attributes - {"colour"}) | {"shape"}
    return attributes


def full_caption(colour: str, shape: str, background: str | None, lang: str) -> str:
    """The plain, complete caption of a combination (evaluation prompts)."""
    if lang == "en":
        text = f"{_article(colour)} {colour} {shape}"
        return text + (f" on a {background} background" if background else "")
    text = f"{_RU_COLOUR[colour][0][0]} {_RU_SHAPE[shape]}"
    return text + (f" на {_RU_BACKGROUND[background][0]} фоне" if background else "")


def colour_word(colour: str, lang: str) -> str:
    return colour if lang == "en" else _RU_COLOUR[colour][0][0]


CAPTION_ATTRIBUTES = ("colour", "shape", "background", "size")


def described_matrix(scenes: list[Scene], attributes: list[set[str]]) -> torch.Tensor:
    """``match[i, j]`` = 1.0 where caption ``j`` (of ``scenes[j]``, naming ``attributes[j]``)
    describes ``scenes[i]`` too: the two scenes agree on every attribute the caption names.
    One tensor op for the whole batch (a pair-by-pair loop took 7 % of a CLIP step)."""
    values = torch.tensor([[hash(getattr(s, name)) for name in CAPTION_ATTRIBUTES] for s in scenes])
    named = torch.tensor([[name in a for name in CAPTION_ATTRIBUTES] for a in attributes])
    equal = values[:, None, :] == values[None, :, :]  # [i, j, attribute]
    return (equal | ~named[None, :, :]).all(-1).float()


def caption_words() -> list[str]:
    """Every word the captions use, both languages (the tokenizer's extra corpus)."""
    words = set()
    for text in (
        list(_EN_COLOUR.values()) + list(_EN_BACKGROUND.values()) + list(SHAPES)
        + [w for ws in _EN_SIZE.values() for w in ws] + list(_RU_SHAPE.values())
        + [w for pair in _RU_SIZE.values() for w in pair]
        + [w for vs in _RU_BACKGROUND.values() for w in vs]
        + [w for vs in _RU_COLOUR.values() for pair in vs for w in pair]
        + _EN_PREFIX + _RU_PREFIX
        + ["a an shape something on background фигура на фоне"]
    ):
        words.update(text.replace(":", " ").split())
    return sorted(words)


# --- datasets -------------------------------------------------------------------------


@dataclass
class SceneSet:
    """Rendered scenes: ``images`` (N, 3, H, W) uint8 and their ``scenes``."""

    images: torch.Tensor
    scenes: list[Scene]

    def __len__(self) -> int:
        return len(self.scenes)

    def captions(self, indices, rng: random.Random) -> list[str]:
        """A fresh random caption (random language) for each index."""
        return [caption(self.scenes[i], rng.choice(LANGUAGES), rng) for i in indices]

    def captions_with_attributes(self, indices, rng: random.Random) -> tuple[list[str], list[set[str]]]:
        attributes = [describable(self.scenes[i], random_attributes(rng)) for i in indices]
        texts = [caption(self.scenes[i], rng.choice(LANGUAGES), rng, a) for i, a in zip(indices, attributes)]
        return texts, attributes


def make_scene_set(n: int, seed: int, held_out: bool = False, free_fraction: float = 0.0) -> SceneSet:
    scenes = sample_scenes(n, seed, held_out, free_fraction)
    return SceneSet(render_batch(scenes), scenes)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the MOVQ's and the pipelines' range)."""
    return images.float() / 127.5 - 1.0


# --- folders of captioned images (prior fine-tuning) -------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_caption_folder(folder: Path | str) -> list[tuple[Path, list[str]]]:
    """``IMAGE.png`` + ``IMAGE.txt`` pairs (one caption per non-empty line).

    Images without a caption file are an error, not silently skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    pairs, missing = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        text_path = path.with_suffix(".txt")
        if not text_path.is_file():
            missing.append(text_path.name)
            continue
        captions = [line.strip() for line in text_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not captions:
            missing.append(f"{text_path.name} (empty)")
            continue
        pairs.append((path, captions))
    if missing:
        raise ValueError(f"{folder}: images without captions: {', '.join(missing[:10])}")
    if not pairs:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) with caption files found")
    return pairs


def write_caption_folder(folder: Path | str, n: int, seed: int, held_out: bool = False) -> Path:
    """Write ``n`` synthetic scenes as PNG + caption files (an example fine-tuning set)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    for i, scene in enumerate(sample_scenes(n, seed, held_out)):
        Image.fromarray(render(scene)).save(folder / f"scene{i:05d}.png")
        lines = [caption(scene, lang, rng) for lang in LANGUAGES]
        (folder / f"scene{i:05d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
