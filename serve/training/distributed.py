"""The prior loop on a Ray cluster: Ray Train's ``TorchTrainer``, one DDP replica per worker.

Each worker loads the base checkpoint's prior, text encoder, tokenizer and
scheduler from ``base`` (a path every worker can read: a shared filesystem on a
multi-node cluster), wraps the prior in DDP with ``ray.train.torch.prepare_model``
and runs :func:`serve.training.prior.prior_training_loop` on its slice of every
global batch. The image-embedding targets are computed once by the caller and
travel with the config. Rank 0 reports the trained weights as a Ray Train
checkpoint, which the caller loads back.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from serve.training.prior import CaptionLists, PriorData, captions_from_lists


def _worker(config: dict) -> None:
    import ray.train
    from ray.train.torch import prepare_model

    from serve.training.prior import load_prior_components, prior_training_loop

    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    components = load_prior_components(config["base"])
    prior = components["prior"]
    torch.manual_seed(config["seed"])
    model = prepare_model(prior)  # DistributedDataParallel (gloo on CPU)
    data = PriorData(config["image_embeds"], captions_from_lists(config["captions"]))
    summary = prior_training_loop(
        model, prior, components["scheduler"], components["tokenizer"], components["text_encoder"], data,
        config["steps"], config["batch_size"], config["lr"], config["seed"], rank=rank, world_size=world_size,
        progress=False,
    )
    metrics = {"loss": summary.get("loss", float("nan")), "seconds": summary["seconds"], "world_size": world_size}
    if rank == 0:
        with tempfile.TemporaryDirectory() as folder:
            torch.save(prior.state_dict(), os.path.join(folder, "prior.pt"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report(metrics)


def train_prior_ray(
    base: Path | str, data: PriorData, steps: int, batch_size: int, lr: float, seed: int, workers: int,
    threads: int = 1, storage_path: Path | str | None = None,
) -> dict[str, torch.Tensor]:
    """Run the prior loop on ``workers`` Ray Train workers; return the trained state dict.

    Connects to the cluster named by ``RAY_ADDRESS`` if set, else starts a local Ray.
    ``data.draw_captions`` must be a :class:`~serve.training.prior.CaptionLists` (it travels as its lists).
    """
    import ray

    try:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as error:
        raise ImportError(f"--workers needs Ray Train: pip install 'kandinsky-serve[train]' ({error})") from error

    if not isinstance(data.draw_captions, CaptionLists):
        raise TypeError("train_prior_ray needs PriorData.draw_captions to be CaptionLists (fixed caption lists)")
    captions = data.draw_captions.captions
    if not ray.is_initialized():
        # RAY_ADDRESS names the cluster to use; without it, a fresh local Ray, never whatever
        # `ray start` cluster happens to run on this machine (ray.init()'s default would join it).
        address = os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":  # every Ray port on 127.0.0.1
            from serve.graph.local_ray import init_local_ray

            init_local_ray(logging_level="WARNING", include_dashboard=False)
        else:
            ray.init(address=address, logging_level="WARNING", include_dashboard=False)
    with tempfile.TemporaryDirectory(prefix="prior-ray-train-") as storage:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "base": str(Path(base).resolve()), "image_embeds": data.image_embeds, "captions": captions,
                "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads,
            },
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(storage_path or storage), name="prior-finetune"),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train finished without a checkpoint: {result.error}")
        with result.checkpoint.as_directory() as folder:
            return torch.load(os.path.join(folder, "prior.pt"), weights_only=True)
