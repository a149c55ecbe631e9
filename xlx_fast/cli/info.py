"""``xlx-fast info`` and ``xlx_fast.info()``: what was built (C++/CUDA kernels, archs), what is
usable here, and which backend each op runs with and why.

It sits above the ops because the last part is theirs to decide (the sampler step probes its
CUDA backends with a test launch); the build and machine facts come from ``xlx_fast.native``.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def report() -> dict:
    """``native.report()`` plus the sampler step's CUDA backend and why."""
    from xlx_fast import native
    from xlx_fast.ops import backends_report
    from xlx_fast.ops.sampler_backends import cuda_choice_here

    from xlx_fast.ops import frozen_weights

    r = native.report()
    backend, why = cuda_choice_here(native.driver_version(), r["cuda_device_reason"])
    return {**r, "sampler_step_cuda": backend, "sampler_step_cuda_reason": why,
            "packed_cpu_gemms": frozen_weights.available(), "ops": backends_report()}


def info(file=None) -> None:
    """Print what was built and what is usable here."""
    from xlx_fast import native
    from xlx_fast.ops import backends_lines

    r = report()
    lines = native.report_lines(r)
    lines.append(f"sampler_step on CUDA   : {r['sampler_step_cuda']} ({r['sampler_step_cuda_reason']})")
    packed = ("yes (MKL packed sgemm)" if r["packed_cpu_gemms"]
              else "no (torch without MKL): freezing changes nothing here")
    lines.append(f"frozen weights on CPU  : {packed}  [xlx_fast.freeze]")
    lines += backends_lines(r["ops"])
    print("\n".join(lines), file=file or sys.stdout)


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(report(), indent=2))
    else:
        info()
    return 0
