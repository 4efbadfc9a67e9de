"""Every ``kandinsky-serve bench`` subcommand and ``loadtest``, run as a user runs them.

Smallest settings that still take the real path: the CLI exits 0 and writes JSON
whose documented keys hold finite numbers, with provenance. To stay within the
session's one Ray instance where the command allows it, ``bench latency`` measures
the session's running service (``--url``) and ``bench batching`` deploys its
replicas on the session's cluster (``RAY_ADDRESS``), and ``bench compare`` measures the
session's graph (``--url``) and deploys its monolith beside it.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROVENANCE_KEYS = ("date", "commit", "command", "versions", "cpu_model", "cpus", "torch_threads")


def _free_port_pair() -> int:
    """A port p with p and p + 1 both free (bench compare uses both)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture(scope="module")
def tiny_config(tiny_checkpoint, tmp_path_factory) -> Path:
    """configs/local.yaml on the session's tiny checkpoint, without the decoder variants no
    benchmark calls (two fewer replicas to start on 2 cores)."""
    raw = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    raw["http_options"]["port"] = _free_port_pair()
    app = raw["applications"][0]
    app["args"]["models"].update(prior_path=str(tiny_checkpoint.prior), decoder_path=str(tiny_checkpoint.decoder))
    app["deployments"] = [d for d in app["deployments"] if d["name"] not in ("InpaintDenoiser", "ControlnetDenoiser")]
    path = tmp_path_factory.mktemp("bench") / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(args: list[str], cwd: Path, timeout_s: float = 240, ray_address: str = "local") -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "serve.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _finite(document: dict, dotted: str) -> float:
    value = document
    for key in dotted.split("."):
        assert isinstance(value, dict) and key in value, f"missing key {dotted!r} in {sorted(document)}"
        value = value[key]
    assert isinstance(value, (int, float)) and math.isfinite(value), f"{dotted} = {value!r} is not a finite number"
    return float(value)


def _check_provenance(document: dict) -> None:
    provenance = document["provenance"]
    for key in PROVENANCE_KEYS:
        assert provenance.get(key) not in (None, ""), f"provenance.{key} missing: {provenance}"
    assert provenance["versions"]["torch"] and provenance["versions"]["ray"]


def test_bench_latency_runs_and_writes_its_json(served_app, tiny_config, tmp_path):
    url, _ = served_app
    out = tmp_path / "latency.json"
    done = _run(["bench", "latency", "--config", str(tiny_config), "--steps", "2", "--prior-steps", "2",
                 "--rounds", "1", "--breakdown", "--url", url, "--out", str(out)], tmp_path)
    assert "served / in-process" in done.stdout and "where a served request's time goes" in done.stdout
    result = json.loads(out.read_text())
    for key in ("ratio_p50", "results.served.p50_ms", "results.in_process.p50_ms", "results.served.p90_ms",
                "breakdown.client_ms", "breakdown.ingress_total_ms", "breakdown.compute_ms"):
        assert _finite(result, key) > 0
    assert result["service"] == url
    assert set(result["breakdown"]["stages"]) == {"text_encoder", "prior", "denoiser", "movq"}
    for stage in result["breakdown"]["stages"]:
        assert _finite(result, f"breakdown.stages.{stage}.call_ms") >= _finite(result, f"breakdown.stages.{stage}.compute_ms")
    _check_provenance(result)


def test_bench_batching_runs_and_writes_its_json(served_app, tiny_config, tmp_path):
    import ray
    from ray import serve

    out = tmp_path / "batching.json"
    _run(["bench", "batching", "--config", str(tiny_config), "--steps", "2", "--max-batch", "2",
          "--duration", "0.5", "--capacity-duration", "0.5", "--out", str(out)], tmp_path,
         ray_address=ray.get_runtime_context().gcs_address)
    assert not [name for name in serve.status().applications if name.startswith("bench-")], "the bench left its apps"
    result = json.loads(out.read_text())
    for key in ("capacity_rps", "p99_step_over_request_at_70", "throughput_step_over_request_at_100",
                "p99_step_over_request_when_idle_at_70", "throughput_step_over_request_when_idle_at_100"):
        assert _finite(result, key) > 0
    for mode in ("request", "request-when-idle", "step"):
        assert len(result["modes"][mode]["points"]) == 3, mode
    _check_provenance(result)


def test_bench_compare_runs_and_writes_its_json(served_app, tiny_config, tmp_path):
    """On the session's graph (--url), with the monolith deployed beside it and removed after;
    the bench's own start of Ray and the graph is what ``make bench`` runs (no --url)."""
    import ray
    from ray import serve

    url, _ = served_app
    out = tmp_path / "compare.json"
    port = _free_port_pair()
    _run(["bench", "compare", "--config", str(tiny_config), "--steps", "2", "--prior-steps", "2",
          "--duration", "1", "--rates", "2", "--slo", "30", "--port", str(port), "--url", url, "--out", str(out)],
         tmp_path, ray_address=ray.get_runtime_context().gcs_address)
    assert "bench-monolith" not in serve.status().applications, "the bench left its monolith"
    assert serve.status().applications, "the session's own applications are still there"
    result = json.loads(out.read_text())
    assert result["graph_service"] == url
    for system in ("in-process", "monolith", "graph"):
        assert _finite(result, f"systems.{system}.max_sustainable_rps") > 0, system
        assert _finite(result, f"systems.{system}.at_load.p99_s") > 0, system
    assert _finite(result, "throughput_graph_over_monolith") > 0
    _check_provenance(result)


def test_loadtest_runs_and_writes_its_summary(served_app, tmp_path):
    url, _ = served_app
    out = tmp_path / "report"
    # The example scenario as shipped, at 2 + 2 steps: the smoke checks the plumbing, not the model.
    scenario = yaml.safe_load((ROOT / "serve" / "tools" / "scenarios" / "example.yaml").read_text())
    for item in scenario["mix"]:
        item["body"].update(steps=2, prior_steps=2)
    (tmp_path / "scenario.yaml").write_text(yaml.safe_dump(scenario))
    _run(["loadtest", str(tmp_path / "scenario.yaml"), "--target", url, "--rate", "2",
          "--duration", "1", "--timeout", "60", "--out", str(out), "--no-progress"], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lost"] == 0
    (step,) = summary["steps"]
    assert step["sent"] >= 1 and step["succeeded"] == step["sent"], step
    assert math.isfinite(step["p99_s"]) and step["p99_s"] > 0
    _check_provenance(summary)


def test_bench_hostile_runs_and_writes_its_json(guarded_app, tmp_path):
    url, keys = guarded_app
    out = tmp_path / "hostile.json"
    done = _run(["bench", "hostile", "--url", url, "--victim-key", keys["normal"], "--attacker-key", keys["load"],
                 "--duration", "1", "--scale", "1", "--timeout", "30", "--settle", "1", "--out", str(out)], tmp_path)
    assert "one key attacking" in done.stdout
    result = json.loads(out.read_text())
    assert [phase["attack"] for phase in result["phases"]] == ["none", "slow_bodies", "streams", "store_flood", "decode_bombs"]
    for index, phase in enumerate(result["phases"]):
        assert _finite(result["phases"][index], "victim.p99_s") > 0, phase
        assert phase["victim"]["lost"] == 0, f"{phase['attack']}: a victim request got no answer at all"
        assert phase["victim"]["ingress_rss_after_mb"] > 0, "the Ingress runs on this machine: its memory is read"
        assert math.isfinite(phase["victim"]["ingress_rss_over_baseline_mb"])
    _check_provenance(result)


def test_bench_models_runs_and_writes_its_json(served_app, tmp_path):
    url, _ = served_app
    out = tmp_path / "models.json"
    done = _run(["bench", "models", "--url", url, "--rounds", "1", "--rate", "2", "--duration", "2", "--out", str(out)],
                tmp_path)
    assert "Prior switch" in done.stdout and "Mixed load" in done.stdout
    result = json.loads(out.read_text())
    for key in ("prior_switch.hot_p50_s", "prior_switch.cold_p50_s", "prior_switch.cold_over_hot"):
        assert _finite(result, key) > 0
    assert result["mixed_load"]["lost"] == 0
    assert {"kandinsky-2-1", "kandinsky-2-2"} <= set(result["mixed_load"]["per_model"])
    _check_provenance(result)


def test_bench_sweep_runs_and_writes_its_json(served_app, tmp_path):
    url, _ = served_app
    out = tmp_path / "sweep.json"
    done = _run(["bench", "sweep", "--url", url, "--steps", "2", "--prior-steps", "2", "--rounds", "1", "--out", str(out)],
                tmp_path)
    assert "sweep / one at a time" in done.stdout
    result = json.loads(out.read_text())
    for key in ("sweep_s", "sequential_s", "throughput_ratio", "sweep_images_per_s"):
        assert _finite(result, key) > 0
    assert result["cells"] == 16 and result["max_pixel_diff"] >= 0
    _check_provenance(result)


def test_bench_understanding_runs_and_writes_its_json(served_app, tmp_path):
    url, _ = served_app
    out = tmp_path / "understanding.json"
    done = _run(["bench", "understanding", "--url", url, "--images", "3", "--rounds", "1", "--steps", "2",
                 "--prior-steps", "2", "--out", str(out)], tmp_path)
    assert "batched / one at a time" in done.stdout and "`caption_check`" in done.stdout
    result = json.loads(out.read_text())
    for key in ("captioning.throughput_ratio", "captioning.batched.images_per_s", "captioning.sequential.wall_s",
                "caption_check.plain_p50_ms", "caption_check.checked_p50_ms", "caption_check.ratio",
                "caption_check.stage_p50_ms.caption_check", "caption_check.stage_p50_ms.caption_check_embed"):
        assert _finite(result, key) > 0
    assert math.isfinite(result["caption_check"]["added_ms"])
    check = result["caption_check"]
    assert check["images_identical"], "caption_check changed the image"
    assert len(check["checks"]) == 1 and isinstance(check["checks"][0]["caption"], str)
    captioning = result["captioning"]
    assert captioning["sequential"]["calls"] == 3 and captioning["sequential"]["mean_batch_size"] == 1.0
    assert captioning["batched"]["calls"] == 3, "every call of the batched side is seen in the stage's batches"
    assert captioning["captions_identical"], captioning["mismatched_images"]
    _check_provenance(result)


def test_bench_gpu_runs_and_writes_its_json(served_app, tiny_checkpoint, tmp_path):
    """The CPU smoke of the GPU benchmark: the session's service (--url) on the tiny checkpoint,
    the load part's two Denoiser replicas on the session's cluster, removed after."""
    import ray
    from ray import serve

    url, _ = served_app
    out = tmp_path / "gpu.json"
    done = _run(["bench", "gpu", "--url", url, "--checkpoint", str(tiny_checkpoint.prior.parent), "--device", "cpu",
                 "--sizes", "64", "--steps", "2", "--prior-steps", "2", "--rounds", "1", "--batches", "1,2",
                 "--load-duration", "1", "--capacity-duration", "0.5", "--out", str(out)], tmp_path,
                ray_address=ray.get_runtime_context().gcs_address)
    assert "served / diffusers latency" in done.stdout and "p99 step / request" in done.stdout
    assert not [name for name in serve.status().applications if name.startswith("bench-gpu")], "the bench left its apps"
    result = json.loads(out.read_text())
    for key in ("diffusers.64.latency.p50_s", "diffusers.64.sequential_images_per_s",
                "served.as-configured.sizes.64.latency.p50_s", "served.as-configured.sizes.64.images_per_s.2",
                "ratios.as-configured.64.latency_served_over_diffusers", "load.capacity_rps",
                "load.modes.step.p99_s", "load.modes.request.p99_s", "ratios.p99_step_over_request_at_70"):
        assert _finite(result, key) > 0
    assert result["service"] == url and result["dtype"] == "float32"
    _check_provenance(result)
