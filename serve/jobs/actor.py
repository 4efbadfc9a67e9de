"""The job store as a named, detached Ray actor, and the ingress's client for it.

Ray Serve replaces a dead ingress replica with a fresh process: anything the old
one held in memory is gone. Job state therefore lives in one actor that no replica
owns (``lifetime="detached"``), found by name (``args.jobs.store_name``) by every
ingress replica, old and new. Its records are also written to an SQLite file
(``args.jobs.database_path``), so that a store that was killed or crashed — restarted by
Ray, or made again by the next ingress call that finds it gone — comes back with every
job's state and result.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

from serve.jobs.database import JobDatabase
from serve.jobs.store import AsyncJobStore
from serve.settings import JobSettings

NAMESPACE = "kandinsky-serve"
RUNNER_GROUP = "runners"
RUNNER_METHODS = frozenset({"start", "report", "heartbeat", "add_preview", "succeed", "fail", "mark_cancelled"})
"""What the runners call: a concurrency group of its own, so that clients' long-polls for
events (which wait in the default group) can never starve a runner's heartbeat into a
``runner_lost``."""


logger = logging.getLogger("kandinsky_serve.jobs")
RECONNECT_WAITS_S = (0.2, 0.5, 1.0, 2.0)
"""After a call finds the store gone: the waits before each new try (Ray may be restarting it)."""


class JobStoreActor(AsyncJobStore):
    """:class:`AsyncJobStore` over its database file, plus re-configuration by each ingress replica that starts."""

    def __init__(self, settings: dict) -> None:
        parsed = JobSettings.model_validate(settings)
        path = parsed.database_file()
        super().__init__(parsed, database=None if path is None else JobDatabase(path))
        if path is not None:
            logger.info("job store %s: %d job(s) reloaded from %s", parsed.store_name, len(self.store), path)

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
        max_restarts=-1,  # a crashed store comes back (from its database file)
        max_task_retries=0,  # but a call is never re-run behind its caller's back: creates are not idempotent
    ).remote(settings.model_dump(mode="json"))
    return actor


class ActorJobStore:
    """An :class:`AsyncJobStore` over the actor: each of the store's coroutine methods (and
    the actor's own, such as ``configure``) awaits the same method of the actor.

    ``reconnect`` (optional) finds or makes the store again when a call finds it dead
    (killed, or its node lost): the call is then tried on the new one, a few times over
    about 4 s, before the error reaches the caller. A call the dead store may already have
    run is sent again too: every store method may be repeated (a repeated ``create`` of
    the same job id answers with that job; a repeated ending of a finished job changes nothing).
    """

    METHODS = frozenset(
        name for name, member in inspect.getmembers(JobStoreActor, inspect.iscoroutinefunction) if not name.startswith("_")
    )

    def __init__(self, actor: Any, reconnect: Callable[[], Any] | None = None) -> None:
        self.actor = actor
        self.reconnect = reconnect

    def __getattr__(self, name: str):
        if name not in self.METHODS:
            raise AttributeError(name)
        async def call(*args, **kwargs):
            for wait_s in (*RECONNECT_WAITS_S, None):
                method = getattr(self.actor, name)
                if name in RUNNER_METHODS:
                    method = method.options(concurrency_group=RUNNER_GROUP)
                try:
                    return await method.remote(*args, **kwargs)
                except Exception as error:
                    if self.reconnect is None or wait_s is None or not _store_gone(error):
                        raise
                    logger.warning("job store unreachable (%s); finding it again in %.1f s", type(error).__name__, wait_s)
                    await asyncio.sleep(wait_s)
                    self.actor = self.reconnect()

        call.__name__ = name
        return call


def _store_gone(error: Exception) -> bool:
    """Whether ``error`` says the actor is dead or restarting (so the call did not run, or its
    store is gone), as opposed to an error the store method raised."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    return isinstance(error, (ActorDiedError, ActorUnavailableError))
