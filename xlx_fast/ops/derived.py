"""Values derived from a tensor once and reused while the tensor is unchanged (a codebook's
norms, an fp32 copy of a half weight): the ops call them every step with the same weights.

An entry is keyed on the tensor object (a weak reference, so it goes when the tensor dies and
a new tensor at a recycled address is never mistaken for it) and checked against the tensor's
data pointer, version counter (bumped by every in-place edit), shape, strides, dtype and
device, so an edited tensor is derived again.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch

__all__ = ["derived", "widened"]

# (kind, id(tensor)) -> (weakref, signature, value)
_CACHE: dict[tuple[str, int], tuple] = {}


def derived(t: torch.Tensor, kind: str, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(t)``, cached under ``kind`` for as long as ``t`` lives unchanged."""
    key = (kind, id(t))
    sig = (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is t and hit[1] == sig:
        return hit[2]
    value = make(t)
    try:
        ref = weakref.ref(t, lambda _r, k=key: _CACHE.pop(k, None))
    except TypeError:  # pragma: no cover - tensors that cannot be weakly referenced
        return value
    _CACHE[key] = (ref, sig, value)
    return value


def widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 (itself if it already is), the copy made once per unchanged tensor: the CPU
    GEMMs of the codebook ops run in fp32, where products of half values are exact."""
    if t.dtype == torch.float32:
        return t
    return derived(t, "fp32", torch.Tensor.float)
