"""Where a measured figure came from, recorded beside it in every bench and load-test JSON."""

from __future__ import annotations

import platform
from pathlib import Path


def provenance() -> dict:
    """Where a figure came from: commit, package versions, processor and threads, command line."""
    import importlib.metadata
    import os
    import subprocess
    import sys
    from datetime import datetime, timezone

    import torch

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        root = Path(__file__).resolve().parents[2]  # the repository
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    cpu_model = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "command": redacted_command([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "versions": {name: version(name) for name in ("torch", "ray", "diffusers", "transformers")},
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_result(result: dict, out: Path) -> None:
    """A benchmark's result as JSON at ``out``, with its :func:`provenance`."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "provenance": provenance()}, indent=2, default=str))
    print(f"written: {out}")


SECRET_OPTIONS = ("-key", "-token", "-password")


def redacted_command(argv: list[str]) -> list[str]:
    """``argv`` with the values of secret options (``--victim-key K``, ``--api-key=K``) hidden:
    results are committed."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("<redacted>")
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        if name.startswith("--") and name.endswith(SECRET_OPTIONS):
            if eq:
                out.append(f"{name}=<redacted>")
                continue
            hide_next = True
        out.append(arg)
    return out
