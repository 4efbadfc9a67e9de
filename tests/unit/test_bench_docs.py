"""The benchmark tables in docs/benchmarks.md are drawn from the committed JSON, not typed."""

from __future__ import annotations

import json
import re

from serve.tools.bench_docs import DOC, RENDERERS, RESULTS, SECTION, main, render_docs


def test_every_table_in_the_docs_is_current_with_its_committed_json():
    text = DOC.read_text()
    kinds = [match.group(2) for match in SECTION.finditer(text)]
    assert set(kinds) == set(RENDERERS), "each renderer draws one table in docs/benchmarks.md"
    for kind in kinds:
        provenance = json.loads((RESULTS / f"{kind}.json").read_text())["provenance"]
        assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"]) and provenance["cpus"] >= 1, kind
    assert main(["--check"]) == 0, "docs/benchmarks.md is stale: run .venv/bin/python -m serve.tools.bench_docs"


def test_a_changed_result_changes_the_table(tmp_path):
    for kind in RENDERERS:
        (tmp_path / f"{kind}.json").write_text((RESULTS / f"{kind}.json").read_text())
    latency = json.loads((tmp_path / "latency.json").read_text())
    latency["ratio_p50"] = 9.87
    latency["results"]["served"]["p50_ms"] = 12345.6
    (tmp_path / "latency.json").write_text(json.dumps(latency))
    rendered = render_docs(DOC.read_text(), tmp_path)
    assert "9.87" in rendered and "12345.6" in rendered
    assert rendered != DOC.read_text()


def test_secrets_on_the_command_line_never_reach_a_committed_result():
    from serve.tools.provenance import redacted_command

    argv = ["kandinsky-serve", "bench", "hostile", "--victim-key", "ks-aaa", "--attacker-key=ks-bbb", "--scale", "4"]
    assert redacted_command(argv) == ["kandinsky-serve", "bench", "hostile", "--victim-key", "<redacted>",
                                      "--attacker-key=<redacted>", "--scale", "4"]
    for kind in RENDERERS:
        command = " ".join(json.loads((RESULTS / f"{kind}.json").read_text())["provenance"]["command"])
        assert "ks-" not in command, kind
