"""The job store as a named, detached Ray actor, and the ingress's client for it.

Ray Serve replaces a dead ingress replica with a fresh process: anything the old
one held in memory is gone. Job state therefore lives in one actor that no replica
owns (``lifetime="detached"``), found by name (``args.jobs.store_name``) by every
ingress replica, old and new. It lives until the Ray cluster stops or someone kills
it; its state is in its memory, so it does not outlive its own process.
"""

from __future__ import annotations

from typing import Any

from serve.jobs import AsyncJobStore, JobSettings

NAMESPACE = "kandinsky-serve"


class JobStoreActor(AsyncJobStore):
    """:class:`AsyncJobStore`, plus re-configuration by each ingress replica that starts."""

    async def configure(self, settings: dict) -> None:
        """The latest deployment's settings win (TTL, caps, lease); jobs are kept."""
        self.store.settings = JobSettings.model_validate(settings)

    async def ping(self) -> int:
        return len(self.store)


def job_store_actor(settings: JobSettings):
    """The named store actor, created on first use; every caller gets the same one."""
    import ray

    actor_class = ray.remote(JobStoreActor)
    actor = actor_class.options(
        name=settings.store_name,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=1000,  # long-polls for events wait here concurrently
    ).remote(settings.model_dump())
    return actor


class ActorJobStore:
    """:class:`serve.jobs.JobStoreClient` over the actor: each call awaits the actor's method."""

    METHODS = frozenset({
        "create", "view", "image", "active", "start", "report", "heartbeat", "add_preview", "succeed", "fail",
        "mark_cancelled", "cancel", "wait_events", "configure", "ping", "sweep",
    })

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __getattr__(self, name: str):
        if name not in self.METHODS:
            raise AttributeError(name)
        method = getattr(self.actor, name)

        async def call(*args, **kwargs):
            return await method.remote(*args, **kwargs)

        call.__name__ = name
        return call
