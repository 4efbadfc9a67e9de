"""``kandinsky-serve``: run the service, write tiny checkpoints, benchmark."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from deployments.loading import CheckpointError
from serve.cluster import DEFAULT_CLUSTER_CONFIG, DEFAULT_NODE_TYPES
from serve.settings import ConfigError, LoadedConfig, load_config

DEFAULT_CONFIG = "configs/local.yaml"


def start_service(config: LoadedConfig, host: str | None = None, port: int | None = None) -> str:
    """Start Ray (localhost-only dashboard) unless connected already, and the application; return the base URL."""
    import ray
    from ray import serve

    from serve.graph import build_graph

    app_schema = config.raw["applications"][0]
    app = build_graph(app_schema.get("args"), config.deployment_options)
    host = host or config.http_host
    port = port or config.http_port
    if not ray.is_initialized():
        ray.init(dashboard_host="127.0.0.1", logging_level="WARNING", configure_logging=True)
    # The config's http_options (request_timeout_s, ...) and proxy_location, as `serve deploy` would apply them.
    http_options = {**config.raw.get("http_options", {}), "host": host, "port": port}
    serve.start(http_options=http_options, proxy_location=config.raw.get("proxy_location"))
    serve.run(
        app,
        name=app_schema.get("name", "kandinsky"),
        route_prefix=app_schema.get("route_prefix", "/"),
        logging_config=config.logging_config,
    )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    url = start_service(config, args.host, args.port)
    print(f"kandinsky-serve is up: {url}  (API docs: {url}/docs; Ctrl-C stops it)", flush=True)
    _wait_for_stop()
    from ray import serve

    serve.shutdown()
    return 0


def _wait_for_stop(timeout_s: float | None = None) -> None:
    """Until Ctrl-C or SIGTERM (or ``timeout_s``)."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait(timeout_s)


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from serve.tiny import make_tiny

    prior, decoder = make_tiny(args.dir, args.seed)
    print(f"prior:   {prior}\ndecoder: {decoder}")
    return 0


def _cmd_cluster_render(args: argparse.Namespace) -> int:
    from serve.cluster import load_shape, render_rayservice

    text = render_rayservice(load_config(args.config), load_shape(args.nodes), args.config, args.nodes, args.name)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    return 0


MAX_LOCAL_NODES_PER_TYPE = 8


def _parse_workers(items: list[str]) -> dict[str, int]:
    workers: dict[str, int] = {}
    for item in items:
        name, _, count = item.partition("=")
        if not count.isdigit() or not 1 <= int(count) <= MAX_LOCAL_NODES_PER_TYPE:
            raise ConfigError(f"--workers {item}: expected TYPE=N with N from 1 to {MAX_LOCAL_NODES_PER_TYPE}")
        workers[name] = int(count)
    return workers


def _cmd_cluster_local(args: argparse.Namespace) -> int:
    """Head and worker nodes on this machine with the node types' resources, the config on
    CPU, where each replica landed; torn down on Ctrl-C (or after --hold-s)."""
    from serve.cluster import LocalCluster, fit_problems, load_shape, on_cpu, placement_lines

    shape = load_shape(args.nodes)
    config = load_config(args.config)
    problems = fit_problems(config, shape)
    if problems:
        raise ConfigError("\n".join(problems))
    workers = _parse_workers(args.workers) if args.workers else {t.name: 1 for t in shape.workers}
    with LocalCluster(shape, workers) as cluster:
        print(f"nodes: head + {', '.join(f'{n} x {t}' for t, n in workers.items())}; dashboard {cluster.dashboard_url}", flush=True)
        url = start_service(on_cpu(config), port=args.port)
        print(*placement_lines(cluster, config.raw["applications"][0].get("name", "kandinsky")), sep="\n")
        print(f"kandinsky-serve is up on the local cluster: {url}  (Ctrl-C tears it down)", flush=True)
        _wait_for_stop(args.hold_s)
    print("local cluster stopped")
    return 0


def _bench(kind: str):
    """Run ``serve.bench.bench_<kind>`` with the subcommand's options as keyword arguments."""

    def run(args: argparse.Namespace) -> int:
        from serve import bench

        options = {k: v for k, v in vars(args).items() if k not in ("command", "kind", "func")}
        getattr(bench, f"bench_{kind}")(**{**options, "out": Path(options["out"])})
        return 0

    return run


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from serve.loadtest import load_scenario, run_loadtest

    scenario = load_scenario(
        args.scenario, target=args.target, rate=args.rate, duration_s=args.duration,
        max_requests=args.requests, timeout_s=args.timeout,
    )
    result = run_loadtest(scenario, Path(args.out), progress=not args.no_progress)
    return 1 if result.lost else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kandinsky-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start the service from a config file")
    run.add_argument("--config", default=DEFAULT_CONFIG)
    run.add_argument("--host", default=None, help="override http_options.host")
    run.add_argument("--port", type=int, default=None, help="override http_options.port")
    run.set_defaults(func=_cmd_run)

    tiny = commands.add_parser("make-tiny", help="write a tiny random-weight checkpoint pair")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_make_tiny)

    loadtest = commands.add_parser("loadtest", help="drive a deployment with a scenario file and report")
    loadtest.add_argument("scenario", help="scenario YAML (see README: Load testing)")
    loadtest.add_argument("--target", default=None, help="base URL; overrides the scenario's target")
    loadtest.add_argument("--rate", type=float, default=None, help="a single open-loop rate step (req/s)")
    loadtest.add_argument("--duration", type=float, default=None, help="seconds of arrivals per step")
    loadtest.add_argument("--requests", type=int, default=None, help="at most this many requests per step")
    loadtest.add_argument("--timeout", type=float, default=None, help="per-request timeout (s)")
    loadtest.add_argument("--out", default="loadtest-report")
    loadtest.add_argument("--no-progress", action="store_true")
    loadtest.set_defaults(func=_cmd_loadtest)

    cluster = commands.add_parser("cluster", help="cluster deployment files and a local multi-node cluster")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True)
    render = cluster_commands.add_parser("render", help="render the KubeRay RayService manifest from a config and node types")
    render.add_argument("--config", default=DEFAULT_CLUSTER_CONFIG)
    render.add_argument("--nodes", default=DEFAULT_NODE_TYPES, help="node types file")
    render.add_argument("--name", default="kandinsky", help="RayService name")
    render.add_argument("-o", "--output", default="cluster/kuberay-rayservice.yaml", help="file to write, or - for stdout")
    render.set_defaults(func=_cmd_cluster_render)
    local = cluster_commands.add_parser("local", help="start a head and worker nodes on this machine and deploy a config to them")
    local.add_argument("--config", default=DEFAULT_CLUSTER_CONFIG)
    local.add_argument("--nodes", default=DEFAULT_NODE_TYPES, help="node types file")
    local.add_argument("--workers", action="append", metavar="TYPE=N", help="worker nodes to start (default: one of each type)")
    local.add_argument("--port", type=int, default=8000)
    local.add_argument("--hold-s", type=float, default=None, help="tear down after this many seconds (default: on Ctrl-C)")
    local.set_defaults(func=_cmd_cluster_local)

    bench = commands.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="kind", required=True)

    def bench_kind(kind: str, help: str) -> argparse.ArgumentParser:
        """A bench subcommand with the options every benchmark shares."""
        sub = kinds.add_parser(kind, help=help)
        sub.add_argument("--config", default=DEFAULT_CONFIG)
        sub.add_argument("--size", type=int, default=64)
        sub.add_argument("--steps", type=int, default=50)
        sub.add_argument("--out", default=f"bench-results/{kind}.json")
        sub.set_defaults(func=_bench(kind))
        return sub

    latency = bench_kind("latency", "single-request latency: diffusers in-process vs the served graph")
    latency.add_argument("--prior-steps", type=int, default=25)
    latency.add_argument("--rounds", type=int, default=10)
    batching = bench_kind("batching", "step vs request batching under open-loop Poisson load")
    batching.add_argument("--max-batch", type=int, default=8)
    batching.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per load point")
    batching.add_argument("--capacity-duration", type=float, default=10.0)
    compare = bench_kind("compare", "the graph against in-process diffusers and a monolith deployment")
    compare.add_argument("--prior-steps", type=int, default=25)
    compare.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per rate step")
    compare.add_argument("--slo", type=float, default=5.0, help="p99 latency objective (s)")
    compare.add_argument("--port", type=int, default=8010)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as error:
        print(f"kandinsky-serve: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
