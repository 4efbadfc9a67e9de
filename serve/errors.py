"""How a request can end without images, as exceptions the HTTP layer maps to status codes
(504 and 503). Raised by ``serve.graph.resilience``; below both the graph and the HTTP app."""

from __future__ import annotations


class RequestTimedOut(Exception):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request exceeded its time limit of {timeout_s:g} s (admission.request_timeout_s)")
        self.timeout_s = timeout_s


class StageUnavailable(Exception):
    """No replica could serve a stage call; the message says why."""


class Overloaded(Exception):
    """A stage's queue is full (its ``max_queued_requests``)."""
