"""Stopping the service without dropping what it accepted.

Ray Serve's ``serve.shutdown()`` kills the HTTP proxy at once: a request still in flight
then loses its answer even though its replica finishes it. So before shutting down,
``kandinsky-serve run`` drains: every ingress replica is told to admit nothing new (503
``shutting_down``, /readyz 503) and polled until none holds a request or a job, or until
a deadline. :func:`drain` is the policy (plain asyncio, no Ray); :func:`drain_service`
points it at a running application.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class DrainState:
    """The latest report of each ingress replica reached so far."""

    expected: int
    reports: dict[str, dict] = field(default_factory=dict)
    timed_out: bool = False

    @property
    def busy(self) -> int:
        """Requests and jobs the replicas last said they still hold."""
        return sum(r["requests"] + r["jobs"] for r in self.reports.values())

    @property
    def done(self) -> bool:
        return len(self.reports) >= self.expected and self.busy == 0


async def drain(
    call: Callable[[], Awaitable[dict]],
    replicas: int,
    timeout_s: float,
    poll_s: float = 0.25,
    on_progress: Callable[[DrainState], None] | None = None,
    abort: Callable[[], bool] = lambda: False,
) -> DrainState:
    """Drain ``replicas`` ingress replicas through ``call``.

    ``call`` reaches one replica, as a handle call does; it makes that replica drain and
    returns ``{"replica", "requests", "jobs"}``. Replicas are told apart by that id, so each
    round sends one call per replica at once and keeps going until every replica has
    answered and none holds anything. A replica that has drained admits nothing new, so
    its count only goes down. Ends early when ``abort()`` is true (marked timed out).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    state = DrainState(expected=replicas)
    last_busy: int | None = None
    while not state.done:
        remaining = deadline - loop.time()
        if remaining <= 0 or abort():
            state.timed_out = True
            break
        round_ = [asyncio.ensure_future(asyncio.wait_for(call(), remaining)) for _ in range(max(1, replicas))]
        for report in await asyncio.gather(*round_, return_exceptions=True):
            if isinstance(report, dict):  # a replica that died or did not answer in time says nothing
                state.reports[report["replica"]] = report
        if state.done:
            break
        if on_progress is not None and state.busy != last_busy:
            on_progress(state)
            last_busy = state.busy
        await asyncio.sleep(min(poll_s, max(0.0, deadline - loop.time())))  # a poll interval, not a readiness wait
    return state


def drain_service(app_name: str, timeout_s: float, on_progress: Callable[[DrainState], None] | None = None,
                  abort: Callable[[], bool] = lambda: False) -> DrainState:
    """:func:`drain` on the running ingress replicas of ``app_name`` (none running: nothing to wait for)."""
    from ray import serve
    from ray.serve.schema import ReplicaState

    from deployments.registry import INGRESS_NAME

    status = serve.status().applications.get(app_name)
    deployment = status.deployments.get(INGRESS_NAME) if status is not None else None
    replicas = deployment.replica_states.get(ReplicaState.RUNNING, 0) if deployment is not None else 0
    if replicas == 0:
        return DrainState(expected=0)
    handle = serve.get_deployment_handle(INGRESS_NAME, app_name)

    async def call() -> dict:
        return await handle.drain.remote()

    return asyncio.run(drain(call, replicas, timeout_s, on_progress=on_progress, abort=abort))
