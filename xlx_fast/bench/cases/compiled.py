"""The peer a user would try first: the reference itself under ``torch.compile``.

``torch.compile(mode="max-autotune")`` of HF's ``LxmertModel`` (inductor's fused kernels and
GEMM autotuning, and on a GPU CUDA graphs) is what a PyTorch user reaches for before a kernel
library, so whole-model rows (``generate``, ``model_forward``) time it beside xlx_fast (SPEC §6:
"the best peer"). The compiled module is a copy: the reference row keeps the eager HF modules.

Compiling is part of a user's cost, not of a call's: the first call (compilation plus one run)
is timed on its own and reported in the row's note; the timed calls are warm. Dynamo recompiles
on a new shape, so each case compiles for its own batch.

On a CPU with ``--quick`` the peer is listed but not run: inductor's autotuning takes minutes on
two cores, longer than the whole quick sweep may take. The full sweep runs it everywhere.
"""
from __future__ import annotations

import copy
import time

import torch

from ..harness import NotAvailable, Spec

NAME = "torch.compile(reference)"
MODE = "max-autotune"


def unavailable(spec: Spec) -> NotAvailable | None:
    """Why the compiled peer is not run in this sweep, or None when it is."""
    if spec.device.type == "cpu" and spec.quick:
        return NotAvailable(f"not in --quick on a CPU: compiling with mode={MODE!r} takes minutes "
                            "here (the full sweep runs it)")
    return None


def compiled_copy(module: torch.nn.Module, attribute: str | None = None) -> torch.nn.Module:
    """A deep copy of ``module`` whose ``attribute`` submodule (the whole module when None) is
    wrapped in ``torch.compile(mode=MODE)``. Compilation itself happens on the first call."""
    twin = copy.deepcopy(module)
    if attribute is None:
        return torch.compile(twin, mode=MODE)
    setattr(twin, attribute, torch.compile(getattr(twin, attribute), mode=MODE))
    return twin


class FirstCallTimer:
    """Wraps a callable; records how long its first call took (compilation + one run), for the
    row's note."""

    def __init__(self, fn):
        self.fn, self.first_s = fn, None

    def __call__(self):
        if self.first_s is not None:
            return self.fn()
        t0 = time.perf_counter()
        out = self.fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.first_s = time.perf_counter() - t0
        return out

    def note(self) -> str:
        if self.first_s is None:
            return ""
        return f"mode={MODE!r}; first call (compile + run) {self.first_s:.1f} s"
