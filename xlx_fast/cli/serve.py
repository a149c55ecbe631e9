"""``xlx-fast serve``: start (or join) Ray, deploy the image server, print its URL, serve until
Ctrl-C. The server binds 127.0.0.1 unless ``--host`` says otherwise."""
from __future__ import annotations

import os
import signal
import sys
import time

from . import UserError
from .model_args import add_model_arguments


def add_parser(p) -> None:
    add_model_arguments(p, device_help="cpu or cuda (one GPU per replica; default cpu)")
    p.add_argument("--max-batch", type=int, default=32, help="engine slots per replica")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests per replica before 429")
    p.add_argument("--max-steps", type=int, default=256, help="largest 'steps' a request may ask")
    p.add_argument("--timeout-ms", type=int, default=None,
                   help="deadline for requests that give no timeout_ms (default: none)")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas")
    p.add_argument("--cpus-per-replica", type=float, default=None,
                   help="Ray CPUs per replica, which Ray also gives torch as its thread count "
                        "(default: 1 with --device cuda; with a CPU model, this machine's cores "
                        "shared among the replicas)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None,
                   help="join an existing Ray cluster (e.g. ray://head:10001 or auto); "
                        "default: start a local one")
    p.add_argument("--api-key", default=None,
                   help="require this key (Authorization: Bearer KEY) on every route but /health; "
                        "default: $XLX_FAST_API_KEY if set, else no key")


def app_args(args) -> dict:
    """The application builder's arguments for these command-line options (ValueError if bad)."""
    from xlx_fast.serving.service import ServerOptions

    for name in ("max_batch", "max_queue", "max_steps", "replicas"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    cpus = args.cpus_per_replica
    if cpus is not None and not cpus >= 0:
        raise ValueError(f"--cpus-per-replica must be >= 0, got {cpus}")
    if cpus is None:
        cpus = 1 if args.device.startswith("cuda") else max(1, (os.cpu_count() or 1) // args.replicas)
    if args.timeout_ms is not None and args.timeout_ms < 1:
        raise ValueError(f"--timeout-ms must be >= 1, got {args.timeout_ms}")
    model = {"checkpoint": args.checkpoint, "centroids": args.centroids, "generator": args.generator,
             "vocab": args.vocab, "size": args.size, "device": args.device, "dtype": args.dtype}
    model = {k: v for k, v in model.items() if v is not None}
    if args.size == "tiny" and args.checkpoint is None:
        model["image_size"] = 256  # the API's one size; the tiny generator paints it cheaply
    key = args.api_key if args.api_key is not None else os.environ.get("XLX_FAST_API_KEY")
    out = {"model": model, "slots": args.max_batch, "max_queue": args.max_queue,
           "max_steps": args.max_steps, "default_timeout_ms": args.timeout_ms, "api_key": key or "",
           "deployment": {"num_replicas": args.replicas,
                          "ray_actor_options": {"num_cpus": cpus}}}
    ServerOptions.from_dict({k: v for k, v in out.items() if k != "deployment"})  # validate now
    return out


def run(args) -> int:
    try:
        build = app_args(args)
    except ValueError as e:
        raise UserError(str(e).removeprefix("model spec: ").removeprefix("server options: ")) from None
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA device is available")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError('serving needs Ray Serve: pip install "xlx_fast[serve]"') from None
    from xlx_fast.serving import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(build), name="xlx_fast", route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        print(f"serving on {url}  (POST {url}/v1/images/generations, GET {url}/health, "
              f"GET {url}/metrics); Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        # a second Ctrl-C (or one sent to the whole process group) must not cut the shutdown
        # short with a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            serve.shutdown()
        except Exception as e:  # Ray's own processes may be gone already
            print(f"Ray Serve did not shut down cleanly ({type(e).__name__}); its processes end "
                  "with this one", file=sys.stderr)
        ray.shutdown()
    return 0
