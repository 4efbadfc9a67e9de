"""Where a replica's model code runs: one dedicated OS thread per replica.

Torch keeps an intra-op thread team per calling OS thread; running every model
call on the same thread keeps that team warm (a fresh executor thread per call
was measured 2-3x slower with 2 threads) and never runs one model from two
threads at once. The replica's event loop stays free to queue requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

R = TypeVar("R")


class ModelThread:
    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model")

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def set_torch_threads(self, count: int | None) -> None:
        if count:
            self._executor.submit(torch.set_num_threads, count).result()


class StageReplica:
    """Plumbing every stage deployment shares: the model thread, batching knobs, readiness.

    Subclasses set ``self.thread`` and ``self.model`` and decorate ``_run_batch``
    with ``@serve.batch``; the decorator's defaults are replaced by ``user_config``.
    """

    thread: ModelThread
    _run_batch: Any

    def reconfigure(self, user_config: dict | None) -> None:
        from deployments.batching import BatchSettings

        settings = BatchSettings.model_validate(user_config or {})
        self.thread.set_torch_threads(settings.torch_threads)
        self._run_batch.set_max_batch_size(settings.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def ready(self) -> bool:
        return True
