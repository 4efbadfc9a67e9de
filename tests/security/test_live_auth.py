"""API keys on the live guarded app: refusals before any stage, and one key's flood does not
hurt another key's latency (per-key rate limits)."""

from __future__ import annotations

import asyncio
import time

import httpx

from serve.tools.loadtest import percentile
from tests.chaos.test_faults import BODY


def test_keys_are_enforced_on_the_live_service(guarded_app):
    url, keys = guarded_app
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/text2img", json=BODY).status_code == 401
        assert client.post("/v1/text2img", json=BODY, headers={"Authorization": "Token x"}).status_code == 401
        assert client.post("/v1/text2img", json=BODY, headers={"Authorization": "Bearer ks-wrong"}).status_code == 401
        assert client.post("/v1/text2img", json=BODY, headers={"Authorization": f"Bearer {keys['revoked']}"}).status_code == 403
        assert client.get("/metrics").status_code == 401
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        assert client.post("/v1/text2img", json=BODY, headers={"Authorization": f"Bearer {keys['normal']}"}).status_code == 200


def test_one_key_flooding_does_not_hurt_another(guarded_app):
    url, keys = guarded_app
    normal = {"Authorization": f"Bearer {keys['normal']}"}
    flood = {"Authorization": f"Bearer {keys['flood']}"}  # 0.2 requests/s allowed

    async def timed(client, headers):
        started = time.perf_counter()
        response = await client.post("/v1/text2img", json=BODY, headers=headers)
        return response.status_code, time.perf_counter() - started

    async def sequence(client, count):
        return [await timed(client, normal) for _ in range(count)]

    async def flooder(client, stop, out):
        while not stop.is_set():
            out.append(await timed(client, flood))
            await asyncio.sleep(0.02)  # the flood's pacing: 50 requests/s offered

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await sequence(client, 1)  # warm
            alone = await sequence(client, 10)
            stop, flooded = asyncio.Event(), []
            task = asyncio.create_task(flooder(client, stop, flooded))
            during = await sequence(client, 10)
            stop.set()
            await task
            return alone, during, flooded

    alone, during, flooded = asyncio.run(main())
    assert all(status == 200 for status, _ in alone + during)
    refused = sum(status == 429 for status, _ in flooded)
    base, loaded = percentile([t for _, t in alone], 0.99), percentile([t for _, t in during], 0.99)
    print(f"\nflood: {len(flooded)} flood requests ({refused} got 429); other key p99 {loaded:.3f} s vs {base:.3f} s alone")
    assert refused >= len(flooded) // 2
    assert loaded <= 2 * base
