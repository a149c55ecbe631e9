"""Fast operators, one module per op: each holds its kernel, its dispatch and its CPU path.

Each op module registers its backends with :mod:`xlx_fast.ops.registry` when imported;
:func:`backends_report` imports them all and says, per op and device here, which backend runs
and why the others do not (``xlx-fast info``).
"""
from __future__ import annotations

import importlib

# the modules that register public ops (sampler_step registers from its backends module)
OP_MODULES = ("attention", "codebook_head", "nearest", "fused_linear", "sampler_backends", "sampler_step",
              "fused_linear_cross_entropy")


def load_all() -> list[str]:
    """Import every op module (registering its backends); returns the registered op names."""
    from . import registry

    for name in OP_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:  # a module of the list that this tree does not have
            if e.name != f"{__name__}.{name}":
                raise
    return registry.registered_ops()


def backends_report() -> list[dict]:
    """Per registered op and device here (the CPU, and CUDA when torch sees a GPU):
    :func:`xlx_fast.ops.registry.explain`'s answer; one per float dtype (``"dtype"`` added)
    where the answer depends on it."""
    import torch

    from . import registry
    from ._common import FLOAT_DTYPES

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for op in load_all():
        for device in devices:
            per_dtype = [registry.explain(op, device, dtype) for dtype in FLOAT_DTYPES]
            if len({r["runs"] for r in per_dtype}) == 1:  # one answer whatever the dtype
                rows.append(registry.explain(op, device))
                continue
            for dtype, r in zip(FLOAT_DTYPES, per_dtype):  # e.g. nearest's bfloat16 screen
                rows.append({**r, "dtype": str(dtype).removeprefix("torch.")})
    return rows


def backends_lines(rows: list[dict]) -> list[str]:
    """``backends_report()`` as text: one line per op and device, the faster backends' reasons."""
    lines = []
    for r in rows:
        runs = r["runs"] or f"none ({r['error']})"
        if r["runs"] and r.get("measured_against"):
            runs += f" or {', '.join(r['measured_against'])}, the faster per shape (measured)"
        skipped = [f"{b['backend']}: {b['why_not']}" for b in r["backends"]
                   if b["backend"] != r["runs"] and not b["usable"]]
        where = r["op"] + " on " + r["device"] + (f" ({r['dtype']})" if r.get("dtype") else "")
        lines.append(f"{where:<38} : {runs}"
                     + (f" (not {'; '.join(skipped)})" if skipped else "")
                     + f"  [registered: {', '.join(b['backend'] for b in r['backends'])}]")
    return lines
