"""The load-test harness against a small fake server on loopback (no Ray, no models)."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import threading
import time

import pytest
import yaml
from PIL import Image

from serve.tools.loadtest import (
    LoadTest,
    RequestMix,
    Scenario,
    arrival_times,
    load_scenario,
    server_deltas,
    write_report,
)
from serve.settings import ConfigError

SLOW_S = 1.0
PACED_S = 0.01  # a quick answer that still leaves the event loop idle between requests


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = next((int(l.split(":")[1]) for l in lines if l.lower().startswith("content-length:")), 0)
        body = json.loads(await reader.readexactly(length) or b"{}")
        kind = body.get("prompt", "ok")
        if kind == "drop":
            return  # close without answering
        if kind == "slow":
            await asyncio.sleep(SLOW_S)
        if kind == "paced":
            await asyncio.sleep(PACED_S)
        status = {"e500": 500, "e503": 503}.get(kind, 200)
        payload = json.dumps({"images": ["aGk="] * body.get("num_images", 1)} if status == 200 else {"error": kind}).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            f"Connection: close\r\n\r\n".encode() + payload
        )
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _with_server(make_scenario):
    server = await asyncio.start_server(_handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        scenario = make_scenario(f"http://127.0.0.1:{port}")
        return await LoadTest(scenario, progress=False).run()


def _mix(*kinds, **body):
    return [RequestMix(name=kind, body={"prompt": kind, **body}) for kind in kinds]


def test_constant_rate_is_achieved_within_5_percent():
    result = asyncio.run(_with_server(lambda url: Scenario(
        target=url, mix=_mix("ok"), arrival={"process": "constant", "rates": [40]}, duration_s=3, scrape_metrics=False,
    )))
    [step] = result.steps
    assert step.sent == 120 and step.succeeded == 120 and result.lost == 0
    assert step.achieved_rps == pytest.approx(40, rel=0.05)


def test_poisson_interarrival_mean_within_10_percent():
    times = arrival_times("poisson", 20.0, 500.0, None, random.Random(1))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.fmean(gaps) == pytest.approx(1 / 20, rel=0.10)
    assert statistics.stdev(gaps) == pytest.approx(1 / 20, rel=0.10)  # exponential: sd == mean


def test_a_slow_server_does_not_slow_the_sender():
    result = asyncio.run(_with_server(lambda url: Scenario(
        target=url, mix=_mix("slow"), arrival={"process": "poisson", "rates": [25]}, duration_s=2, timeout_s=5,
        scrape_metrics=False,
    )))
    lags = sorted(r.sent_s - r.scheduled_s for r in result.records)
    # A sender that waited for answers would be a whole SLOW_S behind by its second send; the
    # margin below that absorbs a busy machine's scheduling jitter (0.065 s seen on 2 cores).
    assert lags[-1] < SLOW_S / 4, "sends drifted behind their schedule"
    assert all(r.latency_s >= SLOW_S for r in result.records)  # measured from the scheduled time


def test_every_request_is_accounted_for_through_faults():
    kinds = ("ok", "slow", "e500", "e503", "drop")
    result = asyncio.run(_with_server(lambda url: Scenario(
        target=url, mix=_mix(*kinds), arrival={"process": "poisson", "rates": [40]}, duration_s=2, timeout_s=0.6,
        scrape_metrics=False, seed=3,
    )))
    expected = {"ok": "success", "slow": "timeout", "e500": "http_500", "e503": "http_503", "drop": "connection_error"}
    [step] = result.steps
    assert result.lost == 0 and len(result.records) == step.sent
    assert len({r.id for r in result.records}) == step.sent, "one outcome per request id"
    for record in result.records:
        assert record.outcome == expected[record.mix], record
    assert set(step.failed) == {"timeout", "http_500", "http_503", "connection_error"}
    assert step.succeeded + sum(step.failed.values()) == step.sent


def test_closed_loop_keeps_n_clients_busy_and_stops_at_the_count():
    result = asyncio.run(_with_server(lambda url: Scenario(
        target=url, mix=_mix("ok"), arrival={"process": "closed", "concurrency": [1, 4]}, duration_s=10,
        max_requests=20, scrape_metrics=False,
    )))
    assert [s.sent for s in result.steps] == [20, 20] and result.lost == 0


def test_closed_loop_clients_ramp_up_evenly():
    result = asyncio.run(_with_server(lambda url: Scenario(
        target=url, mix=_mix("slow"), arrival={"process": "closed", "concurrency": [4], "ramp_s": 1.0},
        duration_s=0.9, timeout_s=5, scrape_metrics=False,
    )))
    starts = sorted(r.sent_s for r in result.records)
    assert len(starts) == 4 and result.lost == 0  # each client sent once: requests take SLOW_S
    assert all(later - earlier >= 0.2 for earlier, later in zip(starts, starts[1:])), starts


def test_closed_loop_runs_its_whole_duration_past_the_drain_backstop(monkeypatch):
    """The backstop counts from the end of sending, not from the start of the step."""
    # Counted from the step's start, the backstop would end it at timeout + grace = 1.2 s, before
    # the 1.5 s of sending. Paced answers keep the loop from spinning (an unpaced closed loop sent
    # ~1300 requests here and once timed out on a loaded CI machine).
    monkeypatch.setattr(LoadTest, "DRAIN_GRACE_S", 0.2)
    result = asyncio.run(_with_server(lambda url: Scenario(
        target=url, mix=_mix("paced"), arrival={"process": "closed", "concurrency": [2]}, duration_s=1.5, timeout_s=1.0,
        scrape_metrics=False,
    )))
    [step] = result.steps
    assert step.failed == {} and step.lost == 0
    assert max(r.sent_s for r in result.records) > 1.3, "the clients were cut off before the step's duration"


def test_reports_exist_and_parse(tmp_path):
    result = asyncio.run(_with_server(lambda url: Scenario(
        target=url, mix=_mix("ok", "e503", num_images=2), arrival={"process": "constant", "rates": [20, 40]}, duration_s=1,
        scrape_metrics=False,
    )))
    paths = write_report(result, tmp_path)
    records = [json.loads(line) for line in paths["records"].read_text().splitlines()]
    assert len(records) == sum(s.sent for s in result.steps)
    summary = json.loads(paths["summary_json"].read_text())
    assert summary["lost"] == 0 and len(summary["steps"]) == 2
    assert all(s["images_per_s"] == pytest.approx(2 * s["throughput_rps"]) for s in summary["steps"])
    assert "| offered req/s |" in paths["summary_md"].read_text()
    for name in ("latency_cdf", "latency_over_time", "load_curve"):
        with Image.open(paths[name]) as image:
            assert image.format == "PNG" and image.width > 100


def test_bad_scenario_fields_are_named(tmp_path):
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump({"durration_s": 5, "arrival": {"process": "poisson", "rates": [-1]}}))
    with pytest.raises(ConfigError) as error:
        load_scenario(path)
    assert "durration_s" in str(error.value) and "arrival" in str(error.value) and str(path) in str(error.value)


def test_flags_override_the_scenario(tmp_path):
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump({"target": "http://a:1", "arrival": {"process": "poisson", "rates": [1, 2]}}))
    scenario = load_scenario(path, target="http://127.0.0.1:9", rate=7.5, duration_s=3, max_requests=None)
    assert scenario.target == "http://127.0.0.1:9" and scenario.arrival.rates == [7.5] and scenario.duration_s == 3


def test_server_figures_from_two_scrapes():
    before = 'ray_kandinsky_serve_stage_requests_total{stage="prior",WorkerId="a"} 2.0\n'
    after = (
        'ray_kandinsky_serve_stage_requests_total{stage="prior",WorkerId="a"} 5.0\n'
        'ray_kandinsky_serve_denoise_steps_total{stage="prior"} 10.0\n'
        'ray_kandinsky_serve_step_images_total{stage="prior"} 30.0\n'
    )
    figures = server_deltas(before, after)["prior"]
    assert figures["requests"] == 3.0 and figures["mean_images_per_step"] == 3.0


def test_stop_ends_a_closed_loop_run_early_and_accounts_for_every_request():
    async def run(url):
        load = LoadTest(Scenario(
            target=url, mix=_mix("slow"), arrival={"process": "closed", "concurrency": [3]}, duration_s=600,
            timeout_s=5, scrape_metrics=False,
        ), progress=False)
        task = asyncio.create_task(load.run())
        deadline = time.monotonic() + 10 * SLOW_S
        while not load.records and time.monotonic() < deadline:  # until the first responses are in
            await asyncio.sleep(0.05)
        threading.Thread(target=load.stop).start()  # from another thread, as a test driver would
        return await asyncio.wait_for(task, timeout=10 * SLOW_S)

    async def with_server():
        server = await asyncio.start_server(_handle, "127.0.0.1", 0)
        async with server:
            return await run(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")

    result = asyncio.run(with_server())
    [step] = result.steps
    assert step.sent == step.succeeded == len(result.records) and result.lost == 0
    assert step.sent < 3 * 5, "the run went on after stop()"


def test_settling_compares_counters_only_not_gauges_that_come_and_go():
    """Ray re-exports a gauge only for a while after each set: a scrape with a model-load gauge
    and one without it are the same settled counters; a moved counter is not."""
    from serve.tools.loadtest import _counters

    counters = ('ray_kandinsky_serve_stage_requests_total{stage="Prior"} 3\n'
                'ray_kandinsky_serve_stage_batch_compute_seconds_count{stage="Prior"} 2\n')
    with_gauge = counters + 'ray_kandinsky_serve_model_load_seconds{stage="Prior"} 0.5\n'
    assert _counters(with_gauge) == _counters(counters) == {
        ("stage_requests_total", "Prior"): 3.0, ("stage_batch_compute_seconds_count", "Prior"): 2.0}
    assert _counters(counters.replace("} 3", "} 4")) != _counters(counters)
