"""The stage graph: the stage registry, building the Ray Serve application, the ingress, the per-request plan, resilience, drain and service start."""
