"""``kandinsky-serve bench hostile``: what one attacking key does to everyone else.

A *victim* key runs a steady mix (synchronous text-to-image, a job submitted and polled to
its end, ``/healthz``) first alone, then while an *attacker* key attacks in one way at a
time: slow bodies, event streams, a job-store flood, decode bombs. Per phase the table has
the victim's success rate, p50/p99 latency, p99 against the no-attack baseline, the slowest
``/healthz``, and how many of the victim's requests were *lost* (no answer at all: a timeout
or a dropped connection — every refusal must be an explicit status).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from serve.tools.loadtest import percentile
from serve.tools.provenance import write_result

ATTACKS = ("slow_bodies", "streams", "store_flood", "decode_bombs")
RSS_MARGIN_MB = 300
SETTLED_MB = 50
TINY = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "prior_steps": 2}


INGRESS_PROCESS = re.compile(r"ServeReplica:[^ :]+:Ingress\b")
"""How Ray titles an Ingress replica's process (``ray::ServeReplica:<app>:Ingress``)."""


def ingress_rss_mb() -> float | None:
    """The private resident memory of the Ingress replicas on this machine, in MB, all
    applications' together (None when the service runs elsewhere, or off Linux: read from
    ``/proc``). Private: the pages of Ray's shared object store that the process has touched
    (its ``RssShmem``, bounded by the store's own size and reused) are the store's, not its own."""
    total_kb, found = 0, False
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if not INGRESS_PROCESS.search((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")):
                continue
            status = (proc / "status").read_text()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for line in status.splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                total_kb += int(line.split()[1])
                found = True
    return total_kb / 1024 if found else None


@dataclass
class VictimLog:
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    lost: int = 0
    health_s: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        sent = len(self.statuses) + self.lost
        ok = sum(1 for status in self.statuses if status < 400)
        return {
            "sent": sent, "succeeded": ok, "lost": self.lost,
            "success_rate": ok / sent if sent else math.nan,
            "refused": {str(s): self.statuses.count(s) for s in sorted(set(self.statuses)) if s >= 400},
            "p50_s": percentile(self.latencies, 0.5) if self.latencies else math.nan,
            "p99_s": percentile(self.latencies, 0.99) if self.latencies else math.nan,
            "healthz_max_s": max(self.health_s) if self.health_s else math.nan,
            "ingress_rss_peak_mb": max(self.rss_mb) if self.rss_mb else None,
        }


async def _victim(client, headers: dict, stop: asyncio.Event, log: VictimLog, timeout_s: float) -> None:
    """One synchronous generation, then one job to its end, in turn, until ``stop``."""
    import httpx

    async def timed(call) -> None:
        started = time.perf_counter()
        try:
            response = await asyncio.wait_for(call(), timeout_s)
        except (asyncio.TimeoutError, httpx.TransportError):
            log.lost += 1
            return
        log.statuses.append(response.status_code)
        if response.status_code < 400:
            log.latencies.append(time.perf_counter() - started)

    async def job() -> "httpx.Response":
        submitted = await client.post("/v1/jobs", json={"mode": "text2img", "params": TINY}, headers=headers)
        if submitted.status_code != 202:
            return submitted
        while True:
            view = await client.get(f"/v1/jobs/{submitted.json()['id']}", headers=headers)
            if view.status_code != 200 or view.json()["state"] in ("succeeded", "failed", "cancelled"):
                return view
            await asyncio.sleep(0.05)  # polling interval

    while not stop.is_set():
        await timed(lambda: client.post("/v1/text2img", json=TINY, headers=headers))
        await timed(job)


async def _health(client, stop: asyncio.Event, log: VictimLog) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            await asyncio.wait_for(client.get("/healthz"), 10.0)
            log.health_s.append(time.perf_counter() - started)
        except Exception:
            log.health_s.append(10.0)
        rss = ingress_rss_mb()
        if rss is not None:
            log.rss_mb.append(rss)
        await asyncio.sleep(0.25)  # probe interval


# ---------------------------------------------------------------- attacks


async def _slow_bodies(url: str, key: str, stop: asyncio.Event, count: int, tally: dict) -> None:
    """``count`` connections announcing 100 kB, sending a byte every 2 s; reopened when answered."""
    parts = urllib.parse.urlsplit(url)
    path = (parts.path.rstrip("/") or "") + "/v1/text2img"

    async def one() -> None:
        while not stop.is_set():
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            writer.write((f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\nAuthorization: Bearer {key}\r\n"
                          "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{").encode())
            try:
                while not stop.is_set():
                    await writer.drain()
                    try:
                        line = await asyncio.wait_for(reader.readline(), 2.0)
                    except asyncio.TimeoutError:
                        writer.write(b" ")
                        continue
                    status = line.split(b" ")[1].decode() if line.count(b" ") >= 2 else "closed"
                    tally[status] = tally.get(status, 0) + 1
                    break
            except (ConnectionError, OSError):
                tally["reset"] = tally.get("reset", 0) + 1
            finally:
                writer.close()

    await asyncio.gather(*(one() for _ in range(count)))


async def _streams(client, headers: dict, stop: asyncio.Event, count: int, tally: dict) -> None:
    """A long job, and ``count`` event streams on it held open."""
    submitted = await client.post("/v1/jobs", json={"mode": "text2img", "params": {**TINY, "steps": 150}}, headers=headers)
    if submitted.status_code != 202:
        tally[str(submitted.status_code)] = tally.get(str(submitted.status_code), 0) + 1
        return
    url = f"/v1/jobs/{submitted.json()['id']}/events"

    async def one() -> None:
        try:
            async with client.stream("GET", url, headers=headers) as response:
                tally[str(response.status_code)] = tally.get(str(response.status_code), 0) + 1
                if response.status_code == 200:
                    async for _ in response.aiter_lines():
                        if stop.is_set():
                            break
        except Exception as error:
            tally[type(error).__name__] = tally.get(type(error).__name__, 0) + 1

    await asyncio.gather(*(one() for _ in range(count)))
    await client.delete(url.rsplit("/", 1)[0], headers=headers)


async def _store_flood(client, headers: dict, stop: asyncio.Event, tally: dict) -> None:
    """Tiny jobs as fast as the service answers."""
    body = {"mode": "text2img", "params": {**TINY, "steps": 1}}
    while not stop.is_set():
        response = await client.post("/v1/jobs", json=body, headers=headers)
        tally[str(response.status_code)] = tally.get(str(response.status_code), 0) + 1
        if response.status_code == 429:
            await asyncio.sleep(0.01)


def _bomb_png(side: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def _decode_bombs(client, headers: dict, stop: asyncio.Event, side: int, concurrency: int, tally: dict) -> None:
    """``/v1/embeddings`` with black ``side``² PNGs (small on the wire, large decoded), in turn
    two of them (what the default limits decode: ``max_request_pixels`` is 2 x 2048² at
    ``max_side`` 1024) and sixteen (past the budget: refused from the headers)."""
    image = _bomb_png(side)
    bodies = [json.dumps({"images": [image] * count}).encode() for count in (2, 16)]
    headers = {**headers, "Content-Type": "application/json"}

    async def one() -> None:
        sent = 0
        while not stop.is_set():
            response = await client.post("/v1/embeddings", content=bodies[sent % 2], headers=headers)
            sent += 1
            tally[str(response.status_code)] = tally.get(str(response.status_code), 0) + 1

    await asyncio.gather(*(one() for _ in range(concurrency)))


# ---------------------------------------------------------------- the bench


async def _attack(url: str, attacker_key: str, attack: str, seconds: float, scale: int, timeout_s: float) -> dict:
    """One attack for ``seconds``; what the attacker got back, by status."""
    import httpx

    attacker = {"Authorization": f"Bearer {attacker_key}"}
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    stop, tally = asyncio.Event(), {}
    asyncio.get_running_loop().call_later(seconds, stop.set)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as hostile:
        attacks = {
            "slow_bodies": lambda: _slow_bodies(url, attacker_key, stop, 8 * scale, tally),
            "streams": lambda: _streams(hostile, attacker, stop, 32 * scale, tally),
            "store_flood": lambda: _store_flood(hostile, attacker, stop, tally),
            "decode_bombs": lambda: _decode_bombs(hostile, attacker, stop, 2048, scale, tally),
        }
        try:
            await asyncio.wait_for(attacks[attack](), seconds + timeout_s)
        except (asyncio.TimeoutError, Exception) as error:
            tally[f"attack_ended_{type(error).__name__}"] = 1
    return tally


def _attack_process(*args) -> dict:
    return asyncio.run(_attack(*args))


async def _phase(pool, url: str, victim_key: str, attacker_key: str, attack: str | None, duration_s: float,
                 scale: int, timeout_s: float, settle_s: float) -> dict:
    """The victim's mix for ``duration_s``, while ``attack`` runs in ``pool``'s process (as an
    attacker would: its request building must not slow the victim's client)."""
    import httpx

    victim = {"Authorization": f"Bearer {victim_key}"}
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    stop = asyncio.Event()
    log = VictimLog()
    start_rss = ingress_rss_mb()
    lead_s = min(2.0, duration_s / 4)  # the attack takes hold first
    attacking = None
    if attack is not None:
        attacking = asyncio.get_running_loop().run_in_executor(
            pool, _attack_process, url, attacker_key, attack, lead_s + duration_s, scale, timeout_s)
        await asyncio.sleep(lead_s)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        tasks = [asyncio.ensure_future(_victim(client, victim, stop, log, timeout_s)),
                 asyncio.ensure_future(_health(client, stop, log))]
        await asyncio.sleep(duration_s)
        stop.set()
        await asyncio.gather(*tasks)
    tally = await attacking if attacking is not None else {}
    summary = log.summary()
    summary["ingress_rss_after_mb"] = await _settled_rss(start_rss, settle_s)
    return {"attack": attack or "none", "victim": summary, "attacker": tally}


async def _settled_rss(start_mb: float | None, settle_s: float = 10.0) -> float | None:
    """The Ingress's memory once the phase is over: freed memory goes back to the system over
    a few seconds, so readings are taken until one is within :data:`SETTLED_MB` of the phase's
    start (or ``settle_s`` passed); the lowest is kept."""
    readings = [ingress_rss_mb()]
    if readings[0] is None or start_mb is None:
        return readings[0]
    deadline = time.monotonic() + settle_s
    while readings[-1] > start_mb + SETTLED_MB and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # sampling interval
        readings.append(ingress_rss_mb() or readings[-1])
    return min(readings)


def bench_hostile(url: str, victim_key: str, attacker_key: str, duration: float, scale: int, out: Path,
                  attacks: str | None = None, timeout: float = 60.0, settle: float = 10.0) -> dict:
    """Run the phases against the service at ``url`` (API keys on); write the JSON; print the table."""
    chosen = tuple(a.strip() for a in attacks.split(",")) if attacks else ATTACKS
    unknown = [a for a in chosen if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # The attacker's process is started once (started during the warm-up phase, which is not
    # reported: the first requests after a start pay for lazy set-up).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(int).result()
        asyncio.run(_phase(pool, url, victim_key, attacker_key, None, min(duration, 5.0), scale, timeout, settle))
        phases = [asyncio.run(_phase(pool, url, victim_key, attacker_key, attack, duration, scale, timeout, settle))
                  for attack in (None, *chosen)]
    baseline = phases[0]["victim"]["p99_s"]
    rss_baseline = phases[0]["victim"]["ingress_rss_after_mb"]
    for phase in phases:
        victim = phase["victim"]
        victim["p99_over_baseline"] = victim["p99_s"] / baseline if baseline else math.nan
        after = victim["ingress_rss_after_mb"]
        victim["ingress_rss_over_baseline_mb"] = after - rss_baseline if None not in (after, rss_baseline) else None
    result = {"benchmark": "hostile", "url": url, "duration_s": duration, "scale": scale, "phases": phases,
              "targets": {"p99_over_baseline_max": 2.0, "healthz_max_s": 1.0, "lost": 0,
                          "ingress_rss_over_baseline_mb_max": RSS_MARGIN_MB}}
    result["met"] = all(
        p["victim"]["lost"] == 0 and p["victim"]["success_rate"] == 1.0 and p["victim"]["p99_over_baseline"] <= 2.0
        and p["victim"]["healthz_max_s"] < 1.0
        and (p["victim"]["ingress_rss_over_baseline_mb"] or 0.0) <= RSS_MARGIN_MB for p in phases
    )
    print(f"\none key attacking, another working; {duration:g} s per phase, scale {scale}")
    print(f"{'attack':<14}{'sent':>6}{'ok %':>7}{'lost':>6}{'p50 s':>8}{'p99 s':>8}{'p99/base':>10}{'healthz max s':>15}"
          f"{'rss peak MB':>13}{'rss after +MB':>15}  attacker saw")

    def mb(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    for p in phases:
        v = p["victim"]
        print(f"{p['attack']:<14}{v['sent']:>6}{100 * v['success_rate']:>7.1f}{v['lost']:>6}{v['p50_s']:>8.2f}{v['p99_s']:>8.2f}"
              f"{v['p99_over_baseline']:>10.2f}{v['healthz_max_s']:>15.3f}{mb(v['ingress_rss_peak_mb']):>13}"
              f"{mb(v['ingress_rss_over_baseline_mb']):>15}  {json.dumps(p['attacker'])}")
    print(f"targets: every victim request answered and successful, p99 <= 2x baseline, /healthz < 1 s, Ingress memory "
          f"back within {RSS_MARGIN_MB} MB of its baseline (when it runs on this machine): "
          + ("met" if result["met"] else "MISSED"))
    write_result(result, out)
    return result
