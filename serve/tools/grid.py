"""A grid of prompts -> images (rows: prompts, columns: seeds) drawn by diffusers' pipelines.

Used for the README's picture of the embedded model::

    .venv/bin/python -m serve.tools.grid docs/embedded_grid.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

DEFAULT_PROMPTS = (
    "a red circle",
    "a blue square on a white background",
    "a small green triangle",
    "a yellow circle on a black background",
    "фиолетовый квадрат",
    "оранжевый треугольник на сером фоне",
)


def make_grid(out: Path | str, prompts=DEFAULT_PROMPTS, seeds=(0, 1, 2, 3), prior_dir=None, decoder_dir=None,
              prior_steps: int = 25, steps: int = 50, scale: int = 2, gap: int = 4) -> Path:
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline
    from PIL import Image

    if prior_dir is None or decoder_dir is None:
        from serve.embedded import trained_checkpoint

        prior_dir, decoder_dir = trained_checkpoint()
    kwargs = {"local_files_only": True, "use_safetensors": True}
    prior = KandinskyV22PriorPipeline.from_pretrained(str(prior_dir), **kwargs)
    decoder = KandinskyV22Pipeline.from_pretrained(str(decoder_dir), **kwargs)
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)
    size = 64 * scale
    grid = Image.new("RGB", (len(seeds) * (size + gap) + gap, len(prompts) * (size + gap) + gap), (255, 255, 255))
    for row, prompt in enumerate(prompts):
        for column, seed in enumerate(seeds):
            embeds = prior(prompt, num_inference_steps=prior_steps, generator=torch.Generator().manual_seed(seed))
            image = decoder(
                image_embeds=embeds.image_embeds, negative_image_embeds=embeds.negative_image_embeds, height=64, width=64,
                num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np",
            ).images[0]
            tile = Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
            grid.paste(tile, (gap + column * (size + gap), gap + row * (size + gap)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


if __name__ == "__main__":
    print(make_grid(sys.argv[1] if len(sys.argv) > 1 else "docs/embedded_grid.png"))
