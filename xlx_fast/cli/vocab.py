"""``xlx-fast vocab fit|assign``: fit a k-means visual vocabulary, or map features onto one.

    xlx-fast vocab fit features.npy -o centroids.npy -k 10000 --iters 20 --seed 0
    xlx-fast vocab assign features.npy centroids.npy -o ids.npy [--distances dist.npy]

Features are [N, D] float ``.npy`` files, read memory-mapped. Counts and output paths are
checked before anything is read or computed; outputs get the ``.npy`` extension numpy adds,
and the messages name the files actually written.
"""
from __future__ import annotations

import argparse
import json
import os
import re

from . import UserError
from .paths import check_input, check_output, makedirs_for


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _npy(path: str) -> str:
    """The file ``numpy.save(path, ...)`` writes: ``.npy`` is appended when missing."""
    return path if path.endswith(".npy") else path + ".npy"


def _check_device(device: str) -> None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"--device {device}: use cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu")


def add_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vocab_command", metavar="ACTION")
    sub.required = True

    fit = sub.add_parser("fit", help="k-means over features (FAISS semantics)",
                         description="Fit a k-means codebook over [N, D] features.")
    fit.add_argument("features", help="[N, D] float .npy (memory-mapped)")
    fit.add_argument("-o", "--output", required=True, help="where to write the float32 [k, D] centroids (.npy is added when missing)")
    fit.add_argument("-k", "--clusters", type=_int_at_least(1), default=10000, help="number of centroids (default 10000)")
    fit.add_argument("--iters", type=_int_at_least(0), default=20, help="Lloyd iterations (default 20)")
    fit.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    fit.add_argument("--max-points-per-centroid", type=_int_at_least(1), default=256,
                     help="subsample to k times this many points (default 256)")
    fit.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    fit.add_argument("--objective", help="also write the per-iteration objective as JSON here")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    asg = sub.add_parser("assign", help="nearest centroid id of every feature row",
                         description="Map [N, D] features to their nearest centroid ids.")
    asg.add_argument("features", help="[N, D] float .npy (memory-mapped)")
    asg.add_argument("centroids", help="[K, D] float .npy")
    asg.add_argument("-o", "--output", required=True, help="where to write the int64 [N] ids (.npy is added when missing)")
    asg.add_argument("--distances", help="also write float32 squared distances here (.npy is added when missing)")
    asg.add_argument("--chunk", type=_int_at_least(1), default=65536, help="rows per step (default 65536)")
    asg.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    asg.add_argument("--quiet", action="store_true", help="no progress bar")


def check_args(args: argparse.Namespace) -> None:
    """Inputs readable, outputs writable, device usable: before any data is read."""
    check_input(args.features, "features")
    if args.vocab_command == "assign":
        check_input(args.centroids, "centroids")
    for option, path in (("-o", args.output), ("--distances", getattr(args, "distances", None))):
        if path and os.path.isdir(path):  # numpy would write PATH.npy beside it
            raise UserError(f"{option} {path} is a directory; give a file name, e.g. "
                            f"{os.path.join(path, 'out.npy')}")
    outputs = [("-o", _npy(args.output))]
    if getattr(args, "distances", None):
        outputs.append(("--distances", _npy(args.distances)))
    if getattr(args, "objective", None):
        outputs.append(("--objective", args.objective))
    paths = [path for _, path in outputs]
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise UserError(f"the output files must differ, got {', '.join(paths)}")
    for option, path in outputs:
        check_output(path, option)
    _check_device(args.device)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    import numpy as np

    from xlx_fast.vocab import assign, kmeans

    output = _npy(args.output)
    try:
        if args.vocab_command == "fit":
            res = kmeans(args.features, k=args.clusters, n_iter=args.iters, seed=args.seed,
                         max_points_per_centroid=args.max_points_per_centroid,
                         progress=not args.quiet, device=args.device)
        else:
            out = assign(args.features, args.centroids, chunk=args.chunk, device=args.device,
                         return_distance=bool(args.distances), progress=not args.quiet)
    except (ValueError, TypeError, OSError) as e:
        # vocab validates its inputs (files, shapes, dtypes, NaN/inf rows) before computing
        raise UserError(f"vocab {args.vocab_command}: {e}") from None

    try:
        makedirs_for(output)
        if args.vocab_command == "fit":
            np.save(output, res.centroids.cpu().numpy())
            if args.objective:
                makedirs_for(args.objective)
                with open(args.objective, "w") as f:
                    json.dump({"objective": res.objective, "n_split": res.n_split,
                               "n_train": res.n_train}, f, indent=1)
            first, last = (res.objective[0], res.objective[-1]) if res.objective else (None, None)
            trend = f"objective {first:.6g} -> {last:.6g} over {len(res.objective)} iterations" \
                if res.objective else "no iterations (the initial centroids)"
            print(f"k={args.clusters}: {trend} on {res.n_train} points; wrote {output}")
            return 0
        ids, dist = out if args.distances else (out, None)
        np.save(output, ids)
        written = [output]
        if dist is not None:
            np.save(_npy(args.distances), dist)
            written.append(_npy(args.distances))
        print(f"assigned {len(ids)} rows; wrote {', '.join(written)}")
        return 0
    except OSError as e:
        raise UserError(f"could not write the output ({e})") from None
