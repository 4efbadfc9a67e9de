"""The ``Server-Timing`` header of an answer that went through stages."""

from __future__ import annotations

from typing import Any


def server_timing(result: Any, total_ms: float) -> str:
    """The ``Server-Timing`` header (W3C; browsers' dev tools show it): the ingress's total,
    and per stage the call's round trip from the ingress, its queue wait and its compute.
    The round trip minus queue and compute is routing and transfer (``bench latency --breakdown``)."""
    entries = [f"total;dur={total_ms:.2f}"]
    for key, timing in result.timings.items():
        call = getattr(result, "call_ms", {}).get(key)
        if call is not None:
            entries.append(f"{key}-call;dur={call:.2f}")
        entries.append(f"{key}-queue;dur={timing.queue_ms:.2f}")
        entries.append(f"{key}-compute;dur={timing.compute_ms:.2f}")
    return ", ".join(entries)
