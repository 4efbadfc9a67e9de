"""Hostile clients against the live service (#27): each attack bounded in count and time,
on loopback only, and what must keep working for everyone else asserted."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.parse

import httpx

from tests.chaos.test_faults import BODY


def test_a_probe_flood_on_a_healthy_service_is_all_ready(served_app):
    url, _ = served_app

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            return await asyncio.gather(*(client.get("/readyz") for _ in range(200)))

    responses = asyncio.run(flood())
    codes = [response.status_code for response in responses]
    assert codes.count(200) == 200, {code: codes.count(code) for code in set(codes)}
    assert all(response.json() == {"ready": True} for response in responses)


def _slow_body(host: str, port: int, path: str, key: str) -> socket.socket:
    """Headers announcing a 100 kB body, then one byte of it, then nothing."""
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{").encode())
    return sock


def _status_line(sock: socket.socket) -> str:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0].decode()


def test_slow_bodies_get_408_and_never_shut_out_another_key(guarded_app):
    """The guarded app reads bodies for at most 2 s."""
    url, keys = guarded_app
    parsed = urllib.parse.urlsplit(url)
    path = parsed.path + "/v1/text2img"
    started = time.perf_counter()
    sockets = [_slow_body(parsed.hostname, parsed.port, path, keys["load"]) for _ in range(16)]
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            served = client.post("/v1/text2img", json=BODY, headers={"Authorization": f"Bearer {keys['normal']}"})
        statuses = [_status_line(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    assert served.status_code == 200, served.text
    assert all(" 408 " in status for status in statuses), statuses
    assert time.perf_counter() - started < 20, "each trickled body is cut off at its deadline"


def test_another_keys_job_is_404_on_every_route_and_its_owner_sees_it(guarded_app):
    url, keys = guarded_app
    owner, other = ({"Authorization": f"Bearer {keys[name]}"} for name in ("load", "normal"))
    with httpx.Client(base_url=url, timeout=60) as client:
        submitted = client.post("/v1/jobs", json={"mode": "text2img", "params": BODY}, headers=owner)
        assert submitted.status_code == 202, submitted.text
        job = f"/v1/jobs/{submitted.json()['id']}"
        for method, path in (("GET", job), ("GET", f"{job}/events"), ("GET", f"{job}/images/0"), ("DELETE", job)):
            refused = client.request(method, path, headers=other)
            assert refused.status_code == 404, (method, path, refused.text)
        deadline = time.monotonic() + 60
        while (view := client.get(job, headers=owner).json())["state"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, view
            time.sleep(0.05)  # polling interval
        assert view["state"] == "succeeded", view
