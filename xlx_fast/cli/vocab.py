"""``xlx-fast vocab fit|assign``: fit a k-means visual vocabulary, or map features onto one.

    xlx-fast vocab fit features.npy -o centroids.npy -k 10000 --iters 20 --seed 0
    xlx-fast vocab assign features.npy centroids.npy -o ids.npy [--distances dist.npy]

Features are [N, D] float ``.npy`` files, read memory-mapped.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vocab_command", metavar="ACTION")
    sub.required = True

    fit = sub.add_parser("fit", help="k-means over features (FAISS semantics)",
                         description="Fit a k-means codebook over [N, D] features.")
    fit.add_argument("features", help="[N, D] float .npy (memory-mapped)")
    fit.add_argument("-o", "--output", required=True, help="where to write the float32 [k, D] centroids (.npy)")
    fit.add_argument("-k", "--clusters", type=int, default=10000, help="number of centroids (default 10000)")
    fit.add_argument("--iters", type=int, default=20, help="Lloyd iterations (default 20)")
    fit.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    fit.add_argument("--max-points-per-centroid", type=int, default=256,
                     help="subsample to k times this many points (default 256)")
    fit.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    fit.add_argument("--objective", help="also write the per-iteration objective as JSON here")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    asg = sub.add_parser("assign", help="nearest centroid id of every feature row",
                         description="Map [N, D] features to their nearest centroid ids.")
    asg.add_argument("features", help="[N, D] float .npy (memory-mapped)")
    asg.add_argument("centroids", help="[K, D] float .npy")
    asg.add_argument("-o", "--output", required=True, help="where to write the int64 [N] ids (.npy)")
    asg.add_argument("--distances", help="also write float32 squared distances here (.npy)")
    asg.add_argument("--chunk", type=int, default=65536, help="rows per step (default 65536)")
    asg.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    asg.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from xlx_fast.vocab import assign, kmeans

    try:
        if args.vocab_command == "fit":
            res = kmeans(args.features, k=args.clusters, n_iter=args.iters, seed=args.seed,
                         max_points_per_centroid=args.max_points_per_centroid,
                         progress=not args.quiet, device=args.device)
            np.save(args.output, res.centroids.cpu().numpy())
            if args.objective:
                with open(args.objective, "w") as f:
                    json.dump({"objective": res.objective, "n_split": res.n_split,
                               "n_train": res.n_train}, f, indent=1)
            if res.objective:
                print(f"k={args.clusters}: objective {res.objective[0]:.6g} -> {res.objective[-1]:.6g} "
                      f"over {len(res.objective)} iterations on {res.n_train} points; wrote {args.output}")
            return 0
        out = assign(args.features, args.centroids, chunk=args.chunk, device=args.device,
                     return_distance=bool(args.distances), progress=not args.quiet)
        ids, dist = out if args.distances else (out, None)
        np.save(args.output, ids)
        if dist is not None:
            np.save(args.distances, dist)
        print(f"assigned {len(ids)} rows; wrote {args.output}")
        return 0
    except (ValueError, TypeError, OSError) as e:
        print(f"xlx-fast vocab {args.vocab_command}: error: {e}", file=sys.stderr)
        return 2
