"""A local run listens on 127.0.0.1 only (issue #28): every port of the Ray instance that
`kandinsky-serve run` (and `make run`, and the benchmarks) starts, Serve's HTTP proxy and
the replicas' gRPC servers included.

The instance is started in a child process the way serve/graph/service.py starts it
(serve.graph.local_ray.init_local_ray), with an application of two deployments, one
calling the other; the child lists the listening TCP sockets of itself and every process
under it (GCS, raylet, agents, workers) while both answer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}

CHILD = r"""
import json, os, sys, time, urllib.request

import ray
from ray import serve

import psutil  # Ray ships it (importable once ray is)
from serve.graph.local_ray import init_local_ray

port, http_host = int(sys.argv[1]), sys.argv[2]
init_local_ray(num_cpus=2, logging_level="ERROR", log_to_driver=False)
serve.start(http_options={"host": http_host, "port": port})


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Inner:
    def __call__(self, x):
        return x + 1


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Outer:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, request):
        return str(await self.inner.remote(1))


serve.run(Outer.bind(Inner.bind()), name="binds", route_prefix="/")
answer = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60).read().decode()
mine = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
sockets = []
for conn in psutil.net_connections(kind="tcp"):
    if conn.status == psutil.CONN_LISTEN and conn.pid in mine:
        try:
            name = psutil.Process(conn.pid).name()
        except psutil.Error:
            name = "?"
        sockets.append([conn.laddr.ip, conn.laddr.port, name])
print("RESULT " + json.dumps({"answer": answer, "sockets": sockets, "node_ip": ray.util.get_node_ip_address()}), flush=True)
serve.shutdown()
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_local_ray_listens_on_loopback_only():
    http_host = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())["http_options"]["host"]
    assert http_host == "127.0.0.1", "make run's HTTP proxy must be localhost-only"
    port = _free_port()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(port), http_host], cwd=ROOT,
        capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["answer"] == "2", "the inter-deployment call must still work"
    assert result["node_ip"] == "127.0.0.1"
    names = {name for _, _, name in result["sockets"]}
    # The processes that hold Ray's ports were all seen (else the check below proves nothing).
    assert {"gcs_server", "raylet"} <= names and any("ProxyActor" in n for n in names), names
    assert sum("ServeReplica" in n for n in names) >= 2, names
    assert any(p == port for _, p, _ in result["sockets"]), "the HTTP proxy's port"
    exposed = [socket for socket in result["sockets"] if socket[0] not in LOOPBACK]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"

