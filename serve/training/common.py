"""What every training loop shares: seeding, the optimiser schedule, progress and loss logs."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def optimizer_and_schedule(params, lr: float, steps: int, warmup: int = 50, weight_decay: float = 0.01):
    """AdamW with linear warm-up then cosine decay to 10 % of ``lr``."""
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimiser_step(loss: torch.Tensor, optimizer, schedule, params, max_norm: float = 1.0) -> None:
    """Backward, clip the gradient norm, step the optimiser and the learning-rate schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    schedule.step()


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches (reshuffled every epoch), deterministic from ``generator``."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


class LossLog:
    """A progress bar on stderr and one JSON line per logged step (``log_path``).

    ``name`` prefixes the bar; ``every`` controls how often a line is written.
    """

    def __init__(self, name: str, steps: int, log_path: Path | str | None = None, every: int = 25, progress: bool = True):
        from tqdm.auto import tqdm

        self.name = name
        self.every = every
        self.started = time.perf_counter()
        self.file = None
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(log_path, "w", encoding="utf-8")
        self.bar = tqdm(total=steps, desc=name, disable=not progress, file=sys.stderr, mininterval=2.0, dynamic_ncols=True)
        self.last: dict[str, float] = {}
        self._sums: dict[str, float] = {}
        self._count = 0

    def step(self, step: int, **values: float) -> None:
        self._count += 1
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self.bar.update(1)
        if (step + 1) % self.every == 0 or step == 0:
            self.last = {key: total / self._count for key, total in self._sums.items()}
            self._sums, self._count = {}, 0
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in self.last.items()}, refresh=False)
            if self.file is not None:
                record = {"step": step + 1, "elapsed_s": round(time.perf_counter() - self.started, 2), **self.last}
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()

    def close(self) -> dict[str, float]:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        return {"seconds": round(time.perf_counter() - self.started, 1), **self.last}
