"""The job store as a named, detached Ray actor, and the ingress's client for it.

Ray Serve replaces a dead ingress replica with a fresh process: anything the old
one held in memory is gone. Job state therefore lives in one actor that no replica
owns (``lifetime="detached"``), found by name (``args.jobs.store_name``) by every
ingress replica, old and new. It lives until the Ray cluster stops or someone kills
it; its state is in its memory, so it does not outlive its own process.
"""

from __future__ import annotations

import inspect
from typing import Any

from serve.jobs.store import AsyncJobStore
from serve.settings import JobSettings

NAMESPACE = "kandinsky-serve"
RUNNER_GROUP = "runners"
RUNNER_METHODS = frozenset({"start", "report", "heartbeat", "add_preview", "succeed", "fail", "mark_cancelled"})
"""What the runners call: a concurrency group of its own, so that clients' long-polls for
events (which wait in the default group) can never starve a runner's heartbeat into a
``runner_lost``."""


class JobStoreActor(AsyncJobStore):
    """:class:`AsyncJobStore`, plus re-configuration by each ingress replica that starts."""

    async def configure(self, settings: dict) -> None:
        """The latest deployment's settings win (TTL, caps, lease); jobs are kept."""
        self.store.settings = JobSettings.model_validate(settings)


def job_store_actor(settings: JobSettings, max_concurrency: int = 1000):
    """The named store actor, created on first use; every caller gets the same one."""
    import ray

    actor_class = ray.remote(concurrency_groups={RUNNER_GROUP: 64})(JobStoreActor)
    actor = actor_class.options(
        name=settings.store_name,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=max_concurrency,  # the default group: long-polls for events wait here concurrently
    ).remote(settings.model_dump())
    return actor


class ActorJobStore:
    """An :class:`AsyncJobStore` over the actor: each of the store's coroutine methods (and
    the actor's own, such as ``configure``) awaits the same method of the actor."""

    METHODS = frozenset(
        name for name, member in inspect.getmembers(JobStoreActor, inspect.iscoroutinefunction) if not name.startswith("_")
    )

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __getattr__(self, name: str):
        if name not in self.METHODS:
            raise AttributeError(name)
        method = getattr(self.actor, name)
        if name in RUNNER_METHODS:
            method = method.options(concurrency_group=RUNNER_GROUP)

        async def call(*args, **kwargs):
            return await method.remote(*args, **kwargs)

        call.__name__ = name
        return call
