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
            "packed_cpu_gemms": {str(d).removeprefix("torch."): frozen_weights.available(d)
                                 for d in frozen_weights.PACKERS},
            "ops": backends_report()}


def info(file=None) -> None:
    """Print what was built and what is usable here."""
    from xlx_fast import native
    from xlx_fast.ops import backends_lines

    r = report()
    lines = native.report_lines(r)
    lines.append(f"sampler_step on CUDA   : {r['sampler_step_cuda']} ({r['sampler_step_cuda_reason']})")
    from xlx_fast.ops.frozen_weights import PACKERS

    packers = {str(d).removeprefix("torch."): p.library for d, p in PACKERS.items()}
    packed = ", ".join(f"{name} ({packers[name]})" for name, ok in r["packed_cpu_gemms"].items() if ok)
    missing = [name for name, ok in r["packed_cpu_gemms"].items() if not ok]
    text = f"yes for {packed}" if packed else "no: freezing changes only the tables' check here"
    why = {"float32": "torch without MKL", "bfloat16": "no native bfloat16 on this CPU"}
    if packed and missing:
        text += "; not " + ", ".join(f"{name} ({why.get(name, 'no packer')})" for name in missing)
    lines.append(f"frozen weights on CPU  : {text}  [xlx_fast.freeze]")
    lines += backends_lines(r["ops"])
    print("\n".join(lines), file=file or sys.stdout)


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(report(), indent=2))
    else:
        info()
    return 0
