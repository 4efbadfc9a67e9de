"""Admission, rate limits, API keys and the timeout/retry policy — plain objects, no Ray, no HTTP."""

from __future__ import annotations

import asyncio
import math

import pytest

from serve.http.auth import KeyStore, add_key, digest, load_keys, revoke_key
from serve.http.admission import AdmissionGate, RateLimiter, TokenBucket, retry_after_header
from serve.errors import Overloaded, RequestTimedOut, StageUnavailable
from serve.graph.resilience import run_resilient


def test_token_bucket_refills_at_its_rate_and_says_how_long_to_wait():
    bucket = TokenBucket(rate_per_s=2.0, capacity=2, now=0.0)
    assert bucket.take(1, 0.0) == 0 and bucket.take(1, 0.0) == 0
    assert bucket.take(1, 0.0) == pytest.approx(0.5)
    assert bucket.take(1, 0.5) == 0
    assert math.isinf(bucket.take(3, 10.0))  # more than it can ever hold


def test_rate_limiter_keeps_keys_apart_and_honours_overrides():
    limiter = RateLimiter(requests_per_s=1.0, burst_requests=1, images_per_min=6)
    assert limiter.admit_request("a", now=0.0) is None
    refusal = limiter.admit_request("a", now=0.1)
    assert refusal is not None and refusal.retry_after_s == pytest.approx(0.9)
    assert limiter.admit_request("b", now=0.1) is None  # another key is unaffected
    assert limiter.admit_request("fast", requests_per_s=100, now=0.0) is None
    assert all(limiter.admit_request("fast", requests_per_s=100, now=0.0) is None for _ in range(50))
    assert limiter.admit_cost("a", 6, now=0.0) is None
    assert limiter.admit_cost("a", 1, now=0.0).retry_after_s == pytest.approx(10.0)
    assert "can ever hold" in limiter.admit_cost("a", 7, now=100.0).reason


def test_cost_is_images_times_pixels_times_steps_in_standard_images():
    from serve.http.admission import generation_cost

    assert generation_cost(1, 512, 512, 50, 25) == pytest.approx(1.0)
    assert generation_cost(8, 1024, 1024, 150, 100) == pytest.approx(8 * 4 * (150 + 25) / 56.25)
    tiny = generation_cost(1, 64, 64, 1, 2)
    assert tiny == pytest.approx((64 * 64 * 1.5) / (512 * 512 * 56.25))
    assert generation_cost(8, 1024, 1024, 150, 100) / tiny > 100_000, "a big request is no longer one tiny image"


def test_admission_gate_bounds_what_is_inside_and_estimates_retry_after():
    gate = AdmissionGate(limit=2)
    assert gate.try_enter("a") and gate.try_enter("b") and gate.enter("c") == "full"
    gate.leave(seconds=5.0, client="a")
    assert gate.try_enter("c") and gate.retry_after_s() > 1.0
    assert AdmissionGate(1, retry_after_s=7).retry_after_s() == 7
    assert retry_after_header(0.01) == "1" and retry_after_header(2.2) == "3"


def test_one_client_never_holds_the_whole_gate():
    gate = AdmissionGate(limit=4)
    assert gate.per_client == 2, "by default half the gate"
    assert gate.enter("hog") is None and gate.enter("hog") is None
    assert gate.enter("hog") == "client_full" and gate.inside == 2
    assert gate.enter("other") is None and gate.enter("other") is None, "the rest stays for everyone else"
    assert gate.enter("third") == "full"
    gate.leave(client="hog")
    assert gate.of_client == {"hog": 1, "other": 2}
    assert gate.enter("hog") is None
    for client in ("hog", "hog", "other", "other"):
        gate.leave(client=client)
    assert gate.of_client == {} and gate.inside == 0, "nothing is kept for clients with nothing inside"
    assert AdmissionGate(limit=1).per_client == 1 and AdmissionGate(limit=8, per_client=8).per_client == 8


def test_keys_are_stored_hashed_looked_up_and_revoked(tmp_path):
    path = tmp_path / "keys.yaml"
    key = add_key(path, "team-a", requests_per_s=3)
    other = add_key(path, "team-b")
    assert key not in path.read_text() and digest(key).hex() in path.read_text()
    store = KeyStore(path, check_interval_s=0)
    assert store.lookup(key).name == "team-a" and store.lookup(key).requests_per_s == 3
    assert store.lookup(other).name == "team-b"
    assert store.lookup(key + "x") is None and store.lookup("") is None
    revoke_key(path, "team-a")
    assert store.lookup(key).revoked and not store.lookup(other).revoked
    with pytest.raises(ValueError, match="exists already"):
        add_key(path, "team-b")


def test_a_broken_keys_file_is_refused_at_load_and_ignored_on_reload(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - name: a\n    sha256: nothex\n")
    with pytest.raises(ValueError, match=r"keys.0.sha256: not hex"):
        load_keys(path)
    key = add_key(tmp_path / "good.yaml", "a")
    store = KeyStore(tmp_path / "good.yaml", check_interval_s=0)
    (tmp_path / "good.yaml").write_text("keys: [oops")
    assert store.lookup(key).name == "a"  # the last good keys stay in force


def _classify(error):
    return {"Died": "replica_died", "Full": "overloaded", "Broken": "unavailable"}.get(type(error).__name__)


class Died(Exception): ...
class Full(Exception): ...
class Broken(Exception): ...


def test_a_dead_replica_that_reaches_here_is_reported_not_retried():
    """Its retries were used up in the stage call (HandleCalls): one attempt, then a 503."""
    attempts = []

    async def always_dies():
        attempts.append(1)
        raise Died()

    with pytest.raises(StageUnavailable, match="died and its retries failed"):
        asyncio.run(run_resilient(always_dies, timeout_s=5, classify=_classify))
    assert len(attempts) == 1


def test_other_errors_are_not_retried():
    attempts = []

    async def fails(kind):
        attempts.append(kind)
        raise kind()

    for kind, expected in ((ValueError, ValueError), (Full, Overloaded), (Broken, StageUnavailable)):
        attempts.clear()
        with pytest.raises(expected):
            asyncio.run(run_resilient(lambda: fails(kind), timeout_s=5, classify=_classify))
        assert attempts == [kind]


def test_timeout_cancels_the_attempt():
    cancelled = asyncio.Event()

    async def slow():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main():
        with pytest.raises(RequestTimedOut, match="0.05 s"):
            await run_resilient(slow, timeout_s=0.05, classify=_classify)
        return cancelled.is_set()

    assert asyncio.run(main())


def _request(headers: dict[str, str], peer: str = "10.0.0.1"):
    from starlette.requests import Request

    return Request({"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                    "client": (peer, 1234)})


def test_a_client_is_its_key_else_its_address_and_a_forwarded_header_only_when_trusted():
    from serve.http.auth import ApiKey
    from serve.http.guards import Guards
    from serve.settings import AdmissionSettings, AuthSettings

    def guards(**auth) -> Guards:
        return Guards(None, RateLimiter(1, 1, 1), AdmissionGate(4), AdmissionSettings(), AuthSettings(**auth))

    forwarded = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7", "Authorization": "Bearer anything"}
    plain = guards()
    assert plain.identity(_request(forwarded), None) == "addr:10.0.0.1", "headers a client writes are not trusted"
    trusted = guards(client_address_header="X-Forwarded-For")
    assert trusted.identity(_request(forwarded), None) == "addr:198.51.100.7", "the entry the trusted proxy added"
    assert trusted.identity(_request({}), None) == "addr:10.0.0.1"
    key = ApiKey(name="team-a", digest=b"x" * 32)
    assert trusted.identity(_request(forwarded), key) == "key:team-a"
