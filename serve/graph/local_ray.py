"""A fresh Ray instance on this machine that listens on 127.0.0.1 only.

Ray binds its gRPC servers (GCS, raylet, object manager, every worker), its agents and
its metrics exporters to loopback exactly when the node's IP address is loopback, and
otherwise to all interfaces. ``ray.init(_node_ip_address="127.0.0.1")`` does not get
there: Ray turns a loopback address into the machine's routable one. Ray's own switch
for single-machine Ray (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the default on macOS and
Windows) makes the node IP 127.0.0.1, so :func:`init_local_ray` sets it for this process
and the Ray processes it starts. Only for a fresh local instance: a process that joins a
real cluster (``RAY_ADDRESS``) must advertise its routable address.

One server ignores the node IP: each Serve replica's inter-deployment gRPC server binds
``[::]:0`` (hard-coded in ``ray.serve._private.replica``; token-authenticated, but on
every interface). :func:`loopback_grpc_servers`, run in every worker process of the
instance as its ``worker_process_setup_hook``, binds those to 127.0.0.1 as well.
"""

from __future__ import annotations

import logging
import os

LOOPBACK = "127.0.0.1"
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

logger = logging.getLogger("kandinsky_serve")


def bind_ray_to_loopback() -> None:
    """Every Ray node this process starts from now on gets the IP address 127.0.0.1, so
    every port it opens (GCS, raylet, workers, agents, metrics) listens on loopback."""
    os.environ[LOCAL_ONLY_ENV] = "0"  # Ray processes started from here read it at import
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: ray may be imported already


_ALL_INTERFACES = ("[::]", "0.0.0.0", "")


def loopback_grpc_servers() -> None:
    """Worker process setup hook: a gRPC server that Ray Serve opens on all interfaces
    (``[::]:port``) listens on ``127.0.0.1:port`` instead. Never raises: a Ray version
    without the helper it wraps keeps its workers (and says so)."""
    import sys

    try:
        from ray._common import tls_utils

        original = tls_utils.add_port_to_grpc_server
        if getattr(original, "_kandinsky_loopback", False):
            return

        def add_port_to_grpc_server(server, address: str):
            host, _, port = address.rpartition(":")
            return original(server, f"{LOOPBACK}:{port}" if host in _ALL_INTERFACES else address)

        add_port_to_grpc_server._kandinsky_loopback = True
        tls_utils.add_port_to_grpc_server = add_port_to_grpc_server
        replica = sys.modules.get("ray.serve._private.replica")  # imported it by name already
        if replica is not None and hasattr(replica, "add_port_to_grpc_server"):
            replica.add_port_to_grpc_server = add_port_to_grpc_server
    except Exception as error:  # noqa: BLE001 - a setup hook that raises kills the worker
        logger.warning("Serve replicas' gRPC servers stay on all interfaces: %s: %s", type(error).__name__, error)


def loopback_runtime_env(runtime_env: dict | None = None) -> dict:
    """A driver's runtime_env with :func:`loopback_grpc_servers` as its workers' setup hook."""
    runtime_env = dict(runtime_env or {})
    runtime_env.setdefault("worker_process_setup_hook", f"{__name__}.loopback_grpc_servers")
    return runtime_env


def check_loopback() -> None:
    """Warn when the Ray node this process runs on is not on 127.0.0.1."""
    import ray

    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:  # a Ray version that no longer honours the switch
        logger.warning("Ray runs on %s, not %s: its ports are reachable from other machines", node_ip, LOOPBACK)


def init_local_ray(**options):
    """``ray.init(address="local", dashboard_host="127.0.0.1", **options)`` with every Ray
    port on 127.0.0.1; returns Ray's context."""
    import ray

    bind_ray_to_loopback()
    runtime_env = loopback_runtime_env(options.pop("runtime_env", None))
    context = ray.init(address="local", dashboard_host=LOOPBACK, runtime_env=runtime_env, **options)
    check_loopback()
    return context


def connect_ray(**options):
    """Join the Ray cluster ``RAY_ADDRESS`` names, or start a fresh loopback-only instance
    when it is unset or ``local``; returns Ray's context."""
    import os

    import ray

    address = os.environ.get("RAY_ADDRESS", "local")
    if address == "local":
        return init_local_ray(**options)
    return ray.init(address=address, **options)
