"""bench quality's pieces: the held-out prompts, accuracy, preset configurations, the tables and plot."""

from __future__ import annotations

import numpy as np

from serve.http.schemas import QUALITY_PRESETS
from serve.tools.bench_quality import accuracy, held_out, plot_sweep, preset_configs, quality_tables, specs
from serve.training.data import HELD_OUT, render, sample_scenes


def test_held_out_prompts_cover_every_combination_per_language():
    prompts, truth = held_out(("en", "ru"), 2)
    assert len(prompts) == len(truth) == 2 * 2 * len(HELD_OUT)
    assert set(truth) == set(HELD_OUT) and truth[:2] == [HELD_OUT[0]] * 2
    assert len(set(prompts)) == 2 * len(HELD_OUT)


def test_specs_are_validated_requests_with_their_preset():
    [plain], [fast] = specs(["a red square"]), specs(["a red square"], quality="fast")
    assert plain.seeds == fast.seeds and (fast.steps, fast.scheduler) == (QUALITY_PRESETS["fast"].steps,
                                                                          QUALITY_PRESETS["fast"].scheduler)
    assert set(preset_configs()) >= {"default", *QUALITY_PRESETS}


def test_accuracy_reads_renders_and_blanks():
    [scene] = sample_scenes(1, seed=7, held_out=True)
    drawn = render(scene)
    blank = np.full_like(drawn, 128)
    assert accuracy([drawn, blank], [(scene.colour, scene.shape)] * 2) == {"colour": 50.0, "shape": 50.0}


def _result(fast_ratio: float) -> dict:
    sweep = [{"scheduler": "ddpm", "steps": 50, "colour": 96.0, "shape": 80.0, "distance": 0.0, "reference": True}]
    sweep += [{"scheduler": name, "steps": steps, "colour": 90.0 + steps / 10, "shape": 70.0, "distance": 12.3}
              for name in ("ddpm", "deis") for steps in (4, 8)]
    row = {"scheduler": "ddpm", "steps": 50, "prior_steps": 25, "guidance_scale": 4.0, "colour": 96.0, "shape": 80.0,
           "p50_ms": 1000.0, "latency_ratio": 1.0, "colour_change": 0.0}
    presets = {"default": row, "fast": {**row, "p50_ms": 1000 * fast_ratio, "latency_ratio": fast_ratio,
                                        "colour_change": -2.0}}
    return {"size": 64, "per_combo": 1, "rounds": 3, "languages": ["en"], "images_per_point": 6,
            "images_per_preset": 6, "prior_steps": 25, "sweep": sweep, "presets": presets,
            "goals": {"fast_latency_ratio": 0.3, "fast_colour_points": 5.0, "fast_latency_met": fast_ratio <= 0.3,
                      "fast_colour_met": True}}


def test_tables_carry_the_figures_and_the_goals(tmp_path):
    met, missed = "\n".join(quality_tables(_result(0.2))), "\n".join(quality_tables(_result(0.45)))
    assert "| `deis` | 90 / 70 / 12.3 | 91 / 70 / 12.3 |" in met
    assert "**fast / default latency: 0.20** (goal ≤ 0.3; met)" in met
    assert "**fast / default latency: 0.45** (goal ≤ 0.3; not met)" in missed
    plot_sweep(_result(0.2), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
