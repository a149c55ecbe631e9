"""``xlx-fast bench-serve``: latency under load of the serving schedulers (sequential,
request-level batching, step-level joining) on one model and device, in-process and/or over
HTTP (Ray Serve on 127.0.0.1), or against a running server (``--url``); JSON + plot."""
from __future__ import annotations

import json
import os
import time

from . import UserError
from ..archs import ARCHS
from .model_args import add_arch_argument, add_model_arguments, check_arch_options


def add_parser(p) -> None:
    p.add_argument("--mode", default="inproc", choices=["inproc", "http", "both"],
                   help="inproc: the engine driven directly (no Ray); http: Ray Serve on 127.0.0.1")
    p.add_argument("--url", default=None,
                   help="load a running server instead (one scheduler: whatever it runs)")
    p.add_argument("--allow-remote", action="store_true",
                   help="let --url name a non-loopback host (default: 127.0.0.1/localhost only)")
    p.add_argument("--api-key", default=None, help="key for --url (default: $XLX_FAST_API_KEY)")
    add_model_arguments(p)
    add_arch_argument(p)
    p.add_argument("--slots", type=int, default=8, help="engine batch capacity")
    p.add_argument("--schedulers", default="sequential,request,step")
    p.add_argument("--load", default="0.3,0.5,0.7,0.9,1.5",
                   help="offered loads as fractions of the step scheduler's saturation, measured "
                        "first (of the static-batch estimate when --schedulers leaves step out)")
    p.add_argument("--rps", default=None, help="with --url: offered loads in requests/s")
    p.add_argument("--requests", type=int, default=60, help="requests per load level (a bound)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="sending time per load level (a bound)")
    p.add_argument("--slo-ms", type=float, default=None,
                   help="goodput SLO (default: 4x a static batch's generate+paint time)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0, help="request-level batcher's wait")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench-out", help="where the JSON and plot go (default: ./bench-out)")
    p.add_argument("--name", default=None, help="output file stem (default: serving_<device>_<date>)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: comma-separated numbers expected, got {text!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise ValueError(f"{what}: positive numbers expected, got {text!r}")
    return vals


def _run_url(args) -> dict:
    import asyncio

    import aiohttp

    from xlx_fast.bench.loadgen import check_target, http_sender, make_trace, run_open_loop, summarize

    url = check_target(args.url, args.allow_remote)
    if args.rps is None:
        raise ValueError("--url needs --rps (the offered loads in requests/s)")
    rates = _floats(args.rps, "--rps")
    key = args.api_key or os.environ.get("XLX_FAST_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    slo = (args.slo_ms or 10_000) / 1000
    trace = make_trace(max(args.requests, 64), seed=args.seed)

    async def go():
        async with aiohttp.ClientSession() as session:
            send = http_sender(session, url, headers)
            rows = []
            for k, rate in enumerate(rates):
                run = await run_open_loop(send, trace, rate, max_requests=args.requests,
                                          max_seconds=args.max_seconds, seed=args.seed + k)
                rows.append({**summarize(run, rate, slo), "mean_occupancy": None})
            return rows

    return {"meta": {"url": url, "slo_s": slo, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "modes": {"url": {"server": asyncio.run(go())}}}


def _tasks(arch: str) -> tuple[str, ...]:
    """The other routes loaded beside images: captions where the architecture has the caption
    engine; answers always (the answer model is X-LXMERT's, reading the painter's codebook)."""
    from xlx_fast.bench.serving import TASKS

    return tuple(t for t in TASKS if t != "captions" or ARCHS[arch].captions)


def run(args) -> int:
    from xlx_fast.serving.policies import POLICIES

    check_arch_options(args)
    try:
        if args.slots < 1 or args.requests < 1 or not args.max_seconds > 0:
            raise ValueError("--slots and --requests must be >= 1, --max-seconds > 0")
        if args.url is not None:
            result = _run_url(args)
        else:
            from xlx_fast.bench import serving as benchmark
            from xlx_fast.serving.model_spec import ModelSpec

            policies = [s.strip() for s in args.schedulers.split(",") if s.strip()]
            bad = [s for s in policies if s not in POLICIES]
            if bad or not policies:
                raise ValueError(f"--schedulers: choose from {', '.join(POLICIES)}, got {args.schedulers!r}")
            spec = {k: v for k, v in dict(checkpoint=args.checkpoint, centroids=args.centroids,
                                            generator=args.generator, vocab=args.vocab,
                                            device=args.device, dtype=args.dtype).items() if v is not None}
            spec["size"], spec["grid"], spec["arch"] = args.size, args.grid, args.arch
            if args.size == "tiny":
                spec["image_size"] = 256  # the API's size; the tiny generator paints it cheaply
            ModelSpec.from_dict(spec)
            modes = ("inproc", "http") if args.mode == "both" else (args.mode,)
            if "http" in modes:
                try:
                    import ray  # noqa: F401
                except ImportError:
                    raise ValueError('--mode http needs Ray Serve: pip install "xlx_fast[serve]" '
                                     "(or use --mode inproc)") from None
            result = benchmark.run_benchmark(
                spec, modes=modes, slots=args.slots, policies=policies,
                fractions=_floats(args.load, "--load"), requests=args.requests,
                max_seconds=args.max_seconds,
                slo_s=None if args.slo_ms is None else args.slo_ms / 1000,
                batch_wait_ms=args.batch_wait_ms, seed=args.seed, tasks=_tasks(args.arch))
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e).removeprefix("model spec: ")) from None

    os.makedirs(args.out_dir, exist_ok=True)
    stem = args.name or f"serving_{args.device.replace(':', '')}_{time.strftime('%Y%m%d')}"
    path = os.path.join(args.out_dir, stem + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    from xlx_fast.bench.serving import plot, table

    if "capacity_rps" in result:
        if not args.no_plot:
            plot(result, os.path.join(args.out_dir, stem + ".png"))
        print(f"static-batch generate: {result['static_generate']['generate_images_per_s']:.2f} images/s "
              f"(batch {result['static_generate']['batch']}); capacity estimate "
              f"{result['capacity_rps']:.2f} rps; SLO {result['meta']['slo_s']:.3f} s")
        for mode, basis in result.get("load_basis", {}).items():
            print(f"{mode}: loads are fractions of {basis['rps']:.2f} rps, {basis['what']}")
    print(table(result))
    if "summary" in result:
        print(json.dumps(result["summary"], indent=1))
    print(f"wrote {path}")
    return 0
