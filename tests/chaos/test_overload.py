"""Offered load well past capacity on the guarded app: the excess is refused fast, what is
admitted keeps its latency, and memory stays flat."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
import ray

from serve.tools.loadtest import percentile
from tests.chaos.test_faults import BODY, replica_actors
from tests.conftest import deploy_guarded

# One request in flight: on a CPU a second concurrent request shares the cores and
# doubles both latencies, so only a bound of 1 can keep admitted latency at the unloaded one.
# (On a GPU, batching makes a bound near the denoiser's batch size cost little.)
INFLIGHT = 1


@pytest.fixture
def one_at_a_time(guarded_app):
    deploy_guarded(max_inflight_requests=INFLIGHT)
    yield guarded_app
    deploy_guarded()


def rss_mb(deployment: str) -> float:
    """Resident memory of the deployment's replica processes, from /proc."""
    total = 0.0
    for name in replica_actors(deployment):
        pid = ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda self: os.getpid()))
        with open(f"/proc/{pid}/status") as status:
            total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
    return total


async def _send(client, headers, results, label):
    started = time.perf_counter()
    response = await client.post("/v1/text2img", json=BODY, headers=headers)
    results.append((label, response.status_code, time.perf_counter() - started, response.headers.get("Retry-After")))


async def _open_loop(url, headers, rate, duration_s, results):
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=None)) as client:
        tasks, start = [], time.perf_counter()
        for i in range(int(rate * duration_s)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival schedule
            tasks.append(asyncio.create_task(_send(client, headers, results, "load")))
        await asyncio.gather(*tasks)


def test_three_times_capacity_is_shed_fast_and_admitted_latency_holds(one_at_a_time):
    url, keys = one_at_a_time
    headers = {"Authorization": f"Bearer {keys['load']}"}
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post("/v1/text2img", json=BODY, headers=headers)  # warm
        unloaded = []
        for _ in range(16):
            started = time.perf_counter()
            assert client.post("/v1/text2img", json=BODY, headers=headers).status_code == 200
            unloaded.append(time.perf_counter() - started)
    baseline_p99 = percentile(unloaded, 0.99)
    capacity = INFLIGHT / (sum(unloaded) / len(unloaded))  # req/s the admitted requests can sustain
    memory = []
    for _round in range(2):
        results: list = []
        asyncio.run(_open_loop(url, headers, rate=3 * capacity, duration_s=6.0, results=results))
        memory.append((rss_mb("Ingress"), rss_mb("Denoiser")))
        ok = [latency for _, status, latency, _ in results if status == 200]
        shed = [(latency, retry) for _, status, latency, retry in results if status == 503]
        print(f"\noverload round {_round}: offered {3 * capacity:.1f} req/s for 6 s: {len(results)} sent, "
              f"{len(ok)} admitted (p90 {percentile(ok, 0.9):.3f} s, p99 {percentile(ok, 0.99):.3f} s vs unloaded p99 {baseline_p99:.3f} s), "
              f"{len(shed)} shed (p50 {percentile([l for l, _ in shed], 0.5) or 0:.3f} s, "
              f"p99 {percentile([l for l, _ in shed], 0.99) or 0:.3f} s); "
              f"RSS ingress {memory[-1][0]:.0f} MB, denoiser {memory[-1][1]:.0f} MB")
        assert {status for _, status, _, _ in results} <= {200, 503}
        assert shed, "3x capacity should have been shed in part"
        assert all(retry is not None and int(retry) >= 1 for _, retry in shed)
        # Refused at once: the server does no work for them; client-side times include the proxy
        # hop, so the tail is bounded loosely for a loaded 2-core CI box.
        assert percentile([latency for latency, _ in shed], 0.5) < 0.1
        assert percentile([latency for latency, _ in shed], 0.99) < 1.0
        # Admitted requests do not queue behind the excess. Were they queued, a 6 s round at 3x
        # capacity builds a backlog of ~12 s of work, so admitted latency would climb to 10-50x
        # the unloaded p99. What admission control cannot remove is CPU contention: the proxy and
        # ingress answer the ~15 req/s shed on the same 2 cores, which slows the one admitted
        # request (CI saw p90 at 2.15x). So the median stays near unloaded and the tail below 4x:
        # both far under what queueing gives, neither decided by one scheduling hiccup.
        assert percentile(ok, 0.5) <= 2 * baseline_p99
        assert percentile(ok, 0.9) <= 4 * baseline_p99
    # Nothing queues without bound: the second round does not grow memory further.
    assert memory[1][0] - memory[0][0] < 64 and memory[1][1] - memory[0][1] < 64
