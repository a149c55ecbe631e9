"""Frozen weights: GEMMs on a CPU against weights packed once (float32: MKL, bfloat16: oneDNN).

Math. ``linear(x, W, b)`` is ``x·Wᵀ + b``, F.linear's result: the library F.linear calls, on the
same panels, bias added as F.linear adds it (the tests compare it with F.linear).

Why. A CPU GEMM copies its B operand, the weight, into cache-blocked panels on every call. At
the row counts of inference that copy is a large part of the call. float32 (MKL's sgemm), on
the 2-core Xeon of the committed CPU results: [64, 768] x [768, 3072] took 1.0 ms and 0.75 ms
against a weight packed once (``cblas_sgemm_pack``), [16, 768] x [768, 3072] 0.42 and 0.27 ms,
[512, 768] x [768, 3072] 5.9 and 5.5 ms. bfloat16 (oneDNN's AMX kernels) gains more, since the
products themselves are cheaper: [64, 768] x [768, 3072] 0.35 and 0.18 ms, [20, 768] x
[768, 768] 0.065 and 0.034 ms. A packed copy built once and reused skips the copy.

Contract. A packed copy is derived from the weight's values, so it is right only while the
weight keeps them. Packing is therefore opt-in, per model: :func:`register` (through
``xlx_fast.freeze(model)``) declares the model's parameters constant. While a model is frozen:

- a weight that torch sees change in place (``load_state_dict``, an optimizer step, ``p.mul_``
  under ``no_grad``: its version counter moves) is repacked on its next use;
- a weight replaced by a new tensor (``.to()``, a new ``Parameter``) is not frozen: it runs
  unpacked (F.linear, right and slower) until the model is frozen again, and the table keeps the
  old tensors alive until then (so that no other tensor can take their addresses);
- a write torch does not count (``p.data.copy_``, a numpy view of the storage) is NOT seen: that
  is what freezing promises not to do. ``xlx_fast.freeze(model)`` again repacks everything;
  ``xlx_fast.unfreeze(model)`` drops the copies.

Unfrozen models, and every GEMM outside a packer's rows (:data:`PACKERS`), take ``F.linear``
(nothing cached, every edit seen). Where: CPU tensors, inference only (no tensor needing a
gradient); float32 with torch built with MKL (the x86 wheels); bfloat16 where oneDNN multiplies
it natively (AMX or AVX512-BF16: :func:`available`). Cost: one packed copy per weight view
used, about the weight's size (the base X-LXMERT in float32: about 730 MB more), built on its
first use.

float32 packs for 512 rows (``PACK_ROWS``): MKL blocks the panels for the row count it is
given, and a weight packed for 512 served 16, 64, 96 and 512 rows as fast as one packed for each
(measured there); one copy per weight serves every batch. bfloat16 packs for 64 rows and runs
packed up to 384 (``BF16_MAX_ROWS``): above that F.linear's oneDNN call takes another kernel,
faster than the packed one (448 rows of [768, 3072]: 0.6x packed) and with other bits.

Tables derived from the weights (an engine's folded head) join the frozen model's packing
with :func:`adopt`, for as long as they live. The promise also
lets those tables skip their bitwise staleness check (``xlx_fast.model_tables``):
:func:`generation` tells them which ``freeze`` they were built under, also where packed GEMMs
do not run (the promise is the same there).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._common import native_bf16_dot

__all__ = ["available", "register", "unregister", "is_frozen", "is_packed", "linear", "packed_count",
           "generation", "adopt", "PACKERS"]

PACK_ROWS = 512
# up to this many rows MKL's matrix-vector path reads the plain weight as fast as the packed one
# (1-2 rows: 0.18 ms either way at 768 x 3072), and packing it would only cost memory
GEMV_ROWS = 4
BF16_PACK_ROWS = 64  # oneDNN's blocking hint; 64 and 256 measured alike from 1 to 384 rows
BF16_MAX_ROWS = 384


@dataclass(frozen=True)
class Packer:
    """How one dtype's weights are packed (``pack(weight)``) and multiplied (``multiply(rows,
    packed, weight, bias)``), and for how many rows of input it pays (``min_rows..max_rows``)."""
    library: str
    usable: Callable[[], bool]
    pack: Callable[[torch.Tensor], torch.Tensor]
    multiply: Callable[..., torch.Tensor]
    min_rows: int
    max_rows: int | None = None


def _mkl_usable() -> bool:
    mkl = getattr(torch.ops, "mkl", None)
    return (torch.backends.mkl.is_available() and mkl is not None
            and hasattr(mkl, "_mkl_linear") and hasattr(mkl, "_mkl_reorder_linear_weight"))


def _onednn_bf16_usable() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and mkldnn is not None
            and hasattr(mkldnn, "_linear_pointwise") and hasattr(mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported() and native_bf16_dot())


PACKERS: dict[torch.dtype, Packer] = {
    torch.float32: Packer(
        "MKL", _mkl_usable,
        pack=lambda w: torch.ops.mkl._mkl_reorder_linear_weight(w, PACK_ROWS),
        multiply=lambda rows, packed, w, b: torch.ops.mkl._mkl_linear(rows, packed, w, b, rows.shape[0]),
        min_rows=GEMV_ROWS + 1),
    torch.bfloat16: Packer(
        "oneDNN", _onednn_bf16_usable,
        pack=lambda w: torch.ops.mkldnn._reorder_linear_weight(w, BF16_PACK_ROWS),
        multiply=lambda rows, packed, w, b: torch.ops.mkldnn._linear_pointwise(rows, packed, b, "none", [], ""),
        min_rows=1, max_rows=BF16_MAX_ROWS),
}
_USABLE: dict[torch.dtype, bool] = {}  # asked once per process: the CPU and torch do not change

# frozen model -> its pack table; weak, so a model (and its copies) is freed with its last use
_TABLES: "weakref.WeakKeyDictionary[nn.Module, _PackTable]" = weakref.WeakKeyDictionary()
# storage address -> the table holding it: the lookup every GEMM makes (a dict, not a walk of
# the weak dictionary); kept in step with _TABLES by register, unregister and each model's
# finalizer
_BY_STORAGE: dict[int, "_PackTable"] = {}
# frozen model -> how many times it was frozen (its promise, where packing runs or not)
_GENERATIONS: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether packed GEMMs of ``dtype`` run here (float32: torch built with MKL and its
    packed-linear ops; bfloat16: oneDNN's, on a CPU with a native bfloat16 dot product)."""
    usable = _USABLE.get(dtype)
    if usable is None:
        packer = PACKERS.get(dtype)
        usable = _USABLE[dtype] = packer is not None and packer.usable()
    return usable


def _packer(dtype: torch.dtype, rows: int) -> Packer | None:
    """The packer that multiplies ``rows`` rows of ``dtype`` here, if any."""
    packer = PACKERS.get(dtype)
    if packer is None or not available(dtype) or rows < packer.min_rows:
        return None
    return None if packer.max_rows is not None and rows > packer.max_rows else packer


class _PackTable:
    """One frozen model's parameters (held, so their storage addresses cannot be reused by
    other tensors while the table lives) and its packed copies, keyed by the weight view."""

    def __init__(self, params):
        # storage address -> the parameters on it. A parameter made a view by assigning its
        # ``.data`` (``optimize``'s fused [Q; K; V]) keeps a version counter of its own: an
        # edit of it moves that counter, not the fused matrix's, so every one is read.
        self.storages: dict[int, list] = {}
        for p in params:
            if p.device.type == "cpu":
                self.storages.setdefault(p.untyped_storage().data_ptr(), []).append(p)
        self.packs: dict = {}  # (storage, offset, shape) of a weight view -> (versions, packed)
        # storage address -> a derived table packed with them (adopt), held weakly
        self.adopted: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()

    def packed(self, weight: torch.Tensor) -> torch.Tensor:
        ptr = weight.untyped_storage().data_ptr()
        key = (ptr, weight.storage_offset(), tuple(weight.shape))
        versions = (weight._version, *(p._version for p in self.storages[ptr]))
        entry = self.packs.get(key)
        if entry is None or entry[0] != versions:  # new, or a counted edit since: repack
            entry = self.packs[key] = (versions, PACKERS[weight.dtype].pack(weight.detach()))
        return entry[1]


def register(model: nn.Module) -> None:
    """Declare ``model``'s parameters constant (see the module docstring); a second call
    replaces the table, so every weight is repacked from its current values. Where packed GEMMs
    do not run (:func:`available` is False) only the promise is recorded (:func:`generation`)."""
    count = _GENERATIONS.get(model, 0) + 1
    old = _TABLES.get(model)
    adopted = [] if old is None else [t for t in old.adopted.values()]  # its live engines' tables
    unregister(model)
    _GENERATIONS[model] = count
    if not any(available(dtype) for dtype in PACKERS):
        return
    table = _TABLES[model] = _PackTable(model.parameters())
    for ptr in table.storages:
        _BY_STORAGE[ptr] = table
    weakref.finalize(model, _forget, table)
    for t in adopted:
        adopt(model, t)


def unregister(model: nn.Module) -> None:
    """Drop ``model``'s packed copies and its promise; its GEMMs take F.linear again."""
    _GENERATIONS.pop(model, None)
    table = _TABLES.pop(model, None)
    if table is not None:
        _forget(table)


def _forget(table: "_PackTable") -> None:
    for ptr in table.storages:
        if _BY_STORAGE.get(ptr) is table:
            del _BY_STORAGE[ptr]


def generation(model: nn.Module) -> int | None:
    """Which ``freeze`` of ``model`` is in force (1, 2, ...), or None when it is not frozen."""
    return _GENERATIONS.get(model)


def adopt(model: nn.Module, table: torch.Tensor) -> None:
    """Pack ``table``, a tensor derived from ``model``'s weights and multiplied as a weight
    (``[N, K]``: an engine's folded head), with the model's weights, for as long as both live.
    Its edits follow the weights' rules (an in-place copy moves its version: repacked). Nothing
    happens for a model that is not packed."""
    packs = _TABLES.get(model)
    if packs is None or table.device.type != "cpu" or not available(table.dtype):
        return
    ptr = table.untyped_storage().data_ptr()
    packs.storages[ptr] = [weakref.proxy(table)]
    packs.adopted[ptr] = table
    _BY_STORAGE[ptr] = packs
    # held weakly (an engine's table dies with the engine); when it dies, its address may serve
    # another tensor: the mapping and the packed copy go first
    weakref.finalize(table, _drop_storage, packs, ptr)


def _drop_storage(packs: "_PackTable", ptr: int) -> None:
    packs.storages.pop(ptr, None)
    packs.packs = {k: v for k, v in packs.packs.items() if k[0] != ptr}
    if _BY_STORAGE.get(ptr) is packs:
        del _BY_STORAGE[ptr]


def is_frozen(model: nn.Module) -> bool:
    return model in _TABLES


def packed_count(model: nn.Module) -> int:
    """How many packed weight copies ``model`` holds (0 when not frozen): what ran packed."""
    table = _TABLES.get(model)
    return 0 if table is None else len(table.packs)


def _table_of(weight: torch.Tensor):
    if not _BY_STORAGE or weight.device.type != "cpu" or not available(weight.dtype):
        return None
    return _BY_STORAGE.get(weight.untyped_storage().data_ptr())


def is_packed(weight: torch.Tensor, rows: int | None = None) -> bool:
    """Whether :func:`linear` multiplies by a packed copy of ``weight`` (for an input of its
    dtype that needs no gradient, of ``rows`` rows, or of some row count when None): it
    belongs to a frozen model, and a packer runs its dtype here."""
    if _table_of(weight) is None or not weight.is_contiguous():
        return False
    return rows is None or _packer(weight.dtype, rows) is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; against the packed copy when ``weight`` belongs to a frozen
    model and the call qualifies (CPU, a packed dtype here, x of the weight's dtype and of the
    packer's rows, row-contiguous weight, no gradient needed)."""
    table = _table_of(weight)
    if (table is None or x.dtype != weight.dtype or not weight.is_contiguous()
            or (bias is not None and bias.dtype != weight.dtype)
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))):
        return F.linear(x, weight, bias)
    packer = _packer(weight.dtype, x.numel() // max(x.shape[-1], 1))
    if packer is None:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = packer.multiply(rows, table.packed(weight), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
