"""``kandinsky-serve``: run the service, write tiny checkpoints, train, benchmark."""

from __future__ import annotations

import argparse
import os
import signal
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from deployments.loading import CheckpointError
from serve.tools.cluster import DEFAULT_CLUSTER_CONFIG, DEFAULT_NODE_TYPES
from serve.settings import ConfigError, MovqSettings, load_config

DEFAULT_CONFIG = "configs/local.yaml"


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from serve.graph.service import start_service

    url = start_service(config, args.host, args.port)
    print(f"kandinsky-serve is up: {url}  (API docs: {url}/docs; Ctrl-C stops it)", flush=True)
    signals = _StopSignals()
    signals.first.wait()
    from ray import serve

    from serve.graph.shutdown import drain_service

    # No request outlives the proxy's timeout, so waiting longer than it is never needed.
    timeout_s = args.drain_timeout_s
    if timeout_s is None:
        timeout_s = float(config.raw.get("http_options", {}).get("request_timeout_s", 60))
    print(f"stopping: no new work is admitted; waiting up to {timeout_s:g} s for what is in flight "
          "(Ctrl-C again stops at once)", flush=True)
    try:
        state = drain_service(
            config.app_name, timeout_s, abort=signals.second.is_set,
            on_progress=lambda s: print(f"stopping: {s.busy} request(s)/job(s) still in flight", flush=True),
        )
        if state.timed_out:
            print(f"stopping without waiting further: {state.busy} request(s)/job(s) still in flight "
                  f"({len(state.reports)} of {state.expected} ingress replicas reached)", flush=True)
    except Exception as error:  # a broken controller must not keep the service from stopping
        print(f"stopping without draining: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    serve.shutdown()
    return 0


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 86_400:
        raise argparse.ArgumentTypeError(f"{text}: seconds from 0 to 86400")
    return value


class _StopSignals:
    """Ctrl-C / SIGTERM: the first sets ``first``, any later one ``second``."""

    def __init__(self) -> None:
        self.first, self.second = threading.Event(), threading.Event()
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, *_) -> None:
        (self.second if self.first.is_set() else self.first).set()


def _wait_for_stop(timeout_s: float | None = None) -> None:
    """Until Ctrl-C or SIGTERM (or ``timeout_s``)."""
    _StopSignals().first.wait(timeout_s)


def _make_tiny_understanding(checkpoint: str, out_dir: Path | str, seed: int = 0) -> Path:
    """A tiny random-weight ``florence2`` or ``kosmos2`` checkpoint (one directory: the model and its processor)."""
    from serve.training.tiny_florence2 import make_tiny_florence2
    from serve.training.tiny_kosmos2 import make_tiny_kosmos2

    return (make_tiny_florence2 if checkpoint == "florence2" else make_tiny_kosmos2)(out_dir, seed)


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    if args.full_size:
        from serve.training.full_size import make_full_size

        if args.family != "2.2":
            raise ConfigError(f"--full-size writes Kandinsky 2.2 only, not --family {args.family}")
        try:
            checkpoint = make_full_size(args.dir, args.seed, args.dtype, tuple(args.variants.split(",")))
        except ValueError as error:
            raise ConfigError(f"--variants {args.variants}: {error}") from error
    elif args.family in ("florence2", "kosmos2"):
        print(f"{args.family + ':':20s}{_make_tiny_understanding(args.family, args.dir, args.seed)}")
        return 0
    else:
        from serve.training.tiny import make_tiny, make_tiny_21

        checkpoint = (make_tiny_21 if args.family == "2.1" else make_tiny)(args.dir, args.seed)
    for name, path in checkpoint._asdict().items():
        if path is not None:
            print(f"{name + ':':20s}{path}")
    return 0


def _cmd_cluster_render(args: argparse.Namespace) -> int:
    from serve.tools.cluster import load_shape, render_rayservice, with_overrides

    shape = with_overrides(load_shape(args.nodes), args.image, args.runtime_env)
    text = render_rayservice(
        load_config(args.config), shape, args.config, args.nodes, args.name,
        allow_unpinned_image=args.allow_unpinned_image,
    )
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
    from serve.tools.cluster import LocalCluster, fit_problems, load_shape, on_cpu, placement_lines

    shape = load_shape(args.nodes)
    config = load_config(args.config)
    problems = fit_problems(config, shape)
    if problems:
        raise ConfigError("\n".join(problems))
    workers = _parse_workers(args.workers) if args.workers else {t.name: 1 for t in shape.workers}
    from serve.graph.service import start_service

    from deployments.registry import UNDERSTANDING_STAGES

    # The config's image-understanding stages run on tiny checkpoints too.
    models = config.service.models
    tiny_dir = Path(tempfile.mkdtemp(prefix="kandinsky-tiny-"))
    try:
        understanding = {stage.path_field: str(_make_tiny_understanding(stage.checkpoint, tiny_dir / stage.checkpoint))
                         for stage in UNDERSTANDING_STAGES if getattr(models, stage.path_field) is not None}
        with LocalCluster(shape, workers) as cluster:
            print(f"nodes: head + {', '.join(f'{n} x {t}' for t, n in workers.items())}; dashboard {cluster.dashboard_url}",
                  flush=True)
            url = start_service(on_cpu(config, understanding=understanding), port=args.port)
            print(*placement_lines(cluster, config.app_name), sep="\n")
            print(f"kandinsky-serve is up on the local cluster: {url}  (Ctrl-C tears it down)", flush=True)
            _wait_for_stop(args.hold_s)
    finally:
        shutil.rmtree(tiny_dir, ignore_errors=True)
    print("local cluster stopped")
    return 0


def _cmd_train_tiny(args: argparse.Namespace) -> int:
    import json

    import torch

    from serve.training.recipe import preset, train_tiny

    torch.set_num_threads(args.threads)
    summary = train_tiny(
        args.out, preset(args.preset, seed=args.seed), args.work_dir, progress=not args.no_progress, only=args.only, device=args.device
    )
    out = Path(args.out)
    if args.only:
        print(json.dumps({"total_seconds": summary["total_seconds"], "stages": list(summary["stages"])}))
        return 0
    print(json.dumps({k: summary[k] for k in ("total_seconds", "weights_bytes")}))
    print(f"prior:   {out / 'prior'}\ndecoder: {out / 'decoder'}\nsummary: {out / 'training_summary.json'}")
    return 0


def _cmd_train_prior(args: argparse.Namespace) -> int:
    import torch

    from serve.training.finetune import finetune_prior

    torch.set_num_threads(args.threads)
    out = finetune_prior(
        args.data, args.base, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        workers=args.workers, log_path=Path(args.out) / "prior_loss.jsonl", progress=not args.no_progress,
    )
    print(f"prior: {out}")
    return 0


def _bench(kind: str):
    """Run ``serve.tools.bench.bench_<kind>`` (or, for a benchmark that builds on that module's
    load loops, ``serve.tools.bench_<kind>.bench_<kind>``) with the subcommand's options as keyword arguments."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        from serve.tools import bench

        name = f"bench_{kind.replace('-', '_')}"
        function = getattr(bench, name, None) or getattr(importlib.import_module(f"serve.tools.{name}"), name)
        options = {k: v for k, v in vars(args).items() if k not in ("command", "kind", "func")}
        function(**{**options, "out": Path(options["out"])})
        return 0

    return run


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from serve.tools.loadtest import load_scenario, run_loadtest

    scenario = load_scenario(
        args.scenario, target=args.target, rate=args.rate, duration_s=args.duration,
        max_requests=args.requests, timeout_s=args.timeout,
    )
    result = run_loadtest(scenario, Path(args.out), progress=not args.no_progress)
    return 1 if result.lost else 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from serve.http.auth import add_key, revoke_key

    path = Path(args.file)
    try:
        if args.action == "new":
            key = add_key(path, args.name, args.requests_per_s, args.images_per_min, args.admin)
            print(key)
            print(f"(stored only as a hash in {path}; this is the only time the key is shown)", file=sys.stderr)
        else:
            revoke_key(path, args.name)
            print(f"revoked {args.name!r} in {path} (in force within a second, no restart needed)", file=sys.stderr)
    except ValueError as error:
        print(f"kandinsky-serve: {error}", file=sys.stderr)
        return 2

def _output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _cmd_generate(args: argparse.Namespace) -> int:
    import httpx

    from serve.client import Client, JobFailed, KandinskyError, progress_line

    output = Path(args.output)
    fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(output.suffix.lower(), "png")
    params = {
        "width": args.width, "height": args.height, "num_images": args.num_images, "steps": args.steps,
        "prior_steps": args.prior_steps, "seed": args.seed, "negative_prompt": args.negative_prompt,
        "guidance_scale": args.guidance_scale, "scheduler": args.scheduler, "output_format": fmt,
    }
    shown = not args.quiet and sys.stderr.isatty() or args.progress

    def on_progress(job) -> None:
        if shown:
            print("\r" + progress_line(job), end="", file=sys.stderr, flush=True)

    try:
        with Client(args.url, api_key=args.api_key or os.environ.get("KANDINSKY_API_KEY")) as client:
            job, images = client.generate(args.prompt, on_progress=on_progress, **params)
    except JobFailed as error:
        print(f"\nkandinsky-serve: job {error.job.id} {error.job.state}: {error.message}", file=sys.stderr)
        return 1
    except KandinskyError as error:
        print(f"\nkandinsky-serve: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkandinsky-serve: interrupted; the job was cancelled", file=sys.stderr)
        return 130
    except (httpx.HTTPError, OSError) as error:  # cannot reach the service
        print(f"\nkandinsky-serve: {error}", file=sys.stderr)
        return 2
    if shown:
        print(file=sys.stderr)
    for path, data, seed in zip(_output_paths(output, len(images)), images, job.seeds):
        path.write_bytes(data)
        print(f"{path}  (seed {seed})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kandinsky-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start the service from a config file")
    run.add_argument("--config", default=DEFAULT_CONFIG)
    run.add_argument("--host", default=None, help="override http_options.host")
    run.add_argument("--port", type=int, default=None, help="override http_options.port")
    run.add_argument("--drain-timeout-s", type=_seconds, default=None,
                     help="on Ctrl-C/SIGTERM, wait at most this long for requests and jobs in flight "
                          "(default: http_options.request_timeout_s)")
    run.set_defaults(func=_cmd_run)

    tiny = commands.add_parser("make-tiny", help="write a tiny random-weight checkpoint (prior and decoders)")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--family", choices=("2.2", "2.1", "florence2", "kosmos2"), default="2.2",
                      help="2.2: prior, decoder, decoder_inpaint, decoder_controlnet; 2.1: kandinsky-2-1-prior, "
                           "kandinsky-2-1, kandinsky-2-1-inpaint; florence2: one Florence-2 directory (model and "
                           "processor); kosmos2: kosmos-2-patch14-224")
    tiny.add_argument("--full-size", action="store_true",
                      help="the published Kandinsky 2.2 architectures (4.9 B parameters) with seeded random weights "
                           "instead of tiny ones: same FLOPs, nothing to download (9.8 GB in float16)")
    tiny.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                      help="--full-size: the weights' dtype")
    tiny.add_argument("--variants", default="decoder",
                      help="--full-size: comma-separated decoders to write, of decoder,inpaint,controlnet")
    tiny.set_defaults(func=_cmd_make_tiny)

    keys = commands.add_parser("keys", help="API keys: make one (printed once, stored hashed) or revoke one")
    keys_actions = keys.add_subparsers(dest="action", required=True)
    new = keys_actions.add_parser("new", help="make a key for NAME and append its hash to --file")
    new.add_argument("name")
    new.add_argument("--file", required=True, help="the keys file (args.auth.api_keys_file)")
    new.add_argument("--requests-per-s", type=float, default=None)
    new.add_argument("--admin", action="store_true", help="this key sees and cancels every client's jobs")
    new.add_argument("--images-per-min", type=float, default=None)
    new.set_defaults(func=_cmd_keys)
    revoke = keys_actions.add_parser("revoke", help="revoke NAME's key (403 from then on)")
    revoke.add_argument("name")
    revoke.add_argument("--file", required=True)
    revoke.set_defaults(func=_cmd_keys)

    generate = commands.add_parser("generate", help="generate an image on a running service (a job, with a progress bar)")
    generate.add_argument("prompt")
    generate.add_argument("-o", "--output", default="out.png", help="file to write (.png, .jpg, .webp); several images: out-0.png, ...")
    generate.add_argument("--url", default=os.environ.get("KANDINSKY_URL", "http://127.0.0.1:8000"))
    generate.add_argument("--api-key", default=None, help="sent as a bearer token (default: $KANDINSKY_API_KEY)")
    generate.add_argument("--width", type=int, default=None)
    generate.add_argument("--height", type=int, default=None)
    generate.add_argument("--num-images", type=int, default=None)
    generate.add_argument("--steps", type=int, default=None)
    generate.add_argument("--prior-steps", type=int, default=None)
    generate.add_argument("--guidance-scale", type=float, default=None)
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--scheduler", default=None)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    generate.add_argument("--progress", action="store_true", help="a progress bar even when stderr is not a terminal")
    generate.set_defaults(func=_cmd_generate)

    train = commands.add_parser("train", help="train the embedded tiny model, or fine-tune a prior")
    trainers = train.add_subparsers(dest="what", required=True)
    train_tiny = trainers.add_parser("tiny", help="the whole recipe: synthetic scenes -> CLIP, MOVQ, prior, decoder")
    train_tiny.add_argument("--out", required=True, help="writes OUT/prior, OUT/decoder and OUT/training_summary.json")
    train_tiny.add_argument("--seed", type=int, default=0)
    train_tiny.add_argument("--preset", default="full", help="full (the shipped model) or smoke (a few steps each)")
    train_tiny.add_argument("--work-dir", default=None, help="finished stages and loss logs (default OUT/work); reruns resume")
    train_tiny.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    train_tiny.add_argument("--only", choices=["prior", "movq_refine"], default=None,
                            help="train only up to this stage into the work dir (the prior: beside the full run, same --out)")
    train_tiny.add_argument("--device", default="cpu", help="where to train: cpu (the recipe's reference) or cuda")
    train_tiny.add_argument("--no-progress", action="store_true")
    train_tiny.set_defaults(func=_cmd_train_tiny)
    train_prior = trainers.add_parser("prior", help="fine-tune a prior on a folder of images with caption files")
    train_prior.add_argument("--data", required=True, help="folder of IMAGE.png + IMAGE.txt (one caption per line)")
    train_prior.add_argument("--base", required=True, help="prior directory (kandinsky-2-2-prior layout) to start from")
    train_prior.add_argument("--out", required=True, help="where the fine-tuned prior directory is written")
    train_prior.add_argument("--steps", type=int, default=500)
    train_prior.add_argument("--batch-size", type=int, default=32, help="per worker")
    train_prior.add_argument("--lr", type=float, default=1e-4)
    train_prior.add_argument("--seed", type=int, default=0)
    train_prior.add_argument("--workers", type=int, default=0, help="N >= 1: Ray Train with N workers (DDP); 0: this process")
    train_prior.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    train_prior.add_argument("--no-progress", action="store_true")
    train_prior.set_defaults(func=_cmd_train_prior)

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
    render.add_argument(
        "--allow-unpinned-image", action="store_true",
        help="render an image that is not pinned by digest (NAME@sha256:...), for a test cluster",
    )
    render.add_argument("--image", default=None, help="the image every pod runs, in place of the node types file's "
                        "(the repository's Dockerfile, pushed: NAME@sha256:...)")
    render.add_argument("--runtime-env", default=None, metavar="JSON",
                        help='instead of an image with the package: Ray\'s runtime_env that installs it, e.g. '
                             '\'{"pip": ["kandinsky-serve @ https://example.com/kandinsky_serve-0.1.0-py3-none-any.whl"]}\'')
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
    latency.add_argument("--breakdown", action="store_true",
                         help="also split the served latency into its hops (proxy, each stage call, the ingress)")
    latency.add_argument("--url", default=None,
                         help="measure the service running at this URL (on --config's checkpoints) instead of starting one")
    batching = bench_kind("batching", "step vs request batching under open-loop Poisson load")
    batching.add_argument("--max-batch", type=int, default=8)
    batching.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per load point")
    batching.add_argument("--capacity-duration", type=float, default=10.0)
    batching.epilog = "RAY_ADDRESS=<address> runs it on that Ray cluster (its apps are removed after); unset, on a fresh local one."
    compare = bench_kind("compare", "the graph against in-process diffusers and a monolith deployment")
    compare.add_argument("--prior-steps", type=int, default=25)
    compare.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per rate step")
    compare.add_argument("--slo", type=float, default=5.0, help="p99 latency objective (s)")
    compare.add_argument("--port", type=int, default=8010)
    compare.add_argument("--rates", default=None,
                         help="comma-separated rising requests/s to sweep (default: 0.5,1,2,3,4,5,6,8,10,12)")
    compare.add_argument("--url", default=None,
                         help="measure the graph already served at this URL (on --config's checkpoints) and deploy "
                              "the monolith beside it on that Ray cluster (RAY_ADDRESS), instead of starting both")
    hostile = kinds.add_parser("hostile", help="one key attacking (slow bodies, streams, store flood, decode bombs) "
                                               "while another works: the other's success rate and p99 against no attack")
    hostile.add_argument("--url", required=True, help="the service to measure (API keys on)")
    hostile.add_argument("--victim-key", required=True)
    hostile.add_argument("--attacker-key", required=True)
    hostile.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    hostile.add_argument("--scale", type=int, default=4, help="attack size: 8x slow bodies, 32x streams, x decode clients")
    hostile.add_argument("--attacks", default=None, help="comma-separated subset of slow_bodies,streams,store_flood,decode_bombs")
    hostile.add_argument("--timeout", type=float, default=60.0, help="a victim request unanswered this long counts as lost")
    hostile.add_argument("--settle", type=float, default=10.0,
                         help="seconds to wait after a phase for the Ingress's memory to come back down")
    hostile.add_argument("--out", default="bench-results/hostile.json")
    hostile.set_defaults(func=_bench("hostile"))
    models = kinds.add_parser("models", help="several models in one service: a cold vs a hot fine-tuned prior, "
                                             "and a mixed load (half 2.1, half 2.2 over several priors)")
    models.add_argument("--url", default=None, help="a running service with fine-tuned priors and 2.1 configured "
                                                    "(default: start one on tiny checkpoints written for the run)")
    models.add_argument("--priors", type=int, default=4, help="fine-tuned priors to write (own service only)")
    models.add_argument("--keep", type=int, default=2, help="fine-tuned priors a Prior replica keeps (own service only)")
    models.add_argument("--rounds", type=int, default=8, help="requests per phase of the prior-switch measurement")
    models.add_argument("--rate", type=float, default=1.0, help="mixed load: requests/s (Poisson)")
    models.add_argument("--duration", type=float, default=30.0, help="mixed load: seconds of arrivals")
    models.add_argument("--port", type=int, default=8020)
    models.add_argument("--out", default="bench-results/models.json")
    models.set_defaults(func=_bench("models"))
    sweep = bench_kind("sweep", "a 16-cell /v1/sweep against the same 16 requests sent one after another")
    sweep.set_defaults(steps=25)
    sweep.add_argument("--prior-steps", type=int, default=25)
    sweep.add_argument("--rounds", type=int, default=3, help="sweep + one-at-a-time pairs; the median is reported")
    sweep.add_argument("--max-batch", type=int, default=16, help="the loop stages' step batch (own service only)")
    sweep.add_argument("--url", default=None, help="a running service (default: start one on a tiny checkpoint)")
    sweep.add_argument("--port", type=int, default=8030)
    understanding = bench_kind("understanding", "Florence-2 captioning: dynamic batching against one image at a "
                                                "time, and the latency caption_check adds to a generation")
    understanding.set_defaults(steps=4)
    understanding.add_argument("--prior-steps", type=int, default=4, help="caption-check generation's prior steps")
    understanding.add_argument("--images", type=int, default=8, help="distinct images captioned per side")
    understanding.add_argument("--rounds", type=int, default=5, help="rounds per part, sides alternating; medians reported")
    understanding.add_argument("--max-batch", type=int, default=8, help="every stage's batch (own service only)")
    understanding.add_argument("--batch-wait", type=float, default=0.01,
                               help="seconds a batch waits to fill (own service only)")
    understanding.add_argument("--parts", default="captioning,caption-check", help="comma-separated subset")
    understanding.add_argument("--url", default=None, help="a running service with Florence-2 configured "
                                                           "(default: start one on tiny checkpoints)")
    understanding.add_argument("--port", type=int, default=8040)
    quality = kinds.add_parser("quality", help="steps against held-out accuracy per scheduler, and the quality "
                                               "presets' latency and accuracy, on the embedded model in process")
    quality.add_argument("--per-combo", type=int, default=4, help="images per held-out combination and language")
    quality.add_argument("--steps", default="4,8,12,20,30", help="comma-separated decoder step counts")
    quality.add_argument("--schedulers", default=None, help="comma-separated subset (default: all)")
    quality.add_argument("--rounds", type=int, default=7, help="latency rounds per preset (interleaved)")
    quality.add_argument("--languages", default="en,ru", help="the presets' held-out captions")
    quality.add_argument("--checkpoint", default=None, help="a directory with prior/ and decoder/ (default: embedded)")
    quality.add_argument("--plot", default=None, help="write the accuracy-vs-steps plot (PNG) here")
    quality.add_argument("--out", default="bench-results/quality.json")
    quality.set_defaults(func=_bench("quality"))
    movq = kinds.add_parser("movq-memory", help="peak memory and time of the MOVQ stage decoding and encoding, "
                                                "whole vs in tiles, each measurement in a fresh process")
    movq.add_argument("--sizes", default="1024,2048", help="comma-separated square sizes in pixels")
    movq.add_argument("--ops", default="decode,encode", help="comma-separated subset of decode,encode")
    movq.add_argument("--full-size", action="store_true",
                      help="the full Kandinsky 2.2 MOVQ architecture (random weights) instead of the embedded tiny one")
    movq.add_argument("--tile-size", type=int, default=MovqSettings().tile_size, help="pixels (args.movq.tile_size)")
    movq.add_argument("--tile-overlap", type=int, default=MovqSettings().tile_overlap, help="pixels (args.movq.tile_overlap)")
    movq.add_argument("--device", default="cpu", help="cpu or cuda (then the CUDA peak is reported too)")
    movq.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    movq.add_argument("--out", default="bench-results/movq_memory.json")
    movq.set_defaults(func=_bench("movq-memory"))
    gpu = kinds.add_parser("gpu", help="the full-size model on a GPU: diffusers in-process against the served graph "
                                       "(latency, throughput, step vs request batching under load, memory per stage)")
    gpu.add_argument("--checkpoint", default=None, help="a directory with prior/ and decoder/ "
                                                        "(`make-tiny --full-size DIR` writes the full size)")
    gpu.add_argument("--tiny", action="store_true", help="a tiny checkpoint written for the run (smoke runs on a CPU)")
    gpu.add_argument("--url", default=None, help="measure the service running here (on --checkpoint's weights; no "
                                                 "--option sweep) instead of starting one")
    gpu.add_argument("--device", default="cuda", help="cuda or cpu")
    gpu.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                     help="default: float16 on cuda, float32 on cpu")
    gpu.add_argument("--sizes", default="512,768", help="comma-separated square sizes in pixels")
    gpu.add_argument("--steps", type=int, default=50, help="decoder steps")
    gpu.add_argument("--prior-steps", type=int, default=25)
    gpu.add_argument("--rounds", type=int, default=3, help="single-request rounds per side and size (median reported)")
    gpu.add_argument("--batches", default="1,4,8,16", help="concurrent one-image requests for throughput; the largest "
                                                           "is every stage's max_batch_size")
    gpu.add_argument("--load-size", type=int, default=None, help="the open-loop part's size (default: the last of --sizes)")
    gpu.add_argument("--load-duration", type=float, default=30.0, help="seconds of Poisson arrivals per batching policy")
    gpu.add_argument("--capacity-duration", type=float, default=15.0, help="seconds of the closed loop measuring capacity")
    gpu.add_argument("--option", action="append", default=None, metavar="NAME=JSON",
                     help="repeatable: one more service start with JSON as args.performance (per-stage dtype, "
                          "attention, channels_last, compile, compile_mode, batch_buckets, decode_chunk)")
    gpu.add_argument("--skip", default="", help="comma-separated parts to leave out: diffusers, served, load")
    gpu.add_argument("--port", type=int, default=8050)
    gpu.add_argument("--out", default="bench-results/gpu.json")
    gpu.set_defaults(func=_bench("gpu"))
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
