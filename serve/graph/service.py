"""Start the service in this process: Ray (when not connected already), Serve's HTTP
proxy with the config's options, and the application."""

from __future__ import annotations

import logging

from serve.graph.build import build_graph
from serve.graph.local_ray import connect_ray
from serve.settings import LoadedConfig


def start_service(config: LoadedConfig, host: str | None = None, port: int | None = None) -> str:
    """Start Ray (every port on 127.0.0.1) unless connected already, and the application; return the base URL."""
    import ray
    from ray import serve

    for why in dict.fromkeys(config.skipped_deployments.values()):  # a family left out says so once
        logging.getLogger("kandinsky_serve").warning("%s", why)
    app_schema = config.raw["applications"][0]
    app = build_graph(app_schema.get("args"), config.deployment_options)
    host = host or config.http_host
    port = port or config.http_port
    if not ray.is_initialized():
        connect_ray(logging_level="WARNING", configure_logging=True)
    # The config's http_options (request_timeout_s, ...) and proxy_location, as `serve deploy` would apply them.
    http_options = {**config.raw.get("http_options", {}), "host": host, "port": port}
    serve.start(http_options=http_options, proxy_location=config.raw.get("proxy_location"))
    serve.run(
        app,
        name=config.app_name,
        route_prefix=app_schema.get("route_prefix", "/"),
        logging_config=config.logging_config,
    )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"
