"""Job webhooks: the SSRF guard for ``webhook_url``, HMAC signing, and delivery with
retries — plain Python and httpx, no Ray.

* :func:`check_webhook_url` — refuses URLs that could reach the service's own network
  (loopback, private, link-local, ... addresses, by name or literal), unless allow-listed
  in ``args.webhooks.allowed_hosts``; returns the vetted addresses.
* :func:`sign` — ``X-Kandinsky-Signature``: ``sha256=`` + hex HMAC-SHA256 of
  ``f"{timestamp}."`` + body, so receivers can also reject replays by timestamp.
* :class:`WebhookSender` — POSTs a job's final view; re-vets the URL before every attempt
  and connects only to the address it vetted (no second DNS lookup to rebind).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from serve.settings import WebhookSettings

logger = logging.getLogger("kandinsky_serve.webhooks")

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> IP address strings``; the default uses ``loop.getaddrinfo``."""
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

USER_AGENT = "kandinsky-serve-webhook"
MAX_RETRY_AFTER_S = 60.0
_ALLOWED_HINT = "webhooks may only call public addresses unless the host is in args.webhooks.allowed_hosts"
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_SHARED_NAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NUMERIC_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")


class WebhookRefused(Exception):
    """A ``webhook_url`` the service will not call; ``message`` says why and what is allowed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, in the system's preference order (off the loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _parse_numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton's forms (``2130706433``, ``0x7f.1``, ``0177.0.0.1``) as the address
    getaddrinfo would connect to; None when ``host`` is not all-numeric.

    Raises ValueError for numeric forms inet_aton would reject."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_NUMERIC_PART.match(p) for p in parts):
        return None
    values = []
    for part in parts:
        if part[:2].lower() == "0x":
            values.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            values.append(int(part, 8))  # ValueError on 8 or 9, as inet_aton
        else:
            values.append(int(part))
    *leading, last = values
    if any(v > 255 for v in leading) or last >= 1 << (8 * (4 - len(leading))):
        raise ValueError(host)
    number = last
    for index, value in enumerate(leading):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def _literal_address(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is one (in any form a connection would accept)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return _parse_numeric_ipv4(host)
    except ValueError:
        raise WebhookRefused(f"webhook_url: {host} is not a valid IP address") from None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 form carries traffic to (mapped, NAT64, 6to4)."""
    if address.ipv4_mapped is not None:
        return "an IPv4-mapped form", address.ipv4_mapped
    if address in _NAT64:
        return "a NAT64 form", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return "a 6to4 form", address.sixtofour
    return None


def _ipv4_problem(address: ipaddress.IPv4Address) -> str | None:
    if address.is_unspecified:
        return "the unspecified address"
    if address in _THIS_NETWORK:
        return "a 'this network' address (0.0.0.0/8)"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address in _SHARED_NAT:
        return "a carrier-grade NAT address (100.64.0.0/10)"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "not a public address"
    return None


def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` is not a public address (``"a loopback address"``), or None."""
    if isinstance(address, ipaddress.IPv4Address):
        return _ipv4_problem(address)
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        # Judged by where the traffic goes; Python flags ::ffff:0:0/96 and 64:ff9b::/96
        # as reserved even around public IPv4 addresses.
        form, ipv4 = embedded
        problem = _ipv4_problem(ipv4)
        return None if problem is None else f"{form} of {ipv4}, {problem}"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_site_local:
        return "a site-local address"
    if address.teredo is not None:
        return "a Teredo tunnel address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "not a public address"
    return None


def _normal_name(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _allow_list(entries: list[str]) -> tuple[set[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    """``allowed_hosts`` split into host names and networks (a single address is a /32 or /128)."""
    names: set[str] = set()
    networks = []
    for entry in entries:
        text = entry.strip()
        try:
            networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
        except ValueError:
            names.add(_normal_name(text))
    return names, networks


def _allowed(address: IPAddress, networks: list) -> bool:
    if any(address in network for network in networks):
        return True
    embedded = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    return embedded is not None and any(embedded[1] in network for network in networks)


def _parse_url(url: str, settings: WebhookSettings) -> httpx.URL:
    if not isinstance(url, str):
        raise WebhookRefused("webhook_url: must be a string (an http or https URL)")
    if len(url) > settings.max_url_chars:
        raise WebhookRefused(f"webhook_url: {len(url)} characters; at most {settings.max_url_chars} are allowed "
                             "(args.webhooks.max_url_chars)")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as error:
        raise WebhookRefused(f"webhook_url: not a valid URL ({error})") from None
    if parsed.scheme not in ("http", "https"):
        raise WebhookRefused(f"webhook_url: scheme {parsed.scheme or '(none)'!r} is not allowed; use http or https")
    if not parsed.raw_host:
        raise WebhookRefused("webhook_url: a host is required (https://host/path)")
    if parsed.userinfo:
        raise WebhookRefused("webhook_url: credentials in the URL (user:password@) are not allowed; "
                             "receivers authenticate calls by their X-Kandinsky-Signature header")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise WebhookRefused(f"webhook_url: port {parsed.port} is out of range; use 1 to 65535")
    if "%" in parsed.host:
        raise WebhookRefused("webhook_url: IPv6 zone ids (%...) are not allowed")
    return parsed


async def check_webhook_url(url: str, settings: WebhookSettings, resolve: Resolver | None = None) -> list[str]:
    """The SSRF guard: raises :class:`WebhookRefused` unless every address ``url``'s host
    resolves to is public, or the host or all its addresses are allow-listed. Returns the
    vetted addresses (normalised, in resolver order) to connect to."""
    parsed = _parse_url(url, settings)
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    names, networks = _allow_list(settings.allowed_hosts)
    literal = _literal_address(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        try:
            found = await asyncio.wait_for((resolve or resolve_host)(host, port), settings.timeout_s)
            addresses = list(dict.fromkeys(ipaddress.ip_address(a.split("%", 1)[0]) for a in found))
        except Exception:  # any failure to resolve refuses: the safe side
            addresses = []
        if not addresses:
            raise WebhookRefused(f"webhook_url: {host} does not resolve to an address; "
                                 "webhooks need a host name that resolves, or an IP address")
    if _normal_name(host) in names or _normal_name(parsed.host) in names:
        return [str(a) for a in addresses]
    for address in addresses:
        if _allowed(address, networks):
            continue
        problem = address_problem(address)
        if problem is None:
            continue
        if literal is None:
            subject = f"{host} resolves to {address}, which is"
        elif _is_ip(host):
            subject = f"{host} is"
        else:
            subject = f"{host} is the address {address},"
        raise WebhookRefused(f"webhook_url: {subject} {problem}; {_ALLOWED_HINT}")
    return [str(a) for a in addresses]


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """``X-Kandinsky-Signature``: ``sha256=`` + hex HMAC-SHA256(secret, ``f"{timestamp}."`` + body)."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


_fallback_secret: bytes | None = None
_fallback_lock = threading.Lock()


def webhook_secret(settings: WebhookSettings) -> bytes:
    """The signing secret from ``$<settings.secret_env>``; unset or empty, a random one made
    once per process (signatures stay unforgeable, but receivers cannot check them)."""
    global _fallback_secret
    value = os.environ.get(settings.secret_env, "")
    if value:
        return value.encode()
    with _fallback_lock:
        if _fallback_secret is None:
            _fallback_secret = secrets.token_bytes(32)
            logger.warning("%s is not set: webhooks are signed with a random per-process secret that "
                           "receivers cannot verify; set it in production", settings.secret_env)
        return _fallback_secret


@dataclass
class DeliveryResult:
    """How one :meth:`WebhookSender.deliver` ended. Truthy exactly when delivered."""

    delivered: bool
    attempts: int
    """HTTP attempts made (a refusal before the first one leaves it 0)."""
    status: int | None = None
    """The last HTTP status received, None when no answer came."""
    error: str | None = None
    """Why it was not delivered."""

    def __bool__(self) -> bool:
        return self.delivered


def _retry_after(value: str | None) -> float | None:
    """A numeric ``Retry-After`` in seconds; HTTP dates are ignored."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _target(url: str) -> str:
    """What logs name: scheme, host and port, never the path or query (they may carry tokens)."""
    try:
        parsed = httpx.URL(url)
        return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}"
    except Exception:
        return "(invalid url)"


class WebhookSender:
    """Delivers signed webhook calls with retries; see :meth:`deliver`.

    Every attempt re-runs :func:`check_webhook_url` and connects to the addresses it
    vetted (``Host`` and TLS SNI keep the name), so a DNS answer that changes after the
    check cannot redirect the call. No redirects, no proxies from the environment, no
    kept-alive connections (a pooled connection is keyed by address, and would be shared
    by names whose certificates were never checked on it), no cookies.
    """

    def __init__(self, settings: WebhookSettings, secret: bytes, transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep, resolve: Resolver | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._secret = secret
        self._sleep = sleep
        self._resolve = resolve
        self._clock = clock
        self._client = httpx.AsyncClient(
            transport=transport, timeout=httpx.Timeout(settings.timeout_s), follow_redirects=False,
            trust_env=False, limits=httpx.Limits(max_keepalive_connections=0),
            cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])))
        self.last: DeliveryResult | None = None
        """The result of the latest :meth:`deliver` to end."""

    async def aclose(self) -> None:
        await self._client.aclose()

    async def check(self, url: str) -> list[str]:
        """The SSRF guard at submission (:func:`check_webhook_url`), with this sender's resolver."""
        return await check_webhook_url(url, self.settings, self._resolve)

    async def deliver(self, url: str, payload: dict, event: str) -> DeliveryResult:
        """POST ``payload`` as JSON to ``url`` with event ``event`` (``job.succeeded``).

        2xx: delivered. 3xx and 4xx other than 408/429: stop. 5xx, 408, 429, timeouts and
        connection errors: retry, ``max_attempts`` in all, after ``first_retry_s`` doubling
        (a numeric Retry-After on 429/503 when longer, at most 60 s). A refused URL stops.
        Never raises, but for cancellation."""
        result = await self._deliver(url, payload, event)
        self.last = result
        return result

    async def _deliver(self, url: str, payload: dict, event: str) -> DeliveryResult:
        target = _target(url)
        delivery = uuid.uuid4().hex
        attempts = 0
        status: int | None = None
        try:
            body = json.dumps(payload, separators=(",", ":")).encode()
            wait = self.settings.first_retry_s
            while True:
                try:
                    addresses = await check_webhook_url(url, self.settings, self._resolve)
                except WebhookRefused as refused:
                    logger.warning("webhook %s %s to %s refused after %d attempts: %s",
                                   event, delivery, target, attempts, refused.message)
                    return DeliveryResult(False, attempts, status, refused.message)
                attempts += 1
                retry_after = None
                try:
                    status, retry_after = await asyncio.wait_for(
                        self._attempt(url, addresses, body, event, delivery), self.settings.timeout_s)
                    error = f"HTTP {status}"
                except asyncio.TimeoutError:
                    status, error = None, f"no answer in {self.settings.timeout_s:g} s"
                except httpx.TransportError as failure:
                    status, error = None, f"{type(failure).__name__}: {failure}"
                if status is not None and 200 <= status < 300:
                    return DeliveryResult(True, attempts, status)
                if status is not None and not (status >= 500 or status in (408, 429)):
                    logger.warning("webhook %s %s to %s failed for good: %s", event, delivery, target, error)
                    return DeliveryResult(False, attempts, status, error)
                if attempts >= self.settings.max_attempts:
                    logger.warning("webhook %s %s to %s given up after %d attempts: %s",
                                   event, delivery, target, attempts, error)
                    return DeliveryResult(False, attempts, status, error)
                delay = wait
                if status in (429, 503) and retry_after is not None:
                    delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
                logger.info("webhook %s %s to %s attempt %d failed (%s); retrying in %g s",
                            event, delivery, target, attempts, error, delay)
                await self._sleep(delay)
                wait *= 2
        except Exception as failure:  # never raise into the job's ending
            logger.exception("webhook %s %s to %s failed", event, delivery, target)
            return DeliveryResult(False, attempts, status, f"{type(failure).__name__}: {failure}")

    async def _attempt(self, url: str, addresses: list[str], body: bytes, event: str,
                       delivery: str) -> tuple[int, float | None]:
        """One signed POST: the answer's status and numeric Retry-After. Tries the vetted
        addresses in turn while connecting fails (nothing was sent yet)."""
        parsed = httpx.URL(url)
        timestamp = int(self._clock())
        headers = {
            "Host": parsed.netloc.decode("ascii"),
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Kandinsky-Event": event,
            "X-Kandinsky-Timestamp": str(timestamp),
            "X-Kandinsky-Signature": sign(self._secret, timestamp, body),
            "X-Kandinsky-Delivery": delivery,
        }
        host = parsed.raw_host.decode("ascii")
        extensions = {"sni_hostname": host} if parsed.scheme == "https" and not _is_ip(host) else {}
        failure: httpx.ConnectError | None = None
        for address in addresses:
            try:
                async with self._client.stream("POST", parsed.copy_with(host=address), content=body,
                                               headers=headers, extensions=extensions) as response:
                    # The body is never read: a receiver cannot make the service buffer it.
                    return response.status_code, _retry_after(response.headers.get("retry-after"))
            except httpx.ConnectError as error:
                failure = error
        assert failure is not None  # check_webhook_url never vets an empty list
        raise failure


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
