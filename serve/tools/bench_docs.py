"""The benchmark tables of docs/benchmarks.md, generated from committed results.

Each table sits between ``<!-- bench:KIND -->`` and ``<!-- /bench:KIND -->`` and is drawn from
``docs/bench/KIND.json``, the file ``kandinsky-serve bench KIND --out docs/bench/KIND.json``
writes (with its provenance: date, commit, machine, versions, command line)::

    .venv/bin/python -m serve.tools.bench_docs            # rewrite the tables
    .venv/bin/python -m serve.tools.bench_docs --check    # exit 1 if a table is stale
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "docs" / "bench"
SECTION = re.compile(r"(<!-- bench:(\w+) -->\n)(.*?)(<!-- /bench:\2 -->)", re.S)


def provenance_line(result: dict) -> str:
    p = result.get("provenance", {})
    commit = (p.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if p.get("dirty") else "")
    versions = ", ".join(f"{name} {version}" for name, version in p.get("versions", {}).items() if version)
    command = " ".join(["kandinsky-serve", *p.get("command", [])[1:]])
    return (f"*Measured {str(p.get('date', '?'))[:10]} on {p.get('cpu_model') or '?'} ({p.get('cpus', '?')} CPUs"
            f"{', GPU ' + p['gpu'] if p.get('gpu') else ''}), commit {commit}; {versions}. Command: `{command}`.*")


def render_latency(result: dict) -> str:
    rows = result["results"]
    lines = [
        f"Single request, {result['size']}×{result['size']}, prior {result['prior_steps']} + decoder "
        f"{result['steps']} steps, {result['rounds']} rounds, {result['torch_threads']} intra-op thread(s):",
        "",
        "| | p50 ms | p90 ms | min ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, label in (("in_process", "diffusers in-process"), ("served", "served over HTTP")):
        row = rows[name]
        lines.append(f"| {label} | {row['p50_ms']:.1f} | {row['p90_ms']:.1f} | {row['min_ms']:.1f} |")
    lines += ["", f"**served / in-process (p50): {result['ratio_p50']:.2f}** (target ≤ {result['target_ratio']})."]
    breakdown = result.get("breakdown")
    if breakdown:
        lines += ["", "Where a served request's time goes (p50 of each hop, `--breakdown`):", "",
                  "| hop | ms | of which queue | compute | transport |", "| --- | ---: | ---: | ---: | ---: |",
                  f"| client, end to end | {breakdown['client_ms']:.1f} | | | |",
                  f"| HTTP proxy and response | {breakdown['proxy_and_http_ms']:.1f} | | | |",
                  f"| ingress, in total | {breakdown['ingress_total_ms']:.1f} | | | |"]
        for stage, row in breakdown["stages"].items():
            lines.append(f"| `{stage}` call | {row['call_ms']:.1f} | {row['queue_ms']:.1f} | {row['compute_ms']:.1f} "
                         f"| {row['transport_ms']:.1f} |")
        lines += [f"| ingress's own work | {breakdown['ingress_own_ms']:.1f} | | | |",
                  f"| stage compute, summed | {breakdown['compute_ms']:.1f} | | | |"]
    return "\n".join(lines + ["", provenance_line(result)])


def render_batching(result: dict) -> str:
    lines = [
        f"One Denoiser replica, {result['size']}×{result['size']}, {result['steps']} steps, max batch "
        f"{result['max_batch']}, open-loop Poisson arrivals, {result['duration_s']:g} s per point; capacity "
        f"{result['capacity_rps']:.2f} req/s:",
        "",
        "| policy | load | offered/s | achieved/s | p50 s | p90 s | p99 s | images per step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, measured in result["modes"].items():
        for p in measured["points"]:
            lines.append(f"| {mode} | {p['load']:.0%} | {p['offered_rps']:.2f} | {p['throughput_rps']:.2f} | "
                         f"{p['p50_s']:.2f} | {p['p90_s']:.2f} | {p['p99_s']:.2f} | {p['mean_batch_per_step']:.2f} |")
    lines += [
        "",
        f"Step batching against `@serve.batch` request batching: p99 at 70 % load "
        f"**{result['p99_step_over_request_at_70']:.2f}×**, throughput at 100 % "
        f"**{result['throughput_step_over_request_at_100']:.2f}×**. Against request-when-idle: p99 at 70 % "
        f"**{result['p99_step_over_request_when_idle_at_70']:.2f}×**, throughput at 100 % "
        f"**{result['throughput_step_over_request_when_idle_at_100']:.2f}×**.",
    ]
    return "\n".join(lines + ["", provenance_line(result)])


def render_hostile(result: dict) -> str:
    def mb(value) -> str:
        return "–" if value is None else f"{value:+.0f}"

    lines = [
        f"One key attacking while another works, {result['duration_s']:g} s per phase, scale {result['scale']}:",
        "",
        "| attack | victim requests | ok | lost | p50 s | p99 s | p99 / no attack | slowest /healthz s "
        "| Ingress MB after, vs. before | attacker got |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for phase in result["phases"]:
        v = phase["victim"]
        got = ", ".join(f"{count} × {status}" for status, count in sorted(phase["attacker"].items())) or "–"
        lines.append(f"| {phase['attack']} | {v['sent']} | {v['success_rate']:.0%} | {v['lost']} | {v['p50_s']:.2f} | "
                     f"{v['p99_s']:.2f} | {v['p99_over_baseline']:.2f} | {v['healthz_max_s']:.3f} | "
                     f"{mb(v.get('ingress_rss_over_baseline_mb'))} | {got} |")
    targets = result["targets"]
    lines += ["", f"Targets: nothing lost, every victim request successful, p99 ≤ {targets['p99_over_baseline_max']:g}× "
              f"the no-attack phase, `/healthz` < {targets['healthz_max_s']:g} s, the Ingress's memory back within "
              f"{targets.get('ingress_rss_over_baseline_mb_max', 300)} MB: **{'met' if result['met'] else 'missed'}**."]
    return "\n".join(lines + ["", provenance_line(result)])


def models_tables(result: dict) -> list[str]:
    """The prior-switch and mixed-load tables of ``bench models`` (also what it prints)."""
    switch, mixed = result["prior_switch"], result["mixed_load"]
    lines = [
        f"Prior switch: one request at a time ({result['request']['prior_steps']} prior + {result['request']['steps']} "
        f"decoder steps, {result['request']['width']}²), {len(switch['hot_s'])} per phase; a replica keeps "
        f"{result.get('kept_per_replica', '?')} of {len(result['fine_tuned_priors'])} fine-tuned priors:",
        "",
        "| fine-tuned prior | p50 s | vs hot |",
        "| --- | ---: | ---: |",
        f"| hot (kept loaded) | {switch['hot_p50_s']:.3f} | 1.00 |",
        f"| cold (loaded for the request) | {switch['cold_p50_s']:.3f} | **{switch['cold_over_hot']:.2f}** |",
    ]
    if switch.get("mean_load_s") is not None:
        lines += ["", f"Load time the replicas measured (`kandinsky_serve_model_switch_seconds`): mean "
                      f"{switch['mean_load_s']:.3f} s over {switch['loads_reported']:.0f} loads."]
    lines += ["", f"Mixed load: Poisson {mixed['rate_per_s']:g} req/s for {mixed['duration_s']:g} s, half Kandinsky 2.1, "
                  f"half 2.2 (its prior and the fine-tuned ones); **lost: {mixed['lost']}**:", "",
              "| model | sent | ok | failed | ok/s | p50 s | p99 s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in mixed["per_model"].items():
        p50 = "–" if row["p50_s"] is None else f"{row['p50_s']:.2f}"
        p99 = "–" if row["p99_s"] is None else f"{row['p99_s']:.2f}"
        lines.append(f"| {name} | {row['sent']} | {row['succeeded']} | {row['failed']} | {row['throughput_per_s']:.2f} "
                     f"| {p50} | {p99} |")
    return lines


def render_models(result: dict) -> str:
    return "\n".join(models_tables(result) + ["", provenance_line(result)])


def render_sweep(result: dict) -> str:
    from serve.tools.bench_sweep import sweep_tables

    return "\n".join(sweep_tables(result) + ["", provenance_line(result)])


def render_understanding(result: dict) -> str:
    from serve.tools.bench_understanding import understanding_tables

    return "\n".join(understanding_tables(result) + ["", provenance_line(result)])


def render_quality(result: dict) -> str:
    from serve.tools.bench_quality import quality_tables

    return "\n".join(quality_tables(result) + ["", provenance_line(result)])


def movq_memory_table(result: dict) -> list[str]:
    """The table of ``bench movq-memory`` (also what it prints)."""
    lines = [
        f"MOVQ stage, {result['model']} model, {result['device']}, {result['threads']} thread(s), tiles of "
        f"{result['tile_size']} px overlapping by at least {result['tile_overlap']} px; each row a fresh process:",
        "",
        "| operation | size | tiled? | tiles | peak MB | seconds |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        peak = f"{row['peak_rss_over_load_mb']:.0f}"
        if row.get("cuda_peak_mb") is not None:
            peak += f" (CUDA {row['cuda_peak_mb']:.0f})"
        lines.append(f"| {row['op']} | {row['size']}² | {'yes' if row['tiled'] else 'no'} | {row['tiles']} | {peak} "
                     f"| {row['seconds']:.2f} |")
    return lines + ["", "Peak MB: the process's peak resident memory (`ru_maxrss`) less its resident memory once the "
                        "model was loaded and the input made."]


def render_movq_memory(result: dict) -> str:
    return "\n".join(movq_memory_table(result) + ["", provenance_line(result)])


RENDERERS = {"latency": render_latency, "batching": render_batching, "hostile": render_hostile, "models": render_models,
             "sweep": render_sweep, "quality": render_quality, "movq_memory": render_movq_memory,
             "understanding": render_understanding}


def render_docs(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked table redrawn from ``results/KIND.json``."""

    def redraw(match: re.Match) -> str:
        kind = match.group(2)
        result = json.loads((results / f"{kind}.json").read_text())
        return f"{match.group(1)}{RENDERERS[kind](result)}\n{match.group(4)}"

    return SECTION.sub(redraw, text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    current = DOC.read_text()
    rendered = render_docs(current)
    if "--check" in argv:
        if rendered != current:
            print(f"{DOC} is stale: run python -m serve.tools.bench_docs", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(rendered)
    print(f"written: {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
