"""Fine-tune a checkpoint's prior on a folder of captioned images, on this machine or
on a Ray cluster (Ray Train), and write the whole prior directory."""

from __future__ import annotations

from pathlib import Path

import torch

from serve.training.distributed import train_prior_ray
from serve.training.prior import folder_prior_data, load_prior_components, prior_training_loop, save_prior_pipeline


def finetune_prior(
    data: Path | str, base: Path | str, out: Path | str, steps: int = 500, batch_size: int = 32, lr: float = 1e-4,
    seed: int = 0, workers: int = 0, log_path=None, progress: bool = True,
) -> Path:
    """Fine-tune ``base``'s prior on ``data`` (images + caption files) and write the whole
    prior directory to ``out``. ``workers`` ≥ 1 runs on a Ray cluster with Ray Train."""
    components = load_prior_components(base)
    prior_data = folder_prior_data(data, components["image_processor"], components["image_encoder"])
    if workers >= 1:
        state = train_prior_ray(base, prior_data, steps, batch_size, lr, seed, workers)
        components["prior"].load_state_dict(state)
    else:
        torch.manual_seed(seed)
        prior = components["prior"]
        prior_training_loop(
            prior, prior, components["scheduler"], components["tokenizer"], components["text_encoder"], prior_data,
            steps, batch_size, lr, seed, log_path=log_path, progress=progress,
        )
    components["prior"].eval()
    return save_prior_pipeline(components, out)
