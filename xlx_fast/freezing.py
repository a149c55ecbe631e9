"""``freeze(model)``: declare a model's weights constant, so its CPU GEMMs run against packed weights.

What it does: ``optimize(model)`` (the fused attention, idempotent), then registers the model's
parameters with :mod:`xlx_fast.ops.frozen_weights`. From then on every float32 linear of the
fast paths on a CPU (the step plans' layers, the fused linears, the answer head) multiplies by
a copy of its weight that MKL packed once, instead of MKL packing it again on every call:
the same products, bit for bit F.linear's, about 1.3x faster at batch 1 (see that module).
bfloat16 linears of up to 384 rows do the same with oneDNN where the CPU multiplies bfloat16
natively (AMX or AVX512-BF16): F.linear's product within bf16 rounding, about 1.8x faster.

The promise it asks for: the weights are not written behind torch's back. Changes torch counts
(``load_state_dict``, optimizer steps, in-place ops: a parameter's version counter moves) and
new tensors (``.to()``, a new ``Parameter``) are seen, repacked on next use; a write through
``p.data`` or a numpy view is not, until ``freeze(model)`` is called again. The command line,
the server and the benchmarks freeze the models they build and never edit; a model you edit
that way is left unfrozen (the default): then every weight is read as it is on every call.

The same promise lets the step plans' derived tables (projected codebook, folded head) skip
their bitwise staleness check (``xlx_fast.model_tables``: no bitwise copy of the codebook, no
~5 ms compare per ``generate`` call at the base size), and an engine's folded head joins the
packed weights. Costs one packed copy per weight (about the weights' size again), built on first
use. Where packed GEMMs do not run (no MKL, a GPU, other dtypes) freezing changes only the
tables' check.
"""
from __future__ import annotations

from torch import nn

from .ops import frozen_weights
from .patching import optimize

__all__ = ["freeze", "unfreeze", "is_frozen"]


def freeze(model: nn.Module) -> nn.Module:
    """Optimize ``model`` and declare its weights constant (see the module docstring); a second
    call repacks every weight from its current values. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    optimize(model)
    frozen_weights.register(model)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Drop ``model``'s packed weights: its GEMMs read the weights as they are again."""
    frozen_weights.unregister(model)
    return model


def is_frozen(model: nn.Module) -> bool:
    """Whether ``model`` runs on packed weights (frozen, on a machine where they run)."""
    return frozen_weights.is_frozen(model)
