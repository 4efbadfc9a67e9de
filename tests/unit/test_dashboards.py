from deployments.metrics import ALL_METRICS
from tests.dashboards import alert_rules, dashboard_exprs, family, referenced_metrics


def test_dashboard_and_alerts_parse_and_cover_the_basics():
    exprs = " ".join(dashboard_exprs())
    for needed in ("request_duration_seconds_bucket", "stage_errors_total", "replica_healthy", "gpu_memory", "queue_wait", "batch"):
        assert needed in exprs, f"the dashboard has no panel on {needed}"
    names = {rule["alert"] for rule in alert_rules()}
    assert len(names) >= 4 and all(rule["expr"].strip() for rule in alert_rules())
    assert all(rule["labels"]["severity"] in ("page", "warn") for rule in alert_rules())


def test_every_product_metric_referenced_is_defined_with_the_right_kind():
    defined = {spec.exported_name: spec for spec in ALL_METRICS}
    product = {name for name in referenced_metrics() if name.startswith("ray_kandinsky_serve_")}
    assert product, "no product metric referenced"
    for name in product:
        spec = defined.get(family(name)) or defined.get(name)
        assert spec is not None, f"{name} is referenced but not defined in deployments/metrics.py"
        if name != spec.exported_name:
            assert spec.kind == "histogram", f"{name}: histogram suffix on a {spec.kind}"
