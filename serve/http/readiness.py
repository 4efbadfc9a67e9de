"""Readiness, computed at most once per interval however many probes ask.

Asking every stage costs a ``serve.status()`` and one call per stage; a probe flood must
neither multiply that work nor time out on it (a load balancer would then drop a healthy
backend). :class:`ReadinessCache` keeps the last answer for ``ttl_s`` and lets concurrent
askers share the one computation in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger("kandinsky_serve.api")

Stages = dict[str, str]


class ReadinessCache:
    def __init__(self, compute: Callable[[], Awaitable[Stages]], ttl_s: float = 1.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._compute = compute
        self.ttl_s = ttl_s
        self._clock = clock
        self._value: Stages | None = None
        self._at = float("-inf")
        self._in_flight: asyncio.Future | None = None
        self.computations = 0

    async def stages(self) -> Stages:
        """Each stage's state; a failure to ask counts as not ready (and is logged, not shown)."""
        if self._value is not None and self._clock() - self._at < self.ttl_s:
            return self._value
        if self._in_flight is None:
            self._in_flight = asyncio.ensure_future(self._refresh())
        # shield: one asker giving up (client gone) must not cancel the others' answer
        return await asyncio.shield(self._in_flight)

    async def _refresh(self) -> Stages:
        self.computations += 1
        try:
            value = await self._compute()
        except Exception as error:
            logger.warning("readiness check failed: %r", error)
            value = {"readiness": f"check failed: {type(error).__name__}"}
        finally:
            self._in_flight = None
        self._value, self._at = value, self._clock()
        return value


def is_ready(stages: Stages) -> bool:
    return bool(stages) and all(state == "ready" for state in stages.values())
