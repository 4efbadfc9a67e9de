"""Admission control and per-key rate limits, as plain asyncio-free objects (no Ray, no HTTP).

* :class:`AdmissionGate` bounds the generation requests one ingress replica runs at once;
  a request over the bound is refused at once (503) rather than queued, with a Retry-After
  estimated from how long recent requests took.
* :class:`RateLimiter` keeps two token buckets per API key: requests per second (with a
  burst) and generation cost per minute, in standard images (:func:`generation_cost`).
  A refusal says how long until it would pass (429).

Limits are per ingress replica: with N ingress replicas a key may get up to N times its
rate. (A shared store would make every request pay a round trip; see the README.)
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass


class TokenBucket:
    def __init__(self, rate_per_s: float, capacity: float, now: float) -> None:
        self.rate = rate_per_s
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens if there are enough and return 0; else take nothing and
        return the seconds until there would be."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if amount <= self.tokens:
            self.tokens -= amount
            return 0.0
        if amount > self.capacity:
            return math.inf
        return (amount - self.tokens) / self.rate


STANDARD_IMAGE = (512, 512, 50, 25)
"""(width, height, decoder steps, prior steps) of one standard image: cost 1."""
PRIOR_STEP_WEIGHT = 0.25
"""A prior step's work next to a U-Net step's (as job progress weighs them)."""


def generation_cost(num_images: int, width: int, height: int, steps: int, prior_steps: int) -> float:
    """What a request costs, in standard images: images x pixels x (decoder steps + a quarter
    of the prior steps), relative to one 512x512 image at 50 + 25 steps. Nominal steps are
    charged (an img2img strength below 1 runs fewer): the cost is known before any model runs."""
    w, h, s, p = STANDARD_IMAGE
    return num_images * (width * height) * (steps + PRIOR_STEP_WEIGHT * prior_steps) / (w * h * (s + PRIOR_STEP_WEIGHT * p))


@dataclass(frozen=True)
class Refusal:
    reason: str
    retry_after_s: float


class RateLimiter:
    """Per-key request and image buckets (a bounded number of keys is tracked)."""

    def __init__(self, requests_per_s: float, burst_requests: int, images_per_min: float, max_keys: int = 10_000) -> None:
        self.defaults = (requests_per_s, burst_requests, images_per_min)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[TokenBucket, TokenBucket]] = OrderedDict()

    def _for(self, key: str, requests_per_s: float | None, images_per_min: float | None, now: float):
        buckets = self._buckets.get(key)
        if buckets is None:
            # A key's own rate comes with a burst of about one second's worth.
            rate = requests_per_s or self.defaults[0]
            burst = self.defaults[1] if requests_per_s is None else max(1, math.ceil(rate))
            per_min = images_per_min or self.defaults[2]
            # The image bucket holds a minute's budget: a key may spend it at once, then waits.
            buckets = (TokenBucket(rate, burst, now), TokenBucket(per_min / 60.0, per_min, now))
            self._buckets[key] = buckets
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(key)
        return buckets

    def admit_request(self, key: str, requests_per_s: float | None = None, images_per_min: float | None = None,
                      now: float | None = None) -> Refusal | None:
        now = time.monotonic() if now is None else now
        wait = self._for(key, requests_per_s, images_per_min, now)[0].take(1, now)
        return None if wait == 0 else Refusal("rate_limited: requests per second", wait)

    def admit_cost(self, key: str, cost: float, requests_per_s: float | None = None,
                   images_per_min: float | None = None, now: float | None = None) -> Refusal | None:
        """Charge ``cost`` standard images (:func:`generation_cost`) to the key's minute budget."""
        now = time.monotonic() if now is None else now
        bucket = self._for(key, requests_per_s, images_per_min, now)[1]
        wait = bucket.take(cost, now)
        if wait == 0:
            return None
        if math.isinf(wait):
            return Refusal(f"rate_limited: this request costs {cost:.4g} standard images, more than this key's "
                           f"{bucket.capacity:g} per minute can ever hold", 60.0)
        return Refusal(f"rate_limited: standard images per minute (this request costs {cost:.4g})", wait)


class AdmissionGate:
    """At most ``limit`` requests inside at once, and at most ``per_client`` of one client;
    the rest are refused at once.

    ``draining``: set when the service is stopping; from then on no new work is
    admitted (the API answers 503 ``shutting_down``) while what is inside finishes.
    """

    def __init__(self, limit: int, retry_after_s: float | None = None, per_client: int | None = None) -> None:
        self.limit = limit
        self.per_client = per_client if per_client is not None else max(1, limit // 2)
        self.fixed_retry_after_s = retry_after_s
        self.inside = 0
        self.of_client: dict[str, int] = {}
        self.draining = False
        self._mean_s = 1.0  # running estimate of a request's duration

    def enter(self, client: str = "") -> str | None:
        """Take a place for ``client``; None when taken, else why not (``full``,
        ``client_full``, ``draining``)."""
        if self.draining:
            return "draining"
        if self.inside >= self.limit:
            return "full"
        if self.of_client.get(client, 0) >= self.per_client:
            return "client_full"
        self.inside += 1
        self.of_client[client] = self.of_client.get(client, 0) + 1
        return None

    def try_enter(self, client: str = "") -> bool:
        return self.enter(client) is None

    def leave(self, seconds: float | None = None, client: str = "") -> None:
        self.inside -= 1
        left = self.of_client.get(client, 0) - 1
        if left > 0:
            self.of_client[client] = left
        else:
            self.of_client.pop(client, None)
        if seconds is not None:
            self._mean_s = 0.8 * self._mean_s + 0.2 * seconds

    def retry_after_s(self) -> float:
        """When a slot is likely free: the configured value, else about one request's duration."""
        return self.fixed_retry_after_s or max(1.0, self._mean_s)


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds; never 0 (clients would spin)."""
    return str(max(1, math.ceil(min(seconds, 3600))))
