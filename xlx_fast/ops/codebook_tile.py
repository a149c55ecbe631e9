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


def interpreter_widen(x: torch.Tensor) -> bool:
    """Triton 3.6's CPU interpreter computes tl.dot on bf16 operands from their raw bits. There
    (and only there) bf16 tiles are widened to fp32 before the dot: the same value, since a
    bf16×bf16 product is exact in fp32 and the accumulation is fp32 either way."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


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
