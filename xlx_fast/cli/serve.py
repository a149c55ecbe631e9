"""``xlx-fast serve``: start (or join) Ray, deploy the image server, print its URL, serve until
Ctrl-C or SIGTERM. It paints (``POST /v1/images/generations``); ``--captions`` adds
``POST /v1/captions`` and ``--answer-task`` (with ``--answer-checkpoint`` and ``--answers`` for
the authors' fine-tuned model) adds ``POST /v1/answers``. ``--arch xuniter`` serves the
single-stream X-UNITER's seeded default (its own paint engine; no ``--checkpoint``, no
``--captions``; answers work, on its codebook). The server binds 127.0.0.1 unless ``--host``
says otherwise; another address needs an API key (or ``--allow-no-key``).

Every argument and file is checked before Ray starts: a bad one is one ``error:`` line and exit
2, not a replica that Ray restarts forever. On a cluster this process joined (``--address``),
stopping deletes only the application it deployed; Serve and Ray are shut down only when this
process started them.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import sys
import time

from . import UserError
from .model_args import add_arch_argument, add_model_arguments, check_arch_options
from .paths import check_input

ANSWER_TASKS = ("vqa", "gqa", "nlvr2")


def add_parser(p) -> None:
    add_model_arguments(p, device_help="cpu or cuda (one GPU per replica; default cpu)")
    add_arch_argument(p)
    p.add_argument("--captions", action="store_true",
                   help="also serve POST /v1/captions (image cluster ids in, a caption out): builds "
                        "the masked-LM head, so a --checkpoint must carry the authors' cls.* keys")
    p.add_argument("--answer-task", choices=ANSWER_TASKS, default=None,
                   help="also serve POST /v1/answers with a question-answering model for this task "
                        "(default: no answer model); without --answer-checkpoint, the seeded "
                        "random default at --size (garbage answers, real costs)")
    p.add_argument("--answer-checkpoint", default=None,
                   help="the authors' fine-tuned state dict for --answer-task (needs --vocab)")
    p.add_argument("--answers", default=None,
                   help="the answer table of --answer-task: label2ans JSON list or ans2label JSON "
                        "object (needed with --answer-checkpoint for vqa and gqa)")
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
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: loopback only); any other address needs an API "
                        "key, or --allow-no-key")
    p.add_argument("--allow-no-key", action="store_true",
                   help="let a non-loopback --host serve without an API key (anyone who can reach "
                        "it can generate)")
    p.add_argument("--app-name", default="xlx_fast",
                   help="the Ray Serve application's name (default xlx_fast); on a shared cluster, "
                        "one that is not running yet")
    p.add_argument("--body-timeout-s", type=float, default=10.0,
                   help="a request body must arrive in full within this (else 408; default 10)")
    p.add_argument("--max-slow-bodies", type=int, default=4,
                   help="request bodies arriving slowly from one client address at once, per "
                        "replica (more: 429; default 4)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None,
                   help="join an existing Ray cluster (e.g. ray://head:10001 or auto); "
                        "default: start a local one")
    p.add_argument("--api-key", default=None,
                   help="require this key (Authorization: Bearer KEY) on every route but /health; "
                        "default: $XLX_FAST_API_KEY if set, else no key")


def app_args(args) -> dict:
    """The application builder's arguments for these command-line options (ValueError if bad;
    UserError, before torch is imported, for an option ``--arch`` does not support)."""
    check_arch_options(args, captions="--captions" if args.captions else None)
    from xlx_fast.serving.service import ServerOptions

    for name in ("max_batch", "max_queue", "max_steps", "replicas", "max_slow_bodies"):
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
    if not args.body_timeout_s > 0:
        raise ValueError(f"--body-timeout-s must be > 0, got {args.body_timeout_s}")
    if args.answer_task is None:
        for option in ("answer_checkpoint", "answers"):
            if getattr(args, option) is not None:
                raise ValueError(f"--{option.replace('_', '-')} needs --answer-task "
                                 f"({', '.join(ANSWER_TASKS)})")
    elif args.answer_checkpoint is not None and args.answers is None and args.answer_task != "nlvr2":
        raise ValueError(f"--answer-checkpoint needs --answers, the {args.answer_task} answer table "
                         "its head was trained with (label2ans or ans2label JSON)")
    model = {"checkpoint": args.checkpoint, "centroids": args.centroids, "generator": args.generator,
             "vocab": args.vocab, "size": args.size, "arch": args.arch, "grid": args.grid,
             "device": args.device,
             "dtype": args.dtype,
             "answer_task": args.answer_task, "answer_checkpoint": args.answer_checkpoint,
             "answers": args.answers}
    model = {k: v for k, v in model.items() if v is not None}
    if args.captions:
        model["captions"] = True
    if args.size == "tiny" and args.checkpoint is None:
        model["image_size"] = 256  # the API's one size; the tiny generator paints it cheaply
    key = args.api_key if args.api_key is not None else os.environ.get("XLX_FAST_API_KEY")
    out = {"model": model, "slots": args.max_batch, "max_queue": args.max_queue,
           "max_steps": args.max_steps, "default_timeout_ms": args.timeout_ms, "api_key": key or "",
           "body_timeout_s": args.body_timeout_s, "max_slow_bodies": args.max_slow_bodies,
           "deployment": {"num_replicas": args.replicas,
                          "ray_actor_options": {"num_cpus": cpus}}}
    ServerOptions.from_dict({k: v for k, v in out.items() if k != "deployment"})  # validate now
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_device(args) -> None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise UserError(f"--device {args.device}: use cpu, cuda or cuda:N")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
        index = int(args.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {args.device}: there are only {torch.cuda.device_count()} "
                            "CUDA device(s)")


def check_args(args, build: dict) -> None:
    """What can be checked without Ray besides the device: the files, the exposure (UserError)."""
    for option in ("checkpoint", "centroids", "generator"):
        if getattr(args, option) is not None:
            check_input(getattr(args, option), f"--{option}")
    if args.vocab is not None:
        check_input(args.vocab, "--vocab", directory_ok=True)
    if args.answer_checkpoint is not None:
        check_input(args.answer_checkpoint, "--answer-checkpoint")
        if args.vocab is None:
            raise UserError("--answer-checkpoint: a fine-tuned model needs the vocabulary it was "
                            "trained with: give --vocab (BERT-base-uncased vocab.txt)")
    if args.answers is not None:
        check_input(args.answers, "--answers")
        _check_answer_table(args)
    if not build["api_key"] and not is_loopback(args.host) and not args.allow_no_key:
        raise UserError(f"--host {args.host} serves beyond this machine without an API key: set "
                        "--api-key (or $XLX_FAST_API_KEY), or pass --allow-no-key to serve it open")


def _check_answer_table(args) -> None:
    """The table reads as one, and (for the random default) has the task's answer count."""
    from xlx_fast.models.answering import TASKS, read_answer_table

    try:
        labels = read_answer_table(args.answers)
    except (OSError, ValueError) as e:
        raise UserError(f"--answers {args.answers}: {e}") from None
    n = TASKS[args.answer_task].n_answers
    if args.answer_checkpoint is None and len(labels) != n:
        raise UserError(f"--answers {args.answers}: {len(labels)} answers, but the {args.answer_task} "
                        f"head of the default model has {n}")


class _Stop(Exception):
    """SIGTERM (a container runtime, systemd): stop as Ctrl-C does."""


def _raise_stop(signum, frame):
    raise _Stop()


def _quiet_ray() -> None:
    """Ray's start-up and shutdown INFO lines (and its notice that token authentication is on,
    which stays on) are not this command's output; its warnings and errors still show."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def run(args) -> int:
    # a cluster of our own unless told to join one (ray.init() alone would join a cluster that
    # `ray start` left running on this machine, and then stopping must not end it)
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    own_ray = address == "local"
    if own_ray and "ray" not in sys.modules:
        # a cluster of our own: token authentication on, as Ray would, without its notice (read
        # when Ray is imported)
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    check_device(args)
    try:
        build = app_args(args)
    except ValueError as e:
        raise UserError(str(e).removeprefix("model spec: ").removeprefix("server options: ")) from None
    check_args(args, build)
    try:
        import ray
        from ray import serve
        from ray.serve.context import _get_global_client
    except ImportError:
        raise UserError('serving needs Ray Serve: pip install "xlx_fast[serve]"') from None
    from xlx_fast.serving import build_app

    _quiet_ray()
    # SIGTERM before Ray is up: the same clean stop (ray.init installs a crash-dump handler,
    # replaced again below)
    signal.signal(signal.SIGTERM, _raise_stop)
    deployed = serve_started = False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        signal.signal(signal.SIGTERM, _raise_stop)
        client = _get_global_client(raise_if_no_controller_running=False)
        if client is not None:  # a Serve instance someone else runs: share it, change nothing
            _check_shared_serve(client, serve, args)
        else:
            # idle keep-alive connections hold a socket each in the proxy: 5 s, not Ray's 90
            serve.start(http_options={"host": args.host, "port": args.port,
                                      "keep_alive_timeout_s": 5})
            serve_started = True
        deployed = True
        serve.run(build_app(build), name=args.app_name, route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        routes = [f"POST {url}/v1/images/generations"]
        if args.captions:
            routes.append(f"POST {url}/v1/captions")
        if args.answer_task is not None:
            routes.append(f"POST {url}/v1/answers ({args.answer_task})")
        print(f"serving on {url}  ({', '.join(routes)}, GET {url}/health, GET {url}/metrics); "
              "Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, _Stop):
        print("stopping", file=sys.stderr)
    finally:
        # a second Ctrl-C or SIGTERM (or one sent to the whole process group) must not cut the
        # shutdown short with a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(ray, serve, args.app_name, own_ray=own_ray, deployed=deployed,
              serve_started=serve_started)
    return 0


def _check_shared_serve(client, serve, args) -> None:
    """Joining a running Serve instance: its HTTP address is fixed, and an application of ours
    must not replace someone else's."""
    http = client.http_config
    if (http.host, http.port) != (args.host, args.port):
        raise UserError(f"this Ray cluster's Serve already listens on {http.host}:{http.port}; "
                        f"pass --host {http.host} --port {http.port} to serve there")
    if args.app_name in serve.status().applications:
        raise UserError(f"a Serve application named {args.app_name!r} already runs on this "
                        "cluster; choose another --app-name")


def _stop(ray, serve, name: str, *, own_ray: bool, deployed: bool, serve_started: bool) -> None:
    """Leave a joined cluster as it was; end our own with everything on it (ray.shutdown stops
    Serve's processes with the rest: serve.shutdown first only adds a controller that kills
    itself under its own shutdown call, which Ray reports as a failed task)."""
    if not ray.is_initialized():
        return
    if not own_ray:
        try:
            # Serve this process started goes with it, unless others deployed into it meanwhile
            if serve_started and set(serve.status().applications) <= {name}:
                serve.shutdown()
            elif deployed:
                serve.delete(name)
        except Exception as e:  # Ray's own processes may be gone already
            print(f"Ray Serve did not shut down cleanly ({type(e).__name__}); its processes end "
                  "with this one", file=sys.stderr)
    ray.shutdown()  # our own cluster: stopped; a joined one: disconnected
