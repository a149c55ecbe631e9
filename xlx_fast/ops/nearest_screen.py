"""``nearest`` for bfloat16 inputs on a CPU that multiplies bfloat16 natively (AMX or AVX512-BF16):
a bfloat16 GEMM screens the codebook, an fp32 rescoring of a few candidates decides.

Math. The fp32 path (``nearest_torch``) computes every score s_k = ||c_k||^2 - 2 x·c_k with an
fp32 GEMM of the widened inputs. Here the dot products come from the CPU's bfloat16 GEMM
instead: its products of bfloat16 inputs are exact, it accumulates them in fp32 and rounds each
dot product to bfloat16 once, so the screened score ŝ_k = ||c_k||^2 - 2 a_k (a_k that bfloat16
dot product, the subtraction in fp32) obeys, for a row x::

    |ŝ_k - s_k| <= 2 (gamma(D) ||x|| ||c_k|| + 2^-7 |a_k| + 2^-126 sqrt(D) (||x|| + ||c_k||) + 2^-125)
                   + 2^-24 |ŝ_k|

with gamma(D) = D·2^-23 (fp32 accumulation, as ``dot_error``'s IEEE model), 2^-7 |a_k| the
rounding to 8 significant bits (rounded to nearest or truncated), and the 2^-126 terms the
subnormal inputs and outputs the hardware may flush to zero. Taking the largest ||c_k||, |a_k|
and |ŝ_k| of the row gives one bound B for the whole row.

Decision. Per row, the candidates are the entries with ŝ_k <= ŝ_min + 2B. Every other entry k
has s_k >= ŝ_k - B > ŝ_min + B >= s of the entry holding ŝ_min: none of them is a minimiser of
s. The candidates are rescored in fp32 as the fp32 path scores them (fp32 products of the
widened inputs, fp32 sums), and the lowest score wins, ties to the lowest index. The result
therefore meets the fp32 path's contract (``nearest``'s module docstring): the exact float64
argmin wherever the top-2 gap exceeds e_best + e_second, ties to the lowest index (duplicated
centroids are rescored to the same bits). A row with more than ``MAX_CANDIDATES`` candidates
(near duplicates in the codebook, or an x so large that B is) or a non-finite value takes the
fp32 path, whole.

Cost: the bfloat16 GEMM (about 6x the fp32 GEMM's rate on the 2-core Xeon of the committed
results: AMX), then per block of ``BLOCK_ROWS`` rows, while it is in cache, one pass to form ŝ,
a selection of the candidates and D products for each. Scratch: the chunk's [rows, K] bfloat16 dot products and one
[BLOCK_ROWS, K] fp32 block, beside the fp32 path's own bound.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from . import split_scan
from ._common import native_bf16_dot
from .registry import Requirement

__all__ = ["nearest_screened", "BF16_DOT", "MAX_CANDIDATES", "BLOCK_ROWS", "MIN_DIM"]

MAX_CANDIDATES = 64  # a row with more candidates than this takes the fp32 path
# Below this width the fp32 GEMM is cheap and the screen's passes over [rows, K] cost more than
# the GEMM saves: the fp32 path runs (2-core Xeon, K = 10,000, 1,024 rows: D = 128 screen 20 ms
# vs fp32 24; at 64 rows 1.6 vs 1.0 ms; from D = 256 on the screen wins at both: 1.7 vs 1.7,
# 20.5 vs 34 ms; D = 2048: 49 vs 147 ms).
MIN_DIM = 256
BLOCK_ROWS = 64  # rows post-processed at a time: their [rows, K] fp32 block stays in cache
_U = 2.0 ** -24

BF16_DOT = Requirement(native_bf16_dot, "this CPU has no native bfloat16 dot product (AMX or AVX512-BF16)")


def _screen(x: torch.Tensor, c: torch.Tensor, norms: torch.Tensor, a: torch.Tensor, c_max: float):
    """(ids, scores, certified) of a block of rows x [n, D] from their bfloat16 dot products a
    [n, K] (module docstring); uncertified rows' ids and scores are left to the caller."""
    n, d = x.shape
    xf = x.float()
    x_norm = xf.norm(dim=1) * (1 + d * 2.0 ** -24)  # rounded up past its fp32 summation error
    s = a.float()
    a_max = s.abs().amax(1)
    s = s.mul_(-2.0).add_(norms)  # ŝ = ||c||^2 - 2a in fp32, in place
    s_min = s.amin(1)
    s_max = torch.maximum(s_min.abs(), s.amax(1).abs())  # NaN or inf: not certified below
    tiny = 2.0 ** -126 * math.sqrt(d) * (x_norm + c_max) + 2.0 ** -125
    bound = 2 * (d * 2.0 ** -23 * x_norm * c_max + 2.0 ** -7 * a_max + tiny) + _U * s_max
    row, col = torch.nonzero(s <= (s_min + 2 * bound)[:, None], as_tuple=True)  # the candidates
    count = torch.bincount(row, minlength=n)
    certified = (count <= MAX_CANDIDATES) & torch.isfinite(s_max) & torch.isfinite(bound)
    # the candidates in fp32, as the fp32 path scores them (products of the widened values)
    dots = (xf.index_select(0, row) * c.index_select(0, col).float()).sum(1)
    scores = norms.index_select(0, col) - 2 * dots
    low = torch.full((n,), float("inf")).scatter_reduce_(0, row, scores, "amin")
    at_low = torch.where(scores == low.index_select(0, row), col, c.shape[0])
    winner = torch.full((n,), c.shape[0], dtype=torch.int64).scatter_reduce_(0, row, at_low, "amin")
    return winner, low, certified


def nearest_screened(x: torch.Tensor, codebook: torch.Tensor, norms: torch.Tensor, *,
                     fp32_path: Callable, chunk: int = 2048,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path for bfloat16 x [N, D] and codebook [K, D] with their fp32 norms [K] (module
    docstring): (ids int64 [N], scores fp32 [N]) with ``nearest_torch``'s contract and ``out``.
    ``fp32_path``: that fp32 path (``nearest_torch``, same arguments), which takes the rows the
    screen cannot certify, and every row below ``MIN_DIM`` features. Rows per GEMM:
    ``split_scan.cpu_rows(chunk, K)``."""
    k = codebook.shape[0]
    if codebook.shape[1] < MIN_DIM:
        return fp32_path(x, codebook, norms, chunk=chunk, out=out)
    n = x.shape[0]
    ids, scores = split_scan.outputs(n, x.device, (torch.int64, torch.float32), out)
    # largest ||c_k||, from the fp32 norms rounded up past their own summation error (D·2^-24)
    c_max = float(norms.max().sqrt()) * (1 + codebook.shape[1] * 2.0 ** -24)
    rows = split_scan.cpu_rows(chunk, k)
    for r0 in range(0, n, rows):
        a_chunk = torch.mm(x[r0:r0 + rows], codebook.T)  # bfloat16, fp32 accumulation
        for b0 in range(0, a_chunk.shape[0], BLOCK_ROWS):
            lo, hi = r0 + b0, r0 + min(b0 + BLOCK_ROWS, a_chunk.shape[0])
            i, s, ok = _screen(x[lo:hi], codebook, norms, a_chunk[b0:b0 + BLOCK_ROWS], c_max)
            ids[lo:hi], scores[lo:hi] = i, s
            if not bool(ok.all()):
                redo = torch.nonzero(~ok).flatten() + lo
                ids[redo], scores[redo] = fp32_path(x[redo], codebook, norms, chunk=chunk)
        del a_chunk
    return ids, scores
