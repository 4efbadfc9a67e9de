"""A benchmark's own service: the graph on a local Ray instance, and waiting until it answers.

The benchmarks that start their own service (``bench sweep``, ``models``, ``understanding``,
``gpu``) share these; what each deploys (checkpoints, per-stage options) stays theirs.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import httpx


def stage_options(stages: Iterable[Any], max_batch: int, batch_wait_s: float = 0.005,
                  max_ongoing: int | None = None) -> dict[str, dict]:
    """One replica per stage, a tenth of a CPU each, batching up to ``max_batch`` on one torch thread."""
    ongoing = {} if max_ongoing is None else {"max_ongoing_requests": max_ongoing}
    return {stage.name: {"num_replicas": 1, **ongoing, "ray_actor_options": {"num_cpus": 0.1},
                         "user_config": {"max_batch_size": max_batch, "batch_wait_timeout_s": batch_wait_s,
                                         "torch_threads": 1}}
            for stage in stages}


def start_local_service(args: dict, options: dict[str, dict], app_name: str, port: int) -> str:
    """Deploy the graph with ``args`` and per-deployment ``options`` as ``app_name`` (on a fresh
    local Ray unless one is connected already); returns the base URL."""
    import ray
    from ray import serve

    from serve.graph.build import build_graph
    from serve.graph.local_ray import connect_ray

    if not ray.is_initialized():
        connect_ray(logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_graph(args, options), name=app_name, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_service() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def wait_ready(url: str, timeout_s: float = 300.0, why_slow: str = "") -> None:
    """Poll ``/readyz`` until 200; ``RuntimeError`` after ``timeout_s`` (``why_slow`` says what takes long)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # polling interval
    raise RuntimeError(f"{url}: not ready within {timeout_s:.0f} s" + (f" ({why_slow})" if why_slow else ""))
