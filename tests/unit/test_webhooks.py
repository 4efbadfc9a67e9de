"""Webhooks: the SSRF guard, signing, and delivery with retries. No network: a fake
resolver, httpx.MockTransport as the receiver, a fake sleep that records its waits."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging

import httpx
import pytest

from serve.jobs import webhooks
from serve.jobs.webhooks import (DeliveryResult, WebhookRefused, WebhookSender, check_webhook_url, resolve_host, sign,
                                 webhook_secret)
from serve.settings import WebhookSettings

PUBLIC = "93.184.216.34"
PUBLIC_2 = "93.184.216.35"
SECRET = b"test-secret"
HINT = "args.webhooks.allowed_hosts"

DNS = {
    "hooks.example": [PUBLIC],
    "localhost": ["127.0.0.1"],
    "mixed.example": [PUBLIC, "10.0.0.5"],
    "internal.example": ["10.2.3.4", "10.9.9.9"],
    "split.example": ["10.2.3.4", "192.168.1.1"],
    "two.example": [PUBLIC, PUBLIC_2],
}


class FakeResolver:
    """A DNS that answers from a dict (mutable, for rebinding); unknown names fail."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = dict(DNS if table is None else table)
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host not in self.table:
            raise OSError(-2, "Name or service not known")
        return list(self.table[host])


def check(url: str, resolver: FakeResolver | None = None, **settings) -> list[str]:
    return asyncio.run(check_webhook_url(url, WebhookSettings(**settings), resolver or FakeResolver()))


def refusal(url: str, resolver: FakeResolver | None = None, **settings) -> str:
    with pytest.raises(WebhookRefused) as caught:
        check(url, resolver, **settings)
    assert caught.value.message == str(caught.value)
    assert caught.value.message.startswith("webhook_url: ")
    return caught.value.message


# -- the SSRF guard ------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1/hook", "127.0.0.1 is a loopback address"),
    ("http://localhost/hook", "localhost resolves to 127.0.0.1, which is a loopback address"),
    ("http://10.1.2.3/", "10.1.2.3 is a private address"),
    ("http://192.168.0.10/", "192.168.0.10 is a private address"),
    ("http://172.16.5.4/", "172.16.5.4 is a private address"),
    ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is a link-local address"),
    ("http://[::1]:8080/", "::1 is a loopback address"),
    ("http://[fe80::1]/", "fe80::1 is a link-local address"),
    ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1 is an IPv4-mapped form of 127.0.0.1, a loopback address"),
    ("http://[64:ff9b::a00:1]/", "a NAT64 form of 10.0.0.1, a private address"),
    ("http://[2002:a9fe:a9fe::]/", "a 6to4 form of 169.254.169.254, a link-local address"),
    ("http://[fec0::1]/", "fec0::1 is a site-local address"),
    ("http://0.0.0.0/", "0.0.0.0 is the unspecified address"),
    ("http://0.1.2.3/", "0.1.2.3 is a 'this network' address (0.0.0.0/8)"),
    ("http://100.64.0.1/", "100.64.0.1 is a carrier-grade NAT address (100.64.0.0/10)"),
    ("http://224.0.0.251/", "224.0.0.251 is a multicast address"),
    ("http://2130706433/", "2130706433 is the address 127.0.0.1, a loopback address"),
    ("http://0x7f.1/", "0x7f.1 is the address 127.0.0.1, a loopback address"),
    ("http://10.1/", "10.1 is the address 10.0.0.1, a private address"),
])
def test_refuses_non_public_addresses(url, expected):
    message = refusal(url)
    assert expected in message
    assert HINT in message


@pytest.mark.parametrize("url, expected", [
    ("ftp://hooks.example/x", "scheme 'ftp' is not allowed; use http or https"),
    ("file:///etc/passwd", "scheme 'file' is not allowed"),
    ("//hooks.example/x", "scheme '(none)' is not allowed"),
    ("http:///path", "a host is required"),
    ("http://user:pass@hooks.example/", "credentials in the URL (user:password@) are not allowed"),
    ("http://token@hooks.example/", "credentials in the URL"),
    ("http://hooks.example:0/", "port 0 is out of range; use 1 to 65535"),
    ("http://hooks.example:70000/", "port 70000 is out of range"),
    ("http://[fe80::1%25eth0]/", "zone ids"),
    ("http://0x1g.1/", "does not resolve"),
    ("http://0xfff.1/", "0xfff.1 is not a valid IP address"),
])
def test_refuses_malformed_urls(url, expected):
    assert expected in refusal(url)


def test_refuses_a_name_with_any_private_address():
    message = refusal("https://mixed.example/hook")
    assert message == ("webhook_url: mixed.example resolves to 10.0.0.5, which is a private address; "
                       "webhooks may only call public addresses unless the host is in args.webhooks.allowed_hosts")


def test_refuses_a_name_that_does_not_resolve():
    resolver = FakeResolver()
    assert "nowhere.example does not resolve to an address" in refusal("https://nowhere.example/h", resolver)
    assert resolver.calls == [("nowhere.example", 443)]
    assert "does not resolve" in refusal("http://hooks.example/", FakeResolver({"hooks.example": []}))


def test_refuses_an_over_long_url():
    url = "https://hooks.example/" + "a" * 100
    assert check(url, max_url_chars=len(url)) == [PUBLIC]
    message = refusal(url + "a", max_url_chars=len(url))
    assert message == f"webhook_url: {len(url) + 1} characters; at most {len(url)} are allowed (args.webhooks.max_url_chars)"


def test_literal_addresses_skip_the_resolver():
    resolver = FakeResolver({})
    assert check(f"http://{PUBLIC}:8080/x", resolver) == [PUBLIC]
    assert check("http://[2606:2800:220:1:248:1893:25c8:1946]/", resolver) == ["2606:2800:220:1:248:1893:25c8:1946"]
    assert resolver.calls == []


def test_accepts_public_addresses():
    resolver = FakeResolver()
    assert check("https://hooks.example/h?sig=1", resolver) == [PUBLIC]
    assert resolver.calls == [("hooks.example", 443)]
    assert check("http://two.example:8080/", resolver) == [PUBLIC, PUBLIC_2]
    assert resolver.calls[-1] == ("two.example", 8080)
    assert check("http://[64:ff9b::5db8:d822]/") == ["64:ff9b::5db8:d822"]  # NAT64 of a public address


def test_allow_list_by_host_name():
    assert check("http://localhost:9000/hook", allowed_hosts=["LOCALHOST."]) == ["127.0.0.1"]
    assert "loopback" in refusal("http://localhost:9000/hook", allowed_hosts=["otherhost"])


def test_allow_list_by_exact_address():
    assert check("http://10.1.2.3/hook", allowed_hosts=["10.1.2.3"]) == ["10.1.2.3"]
    assert check("http://167838211/hook", allowed_hosts=["10.1.2.3"]) == ["10.1.2.3"]  # decimal form
    assert check("http://[::1]/hook", allowed_hosts=["::1"]) == ["::1"]
    assert "10.1.2.4 is a private address" in refusal("http://10.1.2.4/hook", allowed_hosts=["10.1.2.3"])


def test_allow_list_by_network():
    assert check("http://internal.example/h", allowed_hosts=["10.0.0.0/8"]) == ["10.2.3.4", "10.9.9.9"]
    assert check("http://[::ffff:10.2.3.4]/h", allowed_hosts=["10.0.0.0/8"]) == ["::ffff:a02:304"]
    message = refusal("http://split.example/h", allowed_hosts=["10.0.0.0/8"])
    assert "split.example resolves to 192.168.1.1, which is a private address" in message


def test_default_resolver_uses_getaddrinfo_without_dns():
    assert asyncio.run(resolve_host("127.0.0.1", 80)) == ["127.0.0.1"]
    # Without a resolver, localhost is refused whether the system resolves it or not.
    with pytest.raises(WebhookRefused):
        asyncio.run(check_webhook_url("http://localhost/", WebhookSettings(timeout_s=2)))


# -- signing ---------------------------------------------------------------------------

def test_sign_is_hmac_sha256_of_timestamp_dot_body():
    expected = hmac.new(b"k", b"1700000000.{\"a\":1}", hashlib.sha256).hexdigest()
    assert sign(b"k", 1700000000, b'{"a":1}') == "sha256=" + expected
    assert sign(b"k", 1700000001, b'{"a":1}') != sign(b"k", 1700000000, b'{"a":1}')


def test_webhook_secret_from_env(monkeypatch):
    monkeypatch.setenv("MY_HOOK_SECRET", "s3cret")
    assert webhook_secret(WebhookSettings(secret_env="MY_HOOK_SECRET")) == b"s3cret"


def test_webhook_secret_fallback_is_random_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(webhooks, "_fallback_secret", None)
    monkeypatch.setenv("MY_HOOK_SECRET", "")
    settings = WebhookSettings(secret_env="MY_HOOK_SECRET")
    with caplog.at_level(logging.WARNING, logger="kandinsky_serve.webhooks"):
        first = webhook_secret(settings)
        second = webhook_secret(settings)
    assert len(first) == 32 and first == second
    assert [r.getMessage().split(" ")[0] for r in caplog.records] == ["MY_HOOK_SECRET"]


# -- delivery --------------------------------------------------------------------------

class Receiver:
    """A MockTransport handler answering from a script: a status, (status, headers), or an
    exception class to raise."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, type) and issubclass(step, Exception):
            raise step("boom", request=request)
        status, headers = step if isinstance(step, tuple) else (step, {})
        return httpx.Response(status, headers=headers, text="ok")


class Harness:
    def __init__(self, *script, resolver: FakeResolver | None = None, **settings) -> None:
        self.receiver = Receiver(*script)
        self.resolver = resolver or FakeResolver()
        self.waits: list[float] = []
        self.times = iter(range(1_700_000_000, 1_700_001_000, 10))
        settings.setdefault("max_attempts", 5)
        settings.setdefault("first_retry_s", 1.0)
        self.sender = WebhookSender(WebhookSettings(**settings), SECRET, transport=httpx.MockTransport(self.receiver),
                                    sleep=self.sleep, resolve=self.resolver, clock=lambda: next(self.times) + 0.75)

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    def deliver(self, url: str = "https://hooks.example/hook?token=t", payload: dict | None = None,
                event: str = "job.succeeded") -> DeliveryResult:
        async def go() -> DeliveryResult:
            try:
                return await self.sender.deliver(url, payload if payload is not None else {"id": "j1"}, event)
            finally:
                await self.sender.aclose()
        return asyncio.run(go())


def test_delivery_is_signed_and_pinned_to_the_vetted_address():
    payload = {"id": "job-1", "state": "succeeded", "images": [{"seed": 7}], "eta_s": None}
    harness = Harness(200)
    result = harness.deliver("https://hooks.example:8443/hook?token=t", payload)
    assert result == DeliveryResult(True, 1, 200, None) and result
    [request] = harness.receiver.requests
    assert request.method == "POST"
    assert json.loads(request.content) == payload
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "kandinsky-serve-webhook"
    assert request.headers["x-kandinsky-event"] == "job.succeeded"
    assert request.headers["x-kandinsky-timestamp"] == "1700000000"
    expected = hmac.new(SECRET, b"1700000000." + request.content, hashlib.sha256).hexdigest()
    assert request.headers["x-kandinsky-signature"] == "sha256=" + expected
    assert len(request.headers["x-kandinsky-delivery"]) == 32
    # Connects to the address it vetted; the name travels in Host and TLS SNI.
    assert str(request.url) == f"https://{PUBLIC}:8443/hook?token=t"
    assert request.headers["host"] == "hooks.example:8443"
    assert request.extensions["sni_hostname"] == "hooks.example"
    assert "cookie" not in request.headers


def test_retries_5xx_with_doubling_waits_same_delivery_fresh_signature():
    harness = Harness(500, 502, 200)
    result = harness.deliver()
    assert result == DeliveryResult(True, 3, 200, None)
    assert harness.waits == [1.0, 2.0]
    requests = harness.receiver.requests
    assert len({r.headers["x-kandinsky-delivery"] for r in requests}) == 1
    assert [r.headers["x-kandinsky-timestamp"] for r in requests] == ["1700000000", "1700000010", "1700000020"]
    for r in requests:
        signed = r.headers["x-kandinsky-timestamp"].encode() + b"." + r.content
        assert r.headers["x-kandinsky-signature"] == "sha256=" + hmac.new(SECRET, signed, hashlib.sha256).hexdigest()
    assert harness.resolver.calls == [("hooks.example", 443)] * 3  # re-vetted before every attempt


def test_4xx_is_permanent():
    harness = Harness(404, 200)
    result = harness.deliver()
    assert result == DeliveryResult(False, 1, 404, "HTTP 404") and not result
    assert harness.waits == [] and len(harness.receiver.requests) == 1
    assert harness.sender.last is result


def test_408_and_timeouts_are_retried():
    harness = Harness(408, httpx.ReadTimeout, 200)
    assert harness.deliver() == DeliveryResult(True, 3, 200, None)
    assert harness.waits == [1.0, 2.0]


def test_retry_after_on_429_and_503_when_longer_capped_at_60():
    harness = Harness((429, {"Retry-After": "7"}), (503, {"Retry-After": "600"}), (429, {"Retry-After": "1"}),
                      (500, {"Retry-After": "30"}), (429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), 200,
                      max_attempts=6, first_retry_s=1.0)
    assert harness.deliver() == DeliveryResult(True, 6, 200, None)
    # Backoff 1, 2, 4, 8, 16: Retry-After wins when longer (7, 60 capped), never on a 500 or as a date.
    assert harness.waits == [7.0, 60.0, 4.0, 8.0, 16.0]


def test_connection_errors_are_retried():
    harness = Harness(httpx.ConnectError, 200)
    assert harness.deliver() == DeliveryResult(True, 2, 200, None)
    assert harness.waits == [1.0]


def test_connect_error_tries_the_next_vetted_address_in_the_same_attempt():
    harness = Harness(httpx.ConnectError, 200)
    assert harness.deliver("http://two.example/h") == DeliveryResult(True, 1, 200, None)
    assert [r.url.host for r in harness.receiver.requests] == [PUBLIC, PUBLIC_2]
    assert harness.waits == []


def test_gives_up_after_max_attempts(caplog):
    harness = Harness(500, max_attempts=3, first_retry_s=0.5)
    with caplog.at_level(logging.WARNING, logger="kandinsky_serve.webhooks"):
        result = harness.deliver()
    assert result == DeliveryResult(False, 3, 500, "HTTP 500")
    assert harness.waits == [0.5, 1.0] and len(harness.receiver.requests) == 3
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "given up after 3 attempts" in record.getMessage()
    assert "token=t" not in record.getMessage()  # the query may carry secrets


def test_gives_up_on_persistent_connection_errors():
    harness = Harness(httpx.ConnectError, max_attempts=2)
    result = harness.deliver()
    assert (result.delivered, result.attempts, result.status) == (False, 2, None)
    assert result.error.startswith("ConnectError")


def test_redirects_are_not_followed():
    harness = Harness((302, {"Location": "http://127.0.0.1/steal"}), 200)
    assert harness.deliver() == DeliveryResult(False, 1, 302, "HTTP 302")
    assert [str(r.url) for r in harness.receiver.requests] == [f"https://{PUBLIC}/hook?token=t"]


def test_rebinding_to_a_private_address_stops_delivery():
    harness = Harness(500, 200)

    async def rebind(seconds: float) -> None:
        harness.waits.append(seconds)
        harness.resolver.table["hooks.example"] = ["127.0.0.1"]

    harness.sender._sleep = rebind
    result = harness.deliver()
    assert (result.delivered, result.attempts, result.status) == (False, 1, 500)
    assert "hooks.example resolves to 127.0.0.1, which is a loopback address" in result.error
    assert len(harness.receiver.requests) == 1 and harness.waits == [1.0]


def test_refused_url_makes_no_request():
    harness = Harness(200)
    result = harness.deliver("http://169.254.169.254/latest/meta-data")
    assert (result.delivered, result.attempts) == (False, 0)
    assert "link-local" in result.error and harness.receiver.requests == []


def test_cookies_are_not_kept():
    harness = Harness((200, {"Set-Cookie": "session=abc; Path=/"}), 200)

    async def twice() -> list[DeliveryResult]:
        try:
            return [await harness.sender.deliver("http://hooks.example/h", {}, "job.failed") for _ in range(2)]
        finally:
            await harness.sender.aclose()

    assert [r.delivered for r in asyncio.run(twice())] == [True, True]
    assert [r.headers.get("cookie") for r in harness.receiver.requests] == [None, None]


def test_never_raises_on_an_unserialisable_payload():
    harness = Harness(200)
    result = harness.deliver(payload={"bad": object()})
    assert (result.delivered, result.attempts) == (False, 0)
    assert result.error.startswith("TypeError") and harness.receiver.requests == []


def test_cancellation_propagates():
    harness = Harness(500, 200)

    async def cancelled(seconds: float) -> None:
        raise asyncio.CancelledError

    harness.sender._sleep = cancelled
    with pytest.raises(asyncio.CancelledError):
        harness.deliver()
    assert len(harness.receiver.requests) == 1
