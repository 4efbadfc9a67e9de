"""Does the embedded model draw what it is asked? Checked with an evaluator that knows nothing of the model.

Generation runs the service's own graph in process (``generate.py``) on the shipped
weights; the evaluator (``serve/tools/evaluator.py``, also the quality benchmark's) reads colour from pixel statistics and shape
from geometry and knows nothing of the model. The thresholds are the issue's; the
measured numbers are printed (``-s``).
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import numpy as np
import pytest

from serve.training.data import BACKGROUNDS, COLOURS, HELD_OUT, LANGUAGES, SHAPES, full_caption, render, sample_scenes
from tests.quality import generate
from serve.tools.evaluator import dominant_colour, mean_pixel_distance, shape_of

PER_COMBO = 16  # images per held-out combination (6 combinations): 96 per language


_SERVICE_STEPS = {"prior_steps": generate.SERVICE_PRIOR_STEPS, "steps": generate.SERVICE_STEPS}


def _accuracy(images, combos) -> tuple[float, float]:
    colour = np.mean([dominant_colour(image) == c for image, (c, _, _) in zip(images, combos)])
    shape = np.mean([shape_of(image) == s for image, (_, s, _) in zip(images, combos)])
    return float(colour), float(shape)


def test_evaluator_reads_rendered_scenes():
    """The evaluator itself, on ground-truth renders (held-out and training combinations)."""
    scenes = sample_scenes(60, seed=123) + sample_scenes(30, seed=321, held_out=True)
    images = [render(scene) for scene in scenes]
    assert all(dominant_colour(image) == scene.colour for image, scene in zip(images, scenes))
    assert np.mean([shape_of(image) == scene.shape for image, scene in zip(images, scenes)]) >= 0.95
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert dominant_colour(blank) is None and shape_of(blank) is None


@pytest.fixture(scope="module")
def held_out_default():
    """Held-out captions in each language at the service's default steps and guidance: {lang: (images, combos)}."""
    results = {}
    for lang in LANGUAGES:
        prompts, combos = generate.held_out_prompts(lang, PER_COMBO)
        results[lang] = (generate.text_to_image(prompts, seed=5000, **_SERVICE_STEPS), combos)
    return results


@pytest.mark.parametrize("lang", LANGUAGES)
def test_text_to_image_draws_the_asked_colour_and_shape(held_out_default, lang):
    images, combos = held_out_default[lang]
    colour, shape = _accuracy(images, combos)
    print(f"\n[{lang}] held-out text-to-image: colour {colour:.0%}, shape {shape:.0%} of {len(images)}")
    assert colour >= 0.90, f"colour accuracy {colour:.0%} < 90%"
    assert shape >= 0.70, f"shape accuracy {shape:.0%} < 70%"


def _both(images, combos) -> float:
    return float(np.mean([dominant_colour(i) == c and shape_of(i) == s for i, (c, s, _) in zip(images, combos)]))


def test_guidance_matters(held_out_default):
    """Guidance 1.0 draws the asked colour, and the asked colour and shape together,
    measurably less often than the default."""
    images, combos = held_out_default["en"]
    default_colour, default_shape = _accuracy(images, combos)
    prompts, combos = generate.held_out_prompts("en", PER_COMBO)
    weak = generate.text_to_image(prompts, seed=5000, guidance=1.0, **_SERVICE_STEPS)
    weak_colour, weak_shape = _accuracy(weak, combos)
    print(f"\nguidance 1.0: colour {weak_colour:.0%}, shape {weak_shape:.0%}, both {_both(weak, combos):.0%}; "
          f"default {generate.GUIDANCE}: colour {default_colour:.0%}, shape {default_shape:.0%}, both {_both(images, combos):.0%}")
    assert weak_colour <= default_colour - 0.10, "guidance 1.0 should draw the asked colour measurably less often"
    assert _both(weak, combos) <= _both(images, combos) - 0.10, "guidance 1.0 should draw the asked prompt measurably less often"


def test_negative_prompt_lowers_that_colour():
    """Prompts that name no colour; the negative prompt names the palette colour drawn most often without it."""
    prompts = [f"a {shape}" for shape in SHAPES for _ in range(8)]
    plain = generate.text_to_image(prompts, seed=2000)
    drawn = Counter(dominant_colour(image) for image in plain)
    colour = next((name for name, _ in drawn.most_common() if name in COLOURS), None)
    assert colour is not None, f"no palette colour drawn without a negative prompt ({dict(drawn)}): the test would show nothing"
    negative = generate.text_to_image(prompts, seed=2000, negative_prompt=colour)
    before = np.mean([dominant_colour(image) == colour for image in plain])
    after = np.mean([dominant_colour(image) == colour for image in negative])
    print(f"\n{colour} without negative prompt {before:.0%}, with negative {colour!r} {after:.0%} of {len(prompts)}")
    assert after <= before / 2, f"negative prompt {colour!r}: its frequency {after:.0%} not below half of {before:.0%}"


@lru_cache(maxsize=1)
def _img2img_runs():
    """Held-out scenes, each with a prompt asking another colour and shape, at strength 0.2 and 0.95."""
    scenes = sample_scenes(len(HELD_OUT) * 2, seed=77, held_out=True)
    inputs = [render(scene) for scene in scenes]
    targets = [(next(c for c in COLOURS if c != s.colour and c != "orange"), SHAPES[(SHAPES.index(s.shape) + 1) % 3]) for s in scenes]
    prompts = [full_caption(colour, shape, None, "en") for colour, shape in targets]
    low = generate.img2img(inputs, prompts, strength=0.2, seed=3000)
    high = generate.img2img(inputs, prompts, strength=0.95, seed=3000)
    return scenes, inputs, targets, low, high


def test_img2img_strength():
    """The issue's check: the prompt asks for another colour and shape than the input's; at
    strength 0.2 the result stays close to the input (pixel distance), at 0.95 it follows the prompt."""
    _, inputs, targets, low, high = _img2img_runs()
    low_distance = np.mean([mean_pixel_distance(a, b) for a, b in zip(low, inputs)])
    high_distance = np.mean([mean_pixel_distance(a, b) for a, b in zip(high, inputs)])
    followed = np.mean([dominant_colour(image) == colour for image, (colour, _) in zip(high, targets)])
    print(f"\nimg2img: strength 0.2 distance {low_distance:.1f}/255; strength 0.95 distance {high_distance:.1f}/255, prompt colour {followed:.0%}")
    assert low_distance < 10
    assert high_distance > 2 * low_distance and followed >= 0.8


@pytest.mark.xfail(reason="beyond the issue's check; shipped model: input colour kept 75 % of 12 (< 90 %) at strength 0.2, the shape sometimes repainted; see docs/embedded-model.md", strict=True)
def test_img2img_low_strength_keeps_the_input_colour():
    """Stricter than the issue (which asks for pixel distance only): at strength 0.2 the
    shape also keeps its colour against a prompt asking another. The distance alone is
    small partly because the shapes are; the background, most of the picture, stays."""
    scenes, _, _, low, _ = _img2img_runs()
    kept = np.mean([dominant_colour(image) == scene.colour for image, scene in zip(low, scenes)])
    print(f"\nimg2img strength 0.2: input colour kept {kept:.0%} of {len(scenes)}")
    assert kept >= 0.9


def test_inpainting_keeps_the_rest_and_paints_the_mask():
    """Repaint the middle of a plain background with the asked shape; the border stays."""
    count = 12
    backgrounds = [list(BACKGROUNDS)[i % 3] for i in range(count)]
    colours = [c for c in COLOURS if c != "orange"]
    asked = [(colours[i % len(colours)], SHAPES[i % 3]) for i in range(count)]
    inputs = [np.full((64, 64, 3), BACKGROUNDS[background], np.uint8) for background in backgrounds]
    mask = np.zeros((64, 64), np.uint8)
    mask[8:56, 8:56] = 255
    prompts = [full_caption(colour, shape, background, "en") for (colour, shape), background in zip(asked, backgrounds)]
    out = generate.inpaint(inputs, [mask] * count, prompts, seed=6000)
    border = mask == 0
    kept = np.mean([np.abs(o[border].astype(np.float32) - i[border].astype(np.float32)).mean() for o, i in zip(out, inputs)])
    painted = np.mean([dominant_colour(o) == colour for o, (colour, _) in zip(out, asked)])
    print(f"\ninpaint: border distance {kept:.1f}/255, asked colour in the mask {painted:.0%} of {count}")
    assert kept < 8, f"the unmasked border moved by {kept:.1f}/255 on average"
    assert painted >= 0.75, f"the asked colour was painted in {painted:.0%}"


def test_mixing_weights():
    """48 images per weighting: at 16 the 75 % threshold was within one standard error
    (about 11 points) of what a model measures."""
    a, b = "a red circle", "a blue square"
    count = 48
    only_a = generate.mix([a, b], [1.0, 0.0], seed=4000, count=count)
    only_b = generate.mix([a, b], [0.0, 1.0], seed=4000, count=count)
    half = generate.mix([a, b], [0.5, 0.5], seed=4000, count=count)
    a_ok = np.mean([dominant_colour(i) == "red" and shape_of(i) == "circle" for i in only_a])
    b_ok = np.mean([dominant_colour(i) == "blue" and shape_of(i) == "square" for i in only_b])
    to_a = np.mean([mean_pixel_distance(h, i) for h, i in zip(half, only_a)])
    to_b = np.mean([mean_pixel_distance(h, i) for h, i in zip(half, only_b)])
    print(f"\nmix: (1,0) red circle {a_ok:.0%}, (0,1) blue square {b_ok:.0%}, (.5,.5) distance to each {to_a:.1f} / {to_b:.1f}")
    assert a_ok >= 0.75 and b_ok >= 0.75
    assert to_a > 10 and to_b > 10


@pytest.mark.parametrize("lang", LANGUAGES)
def test_clip_ranks_the_matching_caption_first(lang):
    calls = generate.graph()
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    text, _, _ = calls.text.encode([full_caption(c, s, b, lang) for c, s, b in combos])
    scenes = sample_scenes(60, seed=555, held_out=True)
    image = calls.images.embed([render(s) for s in scenes])
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    best = (image @ text.T).argmax(axis=1)
    top1 = np.mean([combos[i] == scene.combo for i, scene in zip(best, scenes)])
    print(f"\n[{lang}] CLIP top-1 among {len(combos)} captions on {len(scenes)} held-out images: {top1:.0%}")
    assert top1 >= 0.80
