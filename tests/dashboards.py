"""Metric names referenced by the checked-in Grafana dashboard and alert rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

CLUSTER = Path(__file__).parents[1] / "cluster"
_NAME = re.compile(r"\b(ray_[a-z0-9_]+)")
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((CLUSTER / "prometheus-alerts.yaml").read_text())["groups"] for rule in group["rules"]]


def referenced_metrics() -> set[str]:
    """Sample names as written (with histogram suffixes)."""
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    return {name for expr in exprs for name in _NAME.findall(expr)}


def family(name: str) -> str:
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
