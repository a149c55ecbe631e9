"""The tile both codebook kernels share: a block of rows against a block of codebook entries.

``rows_dot_entries`` returns ``acc[m, k] = a_m · w_k`` for BLOCK_M rows of A and the BLOCK_K
entries ``k0 + [0, BLOCK_K)`` of W (both row-major [*, D] with arbitrary strides), accumulated in
fp32 over D in BLOCK_D slices with ``tl.dot``, with the entry numbers and which of them are
below ``k_end``. Out-of-range rows, entries and feature columns load as zero, so they add nothing.
``nearest`` turns it into distances, ``codebook_head`` into logits.
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, tl, triton
from .derived import derived


def interpreter_widen(x: torch.Tensor) -> bool:
    """Triton 3.6's CPU interpreter computes tl.dot on bf16 operands from their raw bits. There
    (and only there) bf16 tiles are widened to fp32 before the dot: the same value, since a
    bf16×bf16 product is exact in fp32 and the accumulation is fp32 either way."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def vector_loads(d: int, *rows: torch.Tensor) -> bool:
    """Whether the compiled tile loads are vectorised: the width D and the row stride of every
    operand divisible by 16 (what Triton specialises integer arguments on). Otherwise each
    element is loaded alone, its address and mask held in registers, and the tiles tuned for
    aligned widths spill (at D = 777 on sm_80 and sm_90, tests/test_triton_compile.py):
    ``nearest`` then takes 64-row tiles, ``codebook_head`` pads its operands (:func:`padded`)."""
    return d % 16 == 0 and all(t.stride(0) % 16 == 0 for t in rows)


def _rows16(t: torch.Tensor) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], -(-t.shape[1] // 16) * 16)
    out[:, :t.shape[1]] = t
    return out


def padded(a: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, w), or both copied into zero-padded rows of a multiple of 16 elements when their loads
    would not vectorise (:func:`vector_loads`): the kernels then compile exactly as at an
    aligned width. The padding adds zeros to every dot product, as the masked loads of the
    unpadded tile did, so results are unchanged bit for bit. ``w``'s copy (K × ceil16(D)) is
    made once per unchanged tensor (:mod:`xlx_fast.ops.derived`), ``a``'s per call."""
    if vector_loads(a.shape[1], a, w):
        return a, w
    return _rows16(a), derived(w, "rows16", _rows16)


if HAS_TRITON:

    @triton.jit
    def rows_dot_entries(A, stride_am, stride_ad, rows, row_ok,
                         W, stride_wk, stride_wd, k0, k_end, D,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr, WIDEN: tl.constexpr):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            a = tl.load(A + rows[:, None] * stride_am + ds[None, :] * stride_ad,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(W + cols[None, :].to(tl.int64) * stride_wk + ds[:, None] * stride_wd,
                        mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if WIDEN:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        return cols, col_ok, acc
