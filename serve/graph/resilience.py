"""Time limits and error mapping around one request's stage calls — plain asyncio, no Ray.

A request either returns, or ends in exactly one explicit error:

* :class:`RequestTimedOut` past the end-to-end limit (HTTP 504);
* :class:`StageUnavailable` when a stage replica died under it and the retry failed too,
  or a stage cannot serve (model not loaded) (HTTP 503);
* :class:`Overloaded` when a stage's bounded queue refused it (HTTP 503);
* anything else from a stage unchanged (HTTP 500, no stack trace to the client).

Only a replica's death is retried, by the caller of each stage (``serve.graph.ingress.HandleCalls``):
stage calls are deterministic for a seed, so a retry returns the very images the first
attempt would have. A death that reaches this module has used those retries up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from serve.errors import Overloaded, RequestTimedOut, StageUnavailable

T = TypeVar("T")

logger = logging.getLogger("kandinsky_serve.graph")


async def run_resilient(
    attempt: Callable[[], Awaitable[T]],
    *,
    timeout_s: float,
    classify: Callable[[BaseException], str | None],
) -> T:
    """Run ``attempt()`` within ``timeout_s`` and map its errors to this module's.
    ``classify(error)`` returns ``"replica_died"``, ``"overloaded"``, ``"unavailable"`` or
    None (not ours: re-raised as is)."""
    try:
        async with asyncio.timeout(timeout_s):
            try:
                return await attempt()
            except Exception as error:  # noqa: BLE001 - classified below, never swallowed
                kind = classify(error)
                # Clients get a generic reason; the details (queue sizes, checkpoint paths, load
                # errors) go to the log, where the operator looks.
                if kind == "overloaded":
                    logger.warning("stage call refused: %s", error)
                    raise Overloaded("a stage is at capacity (its queue is full); retry later") from error
                if kind == "unavailable":
                    logger.warning("stage call failed: %s", error)
                    raise StageUnavailable("a stage is not ready (its model is not loaded); retry later") from error
                if kind == "replica_died":
                    raise StageUnavailable(f"a stage replica died and its retries failed: {type(error).__name__}") from error
                raise
    except TimeoutError:
        raise RequestTimedOut(timeout_s) from None
