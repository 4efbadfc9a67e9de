from deployments.metrics import ALL_METRICS, merge_exposition

NODE_A = """# HELP ray_kandinsky_serve_stage_requests_total Calls.
# TYPE ray_kandinsky_serve_stage_requests_total counter
ray_kandinsky_serve_stage_requests_total{stage="prior",NodeAddress="a"} 3.0
# HELP ray_other_total Not ours.
# TYPE ray_other_total counter
ray_other_total 9.0
# HELP ray_serve_deployment_replica_healthy Health.
# TYPE ray_serve_deployment_replica_healthy gauge
ray_serve_deployment_replica_healthy{deployment="Prior"} 1.0
"""
NODE_B = """# HELP ray_kandinsky_serve_stage_requests_total Calls.
# TYPE ray_kandinsky_serve_stage_requests_total counter
ray_kandinsky_serve_stage_requests_total{stage="prior",NodeAddress="b"} 4.0
"""


def test_merge_keeps_our_families_grouped_under_one_header():
    merged = merge_exposition([NODE_A, NODE_B]).splitlines()
    assert "ray_other_total 9.0" not in merged
    assert merged.count("# TYPE ray_kandinsky_serve_stage_requests_total counter") == 1
    start = merged.index("# TYPE ray_kandinsky_serve_stage_requests_total counter")
    assert merged[start + 1].endswith(" 3.0") and merged[start + 2].endswith(" 4.0")
    assert 'ray_serve_deployment_replica_healthy{deployment="Prior"} 1.0' in merged


def test_metric_names_follow_prometheus_conventions():
    names = [spec.name for spec in ALL_METRICS]
    assert len(names) == len(set(names))
    for spec in ALL_METRICS:
        assert spec.name.startswith("kandinsky_serve_")
        if spec.kind == "counter":
            assert spec.name.endswith("_total")
        if "seconds" in spec.name or "bytes" in spec.name:
            assert spec.name.split("_")[-1] in ("seconds", "bytes", "total")
        assert not {"prompt", "request_id", "seed"} & set(spec.tags), "unbounded label"
