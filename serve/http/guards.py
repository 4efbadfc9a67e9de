"""What a request must pass before any model work, as FastAPI dependencies.

* :meth:`Guards.api_key` (every route but the probes): a known, unrevoked key within its
  request rate; the key's record is the dependency's value.
* :meth:`Guards.accepting_work` (every route that starts model work): not draining.
* :attr:`Guards.caller`: who is asking, for per-client accounting: ``key:<name>`` with API
  keys, else ``addr:<address>`` (the peer's, or a trusted proxy's header).
* :attr:`Guards.job_scope`: whose jobs the caller may see (its own; an admin key, all).
* :attr:`Guards.generation_slot` (synchronous generation): a place under the in-flight
  bound and under the caller's share of it, held until the answer is ready
  (:meth:`Guards.holding_slot` for a route that reads its own body first).
* :meth:`Guards.deadline`: the request's time limit (a client's ``X-Request-Timeout``,
  at most the configured one).

Each raises :class:`~serve.http.errors.ApiError`; the body-size limit stays an ASGI
middleware because it must act while the body is read, and requests with a body have their
key checked before it (:meth:`Guards.check_before_body`, called by the HTTP layer).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import binascii
import time
from collections.abc import AsyncIterator

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve.http.admission import AdmissionGate, RateLimiter, generation_cost, retry_after_header
from serve.http.auth import ApiKey, KeyStore
from serve.http.errors import ApiError
from serve.settings import AdmissionSettings, AuthSettings

TIMEOUT_HEADER = "X-Request-Timeout"
"""A client's own deadline in seconds; the configured ``request_timeout_s`` is the most it can ask."""
CHALLENGE = {"WWW-Authenticate": "Bearer"}
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

_bearer = HTTPBearer(auto_error=False, description="An API key from `kandinsky-serve keys new` (when keys are configured).")


def basic_password(credentials: str) -> str:
    """The password of HTTP Basic ``credentials`` (base64 ``user:password``); the user name
    when there is no password (some clients put the key there); "" when unreadable."""
    try:
        user, _, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError):
        return ""
    return (password or user).strip()


class Guards:
    def __init__(self, keys: KeyStore | None, limiter: RateLimiter, gate: AdmissionGate, admission: AdmissionSettings,
                 auth: AuthSettings | None = None) -> None:
        self.keys = keys
        self.limiter = limiter
        self.gate = gate
        self.admission = admission
        self.address_header = (auth or AuthSettings()).client_address_header
        self._paced = 0

        # Built here so that they can depend on this instance's api_key (FastAPI runs a
        # dependency once per request however many others depend on it).
        async def caller(request: Request, key: ApiKey | None = Depends(self.api_key)) -> str:
            return self.identity(request, key)

        async def generation_slot(client: str = Depends(caller)) -> AsyncIterator[None]:
            async for _ in self._slot(client):
                yield

        async def job_scope(request: Request, key: ApiKey | None = Depends(self.api_key)) -> str | None:
            """Whose jobs the caller may see and cancel: its own, or (an admin key) everyone's (None)."""
            return None if key is not None and key.admin else self.identity(request, key)

        self.caller = caller
        self.generation_slot = generation_slot
        self.job_scope = job_scope

    def identity(self, request: Request, key: ApiKey | None) -> str:
        if key is not None:
            return f"key:{key.name}"
        address = None
        if self.address_header:
            entries = [entry.strip() for entry in request.headers.get(self.address_header, "").split(",")]
            address = next((entry for entry in reversed(entries) if entry), None)
        if address is None:
            address = request.client.host if request.client else "unknown"
        return f"addr:{address[:64]}"

    async def api_key(self, request: Request,
                      credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> ApiKey | None:
        """The caller's key (None when the service runs without keys). A request with a body
        was checked already, before its body was read (:meth:`check_before_body`)."""
        if self.keys is None:
            return None
        checked = getattr(request.state, "api_key", None)
        if checked is not None:
            return checked
        return await self.check_key(request.headers.get("authorization"))

    async def check_before_body(self, request: Request) -> None:
        """The key and rate check for a request that carries a body, run by the HTTP layer
        before the body is read: a refused request (a rate-limited flood above all) then costs
        no body transfer and no parse. Every route that takes a body is keyed."""
        if self.keys is not None and request.method in BODY_METHODS:
            request.state.api_key = await self.check_key(request.headers.get("authorization"))

    async def check_key(self, header: str | None) -> ApiKey:
        assert self.keys is not None
        if not header:
            raise ApiError(401, "missing_api_key", "send 'Authorization: Bearer <key>'", headers=CHALLENGE,
                           reason="unauthenticated")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "basic":  # A1111 clients (webuiapi, Open WebUI): the key as the password
            token = basic_password(token)
        elif scheme.lower() != "bearer":
            token = ""
        if not token or " " in token:
            raise ApiError(401, "malformed_authorization",
                           "the Authorization header must be 'Bearer <key>' (or HTTP Basic with the key as the password)",
                           headers=CHALLENGE, reason="unauthenticated")
        key = self.keys.lookup(token)
        if key is None:
            raise ApiError(401, "invalid_api_key", "unknown API key", headers=CHALLENGE, reason="unauthenticated")
        if key.revoked:
            raise ApiError(403, "api_key_revoked", f"API key {key.name!r} has been revoked", reason="forbidden")
        refusal = self.limiter.admit_request(key.name, key.requests_per_s, key.images_per_min)
        if refusal is not None:
            held = await self._pace(refusal.retry_after_s)
            raise ApiError(429, "rate_limited", f"{refusal.reason} for key {key.name!r}",
                           headers={"Retry-After": retry_after_header(refusal.retry_after_s - held)}, reason="rate_limited")
        return key

    async def _pace(self, retry_after_s: float) -> float:
        """Hold a rate-limit refusal until a retry could succeed (at most ``refusal_pace_s``,
        and only while fewer than ``max_paced_refusals`` are held); the seconds held."""
        hold = min(retry_after_s, self.admission.refusal_pace_s)
        if hold <= 0 or self._paced >= self.admission.max_paced_refusals:
            return 0.0
        self._paced += 1
        try:
            await asyncio.sleep(hold)  # the pacing itself, not a wait for a condition
        finally:
            self._paced -= 1
        return hold

    async def accepting_work(self) -> None:
        if self.gate.draining:
            raise ApiError(
                503, "shutting_down", "this ingress replica is shutting down and takes no new work; retry (another "
                "replica or the restarted service will answer)",
                headers={"Retry-After": retry_after_header(self.gate.retry_after_s())}, reason="shutting_down",
            )

    def holding_slot(self, client: str):
        """:attr:`generation_slot` as a context manager, for a route that must read its body
        itself (a multipart form) before it takes a place: admission after the body."""
        return contextlib.asynccontextmanager(self._slot)(client)

    async def _slot(self, client: str) -> AsyncIterator[None]:
        """Held for the whole synchronous request; a success updates the gate's duration estimate."""
        await self.accepting_work()
        refused = self.gate.enter(client)
        retry = {"Retry-After": retry_after_header(self.gate.retry_after_s())}
        if refused == "client_full":
            raise ApiError(
                429, "too_many_inflight",
                f"this client already has {self.gate.per_client} requests in flight (the most one client may have "
                "per ingress replica); wait for one to finish", headers=retry, reason="too_many_inflight",
            )
        if refused is not None:
            raise ApiError(
                503, "overloaded",
                f"the service is at capacity ({self.gate.limit} requests in flight per ingress replica); retry later",
                headers=retry, reason="overloaded",
            )
        started = time.perf_counter()
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            self.gate.leave(time.perf_counter() - started if succeeded else None, client)

    def admit_cost(self, key: ApiKey | None, spec) -> None:
        """Charge the request's cost (images x pixels x steps, in standard images) to the key's
        budget, once the request is known to be valid."""
        if key is None:
            return
        cost = generation_cost(len(spec.seeds), spec.width, spec.height, spec.steps, spec.prior_steps)
        if spec.hires is not None:  # the first pass at its own size, the second's steps at the output size
            cost = (generation_cost(len(spec.seeds), spec.hires.width, spec.hires.height, spec.steps, spec.prior_steps)
                    + generation_cost(len(spec.seeds), spec.width, spec.height, spec.hires.steps, 0))
        refusal = self.limiter.admit_cost(key.name, cost, key.requests_per_s, key.images_per_min)
        if refusal is not None:
            raise ApiError(429, "rate_limited", f"{refusal.reason} for key {key.name!r}",
                           [{"field": "num_images", "message": refusal.reason}],
                           headers={"Retry-After": retry_after_header(refusal.retry_after_s)}, reason="rate_limited")

    async def deadline(self, request: Request) -> float:
        """Seconds this request may take."""
        limit = self.admission.request_timeout_s
        asked = request.headers.get(TIMEOUT_HEADER)
        if asked is None:
            return limit
        try:
            seconds = float(asked)
        except ValueError:
            seconds = float("nan")
        if not seconds > 0:
            raise ApiError(422, "validation_error", f"{TIMEOUT_HEADER}: must be a number of seconds > 0",
                           [{"field": TIMEOUT_HEADER, "message": f"seconds, > 0, at most {limit:g}"}], reason="validation")
        return min(limit, seconds)
