"""Operator tools: benchmarks and their baselines, the load tester, cluster rendering, provenance of measurements, the picture grid of the embedded model."""
