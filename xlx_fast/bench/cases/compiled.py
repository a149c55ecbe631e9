"""The peer a user would try first: the reference itself under ``torch.compile``.

``torch.compile(mode="max-autotune")`` of HF's ``LxmertModel`` (inductor's fused kernels and
GEMM autotuning, and on a GPU CUDA graphs) is what a PyTorch user reaches for before a kernel
library, so whole-model rows (``generate``, ``model_forward``) time it beside xlx_fast (SPEC §6:
"the best peer"). The compiled module is a copy: the reference row keeps the eager HF modules.

Compiling is part of a user's cost, not of a call's: the first call (compilation plus one run)
is timed on its own and reported in the row's note with the mode; the timed calls are warm.
Dynamo recompiles on a new shape, so each case compiles for its own batch.

The full sweep compiles every whole-model row with ``mode="max-autotune"``. A quick sweep cannot
afford that (inductor's GEMM autotuning takes minutes a shape): on a GPU it compiles the bf16
``generate`` rows only, with ``mode="reduce-overhead"`` (inductor's fusions and CUDA graphs
without the GEMM search, where cuBLAS is what the search mostly keeps), and lists the others
unrun; on a CPU it lists them all unrun.
"""
from __future__ import annotations

import copy
import time

import torch

from ..harness import NotAvailable, Spec

NAME = "torch.compile(reference)"
MODE = "max-autotune"
QUICK_MODE = "reduce-overhead"


def mode(spec: Spec) -> str:
    return QUICK_MODE if spec.quick else MODE


def unavailable(spec: Spec, op: str, dtype: torch.dtype) -> NotAvailable | None:
    """Why the compiled peer is not run for this row of this sweep, or None when it is."""
    if not spec.quick:
        return None
    if spec.device.type == "cpu":
        return NotAvailable(f"not in --quick on a CPU: compiling with mode={MODE!r} takes minutes "
                            "here (the full sweep runs it)")
    if op != "generate" or dtype != torch.bfloat16:
        return NotAvailable("--quick compiles the bf16 generate rows only (the full sweep: every "
                            "whole-model row)")
    return None


def compiled_copy(module: torch.nn.Module, attribute: str | None, spec: Spec) -> torch.nn.Module:
    """A deep copy of ``module`` whose ``attribute`` submodule (the whole module when None) is
    wrapped in ``torch.compile`` in the sweep's mode. Compilation happens on the first call."""
    twin = copy.deepcopy(module)
    if attribute is None:
        return torch.compile(twin, mode=mode(spec))
    setattr(twin, attribute, torch.compile(getattr(twin, attribute), mode=mode(spec)))
    return twin


class FirstCallTimer:
    """Wraps a callable; records how long its first call took (compilation + one run), for the
    row's note.

    ``freezing``: compile with inductor's ``freezing=True`` (the weights become constants of
    the graph: folded, and on a CPU prepacked for MKL/oneDNN), the peer of a fast row whose
    weights are frozen (``xlx_fast.freeze``); it applies to no-grad calls, as the rows' are."""

    def __init__(self, fn, spec: Spec, freezing: bool = False):
        self.fn, self.first_s, self.mode, self.freezing = fn, None, mode(spec), freezing

    def __call__(self):
        with torch._inductor.config.patch(freezing=self.freezing):
            return self._call()

    def _call(self):
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
        frozen = ", freezing=True (as the fast row's weights are frozen)" if self.freezing else ""
        return f"mode={self.mode!r}{frozen}; first call (compile + run) {self.first_s:.1f} s"
