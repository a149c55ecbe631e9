"""Nearest codebook entry (squared L2 argmin) without materialising the N×K distance matrix.

Math. For a row x and centroids c_k (k < K)::

    id(x)   = argmin_k ||x - c_k||^2 = argmin_k ( ||c_k||^2 - 2 x·c_k )      (||x||^2 is constant in k)
    dist(x) = ||x||^2 + min_k ( ||c_k||^2 - 2 x·c_k )                          clamped at 0

GPU path: two Triton kernels, as a GEMM with a fused min/argmin epilogue (RAFT's fused L2 NN).

1. ``_nearest_partial_kernel`` on a 2-D grid of (row tile × codebook split): a program owns
   BLOCK_N rows of x and one split of the codebook (a few BLOCK_K tiles), computes each tile of
   dot products with ``tl.dot`` (fp32 accumulation over D), adds the precomputed norms, folds the
   tile into a running (min, argmin) per row and writes one (score, id) pair per row and split.
   Programs are numbered in groups of GROUP_N row tiles (as in a grouped GEMM): consecutive
   programs take the same split for the group's row tiles, then the next split, so while a group
   sweeps the codebook its x tiles stay in L2 and every codebook tile fetched is used by GROUP_N
   row tiles.
2. ``_nearest_merge_kernel``: per row, the minimum over the splits, in split order.

Traffic model (HBM, assuming the group's x tiles and the splits in flight stay in L2), at N rows,
K entries, D features, b bytes per element, S splits, G = GROUP_N·BLOCK_N rows per group::

    x: N·D·b once     C: K·D·b per group, (N/G)·K·D·b     partials: 8·N·S written and read
    out: 12·N (id int64, score fp32)

At N = 262144, K = 10000, D = 2048, bf16 (G = 4096, S = 27): x 1.07 GB, C 64 × 41 MB = 2.6 GB,
partials 2 × 57 MB, out 3 MB: about 3.8 GB, against 2·N·K·D = 10.7 TFLOP of tensor-core work
(a model, to be checked by the benchmark). A single-pass kernel with one row tile per program
walking the whole codebook has 132 resident row tiles (67 MB) on an H100, more than its 50 MB L2,
so x comes from HBM once per codebook tile: N·D·b·K/BLOCK_K = 85 GB. For a few hundred rows
the splits keep the SMs busy. The CPU path does the same blocked: a GEMM (``torch.addmm``,
threaded by torch) per chunk of rows and block of ``K_BLOCK`` entries, then a min over the
block merged into a running best; half inputs are widened to fp32 first (exact).

Scratch (besides the inputs, the cached K norms and the [N] outputs). GPU: the partials, 8·N·S
bytes with S <= 32 splits (at most 256 bytes a row, whatever K; ``nearest`` runs at most 2^20
rows a call, so <= 256 MB). CPU: one block of rows × K_BLOCK fp32 scores (2048 × 2048 = 16 MB
at the default chunk, whatever K), plus the chunk widened to fp32. Nothing grows with N·K.
Limits: K and D below 2^31 (entry numbers are int32; row and codebook offsets int64). Tiles do
not depend on K or D, except that a D (or row stride) not divisible by 16 takes row tiles of 64,
not 128: its loads are not vectorised, and 128 rows then spilled registers.

Tie-breaking (as FAISS ``IndexFlatL2`` with k=1): among equal scores the lowest index wins. Within
a tile the argmin takes the lowest column whose score equals the tile minimum; a later tile of
the split replaces the running best only when strictly smaller; the merge walks the splits in
class order and also replaces only when strictly smaller. Duplicate centroids therefore resolve
to the first copy, wherever the tile and split boundaries fall.

Error bound (rounding model in :mod:`xlx_fast.ops.dot_error`). The dot product x·c_k of D terms
has error at most gamma(D) ||x|| ||c_k|| (Cauchy-Schwarz on sum |x_i c_ki|), with
gamma(D, "ieee") = D·2^-23 (products exact; fp32, fp16, bf16 inputs), gamma(D, "tf32x3") =
3·2^-20 + 3D·2^-23·(1 + 2^-9) (fp32 through three tf32 products; the default) and gamma(D, "tf32") =
2·2^-10 + 2^-20 + D·2^-23 (Triton passes raw fp32 to the tf32 MMA, which TRUNCATES each operand
to 10 significand bits). With u = 2^-24, the norms ||c_k||^2 summed in fp32 by torch and one
rounding of ``cnorm - 2 acc``, the computed score s_k of each centroid obeys::

    |s_k - s_k(exact)| <= 2 (gamma(D) + u) ||x|| ||c_k|| + (D + 1) u ||c_k||^2  =: e_k

(a worst-case, not probabilistic, bound; typical errors are ~sqrt(D) smaller). The returned id is
therefore the exact float64 argmin of the given inputs whenever the gap between the best and the
second-best exact score exceeds e_best + e_second. :func:`error_bound` computes max_k e_k per row.
At D = 2048 and unit-norm rows and centroids, e is 6.1e-4 with IEEE fp32, 1.5e-3 with tf32x3 (the
worst case of its 3D additions; its products are fp32-accurate) and 4.5e-3 with tf32.

NaN. A NaN centroid is refused when its norms are computed (once per codebook, K values checked).
A NaN in x is detected inside the kernel (a per-row flag, no extra pass over x) and raised as a
ValueError by the wrapper after the launch.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import split_scan
from ._common import (FLOAT_DTYPES, HAS_TRITON, check_choice, check_device, check_dtype, check_same_dtype,
                      check_tensor, tl, triton)
from .codebook_tile import interpreter_widen, vector_loads
from .nearest_screen import BF16_DOT, nearest_screened
from .derived import derived, widened
from .dot_error import PRECISIONS, gamma
from . import measured
from .registry import Capability, register_op

__all__ = ["nearest", "nearest_triton", "nearest_torch", "codebook_norms", "error_bound"]


if HAS_TRITON:
    from .codebook_tile import rows_dot_entries
    from .split_scan import (best_slice, first_index, keep_better, row_block, running_best, slice_bounds,
                             slice_chunk)

    @triton.jit
    def _nearest_partial_kernel(
        X, C, CNORM, P_SCORE, P_ID,
        N, K, D, K_PER_SPLIT, NSPLIT,
        stride_xn, stride_xd, stride_ck, stride_cd,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    ):
        # grouped order: GROUP_N row tiles share a split before the next split is taken
        pid = tl.program_id(0)
        row_tiles = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_N * NSPLIT
        first_tile = (pid // per_group) * GROUP_N
        group_size = tl.minimum(row_tiles - first_tile, GROUP_N)
        tile = first_tile + (pid % per_group) % group_size
        split = (pid % per_group) // group_size

        rows, row_ok = row_block(tile, N, BLOCK_N)
        k_begin, k_end = slice_bounds(split, K_PER_SPLIT, K)
        best, best_id = running_best(BLOCK_N, True)
        has_nan = tl.zeros([BLOCK_N], tl.int32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            # acc[n, k] = x_n · c_k, fp32 accumulation over D
            cols, col_ok, acc = rows_dot_entries(X, stride_xn, stride_xd, rows, row_ok, C, stride_ck, stride_cd,
                                               k0, k_end, D, BLOCK_N, BLOCK_K, BLOCK_D, INPUT_PRECISION, WIDEN)
            # padded columns get +inf so they never win
            cnorm = tl.load(CNORM + cols, mask=col_ok, other=float("inf"))
            score = cnorm[None, :] - 2.0 * acc
            has_nan = tl.maximum(has_nan, tl.max((score != score).to(tl.int32), axis=1))
            tile_min = tl.min(score, axis=1)
            # lowest column attaining the tile minimum (explicit, not left to the reduction)
            tile_id = first_index(score, tile_min, cols, K)
            # strict '<': an equal score in a later tile keeps the earlier (lower) index
            _, best, best_id = keep_better(tile_min, tile_id, best, best_id, True)
        out = rows * NSPLIT + split
        tl.store(P_SCORE + out, best, mask=row_ok)
        tl.store(P_ID + out, tl.where(has_nan > 0, -1, best_id), mask=row_ok)

    @triton.jit
    def _nearest_merge_kernel(P_SCORE, P_ID, OUT_ID, OUT_SCORE, N, NSPLIT,
                              BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
        # splits in class order, chunks of BLOCK_S; strict '<' keeps the lowest index on ties
        rows, row_ok = row_block(tl.program_id(0), N, BLOCK_N)
        best, best_id = running_best(BLOCK_N, True)
        has_nan = tl.zeros([BLOCK_N], tl.int32)
        for s0 in range(0, NSPLIT, BLOCK_S):
            sp, ok, idx = slice_chunk(rows, row_ok, s0, NSPLIT, BLOCK_S)
            # the first split holding the chunk minimum: its id is the lowest among them
            chunk_min, first = best_slice(tl.load(P_SCORE + idx, mask=ok, other=float("inf")),
                                          sp, NSPLIT, True)
            ids = tl.load(P_ID + idx, mask=ok, other=0)
            has_nan = tl.maximum(has_nan, tl.max((ids < 0).to(tl.int32), axis=1))
            chunk_id = tl.sum(tl.where(sp[None, :] == first[:, None], ids, 0), axis=1)
            _, best, best_id = keep_better(chunk_min, chunk_id, best, best_id, True)
        best_id = tl.where(has_nan > 0, -1, best_id)
        tl.store(OUT_ID + rows, best_id.to(tl.int64), mask=row_ok)
        tl.store(OUT_SCORE + rows, best, mask=row_ok)


# --------------------------------------------------------------------------------------------
# centroid norms, cached per codebook tensor
# --------------------------------------------------------------------------------------------

def _norms(codebook: torch.Tensor) -> torch.Tensor:
    norms = codebook.float().square().sum(1)
    if not bool(torch.isfinite(norms).all()):
        bad = torch.nonzero(~torch.isfinite(norms)).flatten()[:8].tolist()
        raise ValueError(f"codebook contains NaN or inf (centroids {bad}...)")
    return norms


def codebook_norms(codebook: torch.Tensor) -> torch.Tensor:
    """||c_k||^2 in float32 (computed in fp32 from the codebook's values), computed once per
    codebook tensor and reused until it is edited in place (:mod:`xlx_fast.ops.derived`).
    Raises ValueError if a centroid contains NaN or inf."""
    return derived(codebook, "sq_norms", _norms)


def error_bound(x, codebook, *, precision: str = "tf32x3") -> torch.Tensor:
    """Per-row bound max_k e_k on the score error (module docstring), float64, shape [N].

    e_k grows with ||c_k|| (both coefficients are positive), so the maximum is e at the largest
    centroid norm: O(N + K) work and memory, no [N, K] table."""
    x = torch.as_tensor(x)
    c = torch.as_tensor(codebook)
    d = x.shape[1]
    u = 2.0 ** -24
    g = gamma(d, precision)
    c_max = torch.zeros((), dtype=torch.float64, device=c.device)
    for k0 in range(0, c.shape[0], 65536):  # in blocks: no [K, D] float64 copy
        c_max = torch.maximum(c_max, c[k0:k0 + 65536].double().norm(dim=1).max())
    return 2 * (g + u) * x.double().norm(dim=1) * c_max + (d + 1) * u * c_max ** 2


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

def _launches(x, codebook, norms, ids, scores, precision, block_n=None, block_k=None, block_d=None,
              splits=None, cuda=None):
    """The kernel launches of one call: [(kernel, grid, args, kwargs)], shared by the launcher and
    by the compile check (tests/test_triton_compile.py), so both see the same configs."""
    n, d = x.shape
    k = codebook.shape[0]
    if block_n is None:  # unvectorised loads (an odd D) need registers: 64-row tiles at most
        block_n = min(128 if vector_loads(d, x, codebook) else 64, max(16, triton.next_power_of_2(n)))
    if block_k is None:  # fp32: 128 x 128 spills at 8 warps (sm_80), see test_triton_compile
        block_k = 128 if x.dtype != torch.float32 else 64
    if block_d is None:
        block_d = 64 if x.dtype != torch.float32 else 32
    if splits is None:  # at most 32 splits: partials of 8·N·S bytes, one merge chunk
        splits = split_scan.MAX_MERGE_CHUNK
    k_per, nsplit = split_scan.slices(k, block_k, splits)
    row_tiles = triton.cdiv(n, block_n)
    part_score = torch.empty(n, nsplit, dtype=torch.float32, device=x.device)
    part_id = torch.empty(n, nsplit, dtype=torch.int32, device=x.device)
    cuda = x.device.type == "cuda" if cuda is None else cuda
    partial = (
        _nearest_partial_kernel, (row_tiles * nsplit,),
        (x, codebook, norms, part_score, part_id, n, k, d, k_per, nsplit,
         x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1)),
        dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, GROUP_N=32,
             # the precision only means something for fp32 operands; half operands take the
             # compiler's default (their products are exact in the fp32 accumulator anyway)
             INPUT_PRECISION=precision if x.dtype == torch.float32 else "tf32",
             WIDEN=interpreter_widen(x),
             **({"num_warps": 8, "num_stages": 3} if cuda else {})))
    merge_block = 64
    merge = (
        _nearest_merge_kernel, (triton.cdiv(n, merge_block),),
        (part_score, part_id, ids, scores, n, nsplit),
        dict(BLOCK_N=merge_block, BLOCK_S=split_scan.merge_chunk(nsplit),
             **({"num_warps": 4, "num_stages": 1} if cuda else {})))
    return [partial, merge]


def compile_variants(x, codebook, precision):
    """[(label, kernel, args, kwargs)] a CUDA launch on x [N, D] and codebook [K, D] compiles
    (any device: only shapes, strides and dtypes matter); num_warps/num_stages as on CUDA."""
    n, k = x.shape[0], codebook.shape[0]
    norms = torch.empty(k, dtype=torch.float32)
    ids, scores = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.float32)
    return split_scan.compile_variants([_launches(x, codebook, norms, ids, scores, precision, cuda=True)])

# --------------------------------------------------------------------------------------------

def nearest_triton(x: torch.Tensor, codebook: torch.Tensor, norms: torch.Tensor | None = None, *,
                   precision: str = "tf32x3", block_n: int | None = None, block_k: int | None = None,
                   block_d: int | None = None, splits: int | None = None,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel on already-validated 2-D x [N, D] and codebook [K, D].

    Returns (ids int64 [N], scores float32 [N]) with score = min_k ||c_k||^2 - 2 x·c_k; an id
    of -1 marks a row whose scores were NaN. ``out`` = preallocated (ids, scores) to write
    into (the per-split partials, 8 bytes per row and split, are still allocated). ``splits``:
    codebook splits (default min(K / block_k, 32)); results do not depend on it. Runs on CUDA,
    or on the CPU under ``TRITON_INTERPRET=1`` (tests pass small block sizes there).
    """
    if norms is None:
        norms = codebook_norms(codebook)
    return split_scan.scan(
        x.shape[0], x.device, (torch.int64, torch.float32), out,
        lambda ids, scores: _launches(x, codebook, norms, ids, scores, precision,
                                      block_n, block_k, block_d, splits))


# Codebook entries per CPU GEMM. A chunk's scores are taken K_BLOCK entries at a time, so the
# [rows, K_BLOCK] block stays in cache between the GEMM that writes it and the scans that read
# it, and a running best carries across blocks. Against one GEMM over all K (2-core Xeon, 1,024
# rows, D = 2048): 1066 -> 856 ms at K = 65,536 (FAISS's IndexFlatL2: 846), 146 -> 136 ms at
# K = 10,000; 2048 and 4096 measured alike, 8192 and more slower.
K_BLOCK = 2048


def nearest_torch(x: torch.Tensor, codebook: torch.Tensor, norms: torch.Tensor | None = None, *,
                  chunk: int = 2048,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path: per chunk of rows and block of ``K_BLOCK`` entries one GEMM (addmm: ||c||^2 -
    2 x Cᵀ) and a min, merged into the chunk's running best.

    Half inputs are upcast chunk by chunk so that products are exact and accumulation is fp32
    (the same arithmetic as the kernel). Ties go to the lowest index: ``split_scan.row_best``
    returns the first minimal index of a block, and a later block replaces the running best only
    when strictly smaller. A row with a NaN score in any block gets id -1 and score NaN (the
    kernel's mark). Same return contract as :func:`nearest_triton` (``out``: preallocated (ids,
    scores) to write into). Scratch: one [rows, min(K, K_BLOCK)] fp32 block, rows =
    ``split_scan.cpu_rows(chunk, min(K, K_BLOCK))`` (16 MB at the default chunk), plus the
    codebook widened once (cached) for half inputs.
    """
    if norms is None:
        norms = codebook_norms(codebook)
    c = widened(codebook)
    n, k = x.shape[0], c.shape[0]
    chunk = split_scan.cpu_rows(chunk, min(k, K_BLOCK))
    ids, scores = split_scan.outputs(n, x.device, (torch.int64, torch.float32), out)
    for r0 in range(0, n, chunk):
        xs = x[r0:r0 + chunk].float()
        for k0 in range(0, k, K_BLOCK):
            s = torch.addmm(norms[k0:k0 + K_BLOCK], xs, c[k0:k0 + K_BLOCK].T, beta=1.0, alpha=-2.0)
            v, i = split_scan.row_best(s, largest=False)  # a NaN row: id -1, as the kernel marks it
            del s  # before the next block's GEMM: one block alive at a time
            if k0 == 0:
                best, best_id = v, i
                continue
            nan = torch.isnan(v)
            take = (v < best) | nan  # strictly smaller: a tie keeps the earlier entry
            best = torch.where(take, v, best)
            best_id = torch.where(take, torch.where(nan, -1, i + k0), best_id)
        scores[r0:r0 + chunk] = best
        ids[r0:r0 + chunk] = best_id
    return ids, scores


# --------------------------------------------------------------------------------------------
# backends, the custom op, the public entry point
# --------------------------------------------------------------------------------------------

def _run_triton(x, codebook, norms, *, precision, chunk):
    return nearest_triton(x, codebook, norms, precision=precision)


def _run_torch(x, codebook, norms, *, precision, chunk):
    return nearest_torch(x, codebook, norms, chunk=chunk)


# ||scores - ref|| / ||ref|| against the float64 scores ||c||^2 - 2 x·c of the same (rounded)
# inputs: products of half inputs are exact in fp32, so every dtype is held to fp32's bound (the
# ids are exact wherever the top-2 gap exceeds error_bound; the "tf32" precision is not held to it)
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
split_scan.register_backends("nearest", triton_impl=_run_triton, torch_impl=_run_torch,
                             tolerances=TOLERANCES)


def _run_screened(x, codebook, norms, *, precision, chunk):
    norms = codebook_norms(codebook) if norms is None else norms
    return nearest_screened(x, codebook, norms, fp32_path=nearest_torch, chunk=chunk)


# on a CPU with a native bfloat16 dot product, bfloat16 takes the screen (ops/nearest_screen.py:
# a bfloat16 GEMM, then fp32 rescoring of what its bound cannot rule out; the rest falls back to
# nearest_torch), preferred there to the fp32 path (rank 1)
register_op("nearest", "screened", impl=_run_screened,
            capability=Capability(devices=("cpu",), dtypes=(torch.bfloat16,), requires=(BF16_DOT,)),
            preference_rank=0, tolerances=TOLERANCES)


@torch.library.custom_op("xlx_fast::nearest", mutates_args=())
def _nearest_op(x: torch.Tensor, codebook: torch.Tensor, norms: Optional[torch.Tensor],
                precision: str, chunk: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, scores) of validated x [N, D] and codebook [K, D] (norms None: cached per codebook;
    chunk: rows per CPU GEMM); backend "" = the registry's choice."""
    def trial(impl):
        return impl.impl(x, codebook, norms, precision=precision, chunk=chunk)

    return trial(measured.select("nearest", x.device, x.dtype, backend or None, trial,
                                 x, codebook, norms, precision, chunk))


@_nearest_op.register_fake
def _(x, codebook, norms, precision, chunk, backend):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.float32)


def _check_numpy(name: str, a: np.ndarray) -> None:
    if a.dtype not in (np.float32, np.float16):
        raise TypeError(f"{name} must be float32 or float16, got numpy {a.dtype}")


def _raise_non_finite(ids: torch.Tensor, scores: torch.Tensor) -> None:
    """One host sync per call: the kernel marks NaN rows with id -1 instead of a second pass; an
    inf in x (or a product overflowing fp32) leaves a non-finite best score instead."""
    if ids.numel() and bool(((ids < 0) | ~torch.isfinite(scores)).any()):
        bad = torch.nonzero(ids < 0).flatten()[:8].tolist()
        if bad:
            raise ValueError(f"x contains NaN (rows {bad})")
        bad = torch.nonzero(~torch.isfinite(scores)).flatten()[:8].tolist()
        raise ValueError(f"x contains inf, or values whose distances overflow float32 (rows {bad})")


def nearest(x, codebook, *, return_distance: bool = False, precision: str = "tf32x3",
            norms: torch.Tensor | None = None, chunk: int | None = None, progress: bool = False,
            backend: str | None = None):
    """Index of the nearest codebook entry (squared L2) for every row of x.

    Args:
        x: [N, D] (or [..., D], flattened) float32/float16/bfloat16 torch tensor, or a float32/
            float16 numpy array (np.memmap works: rows are read chunk by chunk).
        codebook: [K, D], same dtype as x. A torch codebook decides the device (x must be there
            or be numpy); a numpy codebook goes to the device of x (CPU for numpy x).
        return_distance: also return squared L2 distances (float32: ||x||^2 in fp32 plus the
            score, clamped at 0).
        precision: "tf32x3" (default; fp32-level error on tensor cores), "ieee" (FMA units,
            slower) or "tf32" (fastest, ~3 digits), used for float32 inputs on CUDA (the CPU
            path is always IEEE). Explicit: no global torch flag is read.
        norms: precomputed ||c_k||^2 (float32 [K]); by default computed once per codebook
            tensor and cached (see :func:`codebook_norms`).
        chunk: rows per step. Numpy rows are converted (and copied to CUDA) chunk by chunk; the
            CPU path bounds its scratch to chunk × K_BLOCK floats (2^25 at most), the CUDA path its per-split partials to 8 · chunk · splits bytes (splits
            <= 32). Default 2048 on the CPU, 262144 for host rows to CUDA, 2^20 for
            CUDA-resident x (partials <= 256 MB).
        progress: show a tqdm bar over chunks.
        backend: None (the registry's choice: CUDA → "triton", CPU → "torch"; see
            ``xlx-fast info``) or a backend by name; one that cannot run here raises naming why.

    Returns:
        ids int64 of shape x.shape[:-1] (numpy if x is numpy, else a tensor on the compute
        device); with ``return_distance`` the pair (ids, distances). Ties go to the lowest index.

    Each chunk runs the custom op ``torch.ops.xlx_fast.nearest``. NaN or inf in x raises a
    ValueError after the last chunk (one host sync; skipped while torch.compile traces).
    """
    was_numpy = isinstance(x, np.ndarray)
    if was_numpy:
        _check_numpy("x", x)
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if isinstance(codebook, np.ndarray):
        _check_numpy("codebook", codebook)
        ct = torch.from_numpy(np.ascontiguousarray(codebook))
        ct = ct.to(x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
    elif isinstance(codebook, torch.Tensor):
        ct = codebook
        if isinstance(x, torch.Tensor):
            check_tensor("x", x, device=ct.device, device_of="codebook")
    else:
        raise TypeError(f"codebook must be a torch.Tensor or numpy.ndarray, got {type(codebook).__name__}")
    device = ct.device
    x_dtype = torch.from_numpy(np.empty(0, x.dtype)).dtype if was_numpy else x.dtype
    check_choice("precision", precision, PRECISIONS)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None or an int >= 1, got {chunk!r}")
    check_tensor("codebook", ct, dim=2)
    if ct.shape[0] < 1:
        raise ValueError("codebook is empty (K = 0)")
    if ct.shape[1] < 1:
        raise ValueError("codebook has feature dimension D = 0")
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension [..., D]")
    if x.shape[-1] != ct.shape[1]:
        raise ValueError(f"x has feature dim {x.shape[-1]} but codebook has D = {ct.shape[1]}")
    check_dtype("x", x_dtype, FLOAT_DTYPES)
    check_same_dtype("codebook", ct, "x", x_dtype)
    check_device("codebook", ct)
    if ct.stride(-1) != 1:
        ct = ct.contiguous()
    if norms is not None:
        norms = torch.as_tensor(norms).to(device, torch.float32)
        check_tensor("norms", norms, shape=(ct.shape[0],))
    elif not torch.compiler.is_compiling():  # a NaN centroid raises here, whatever x holds
        norms = codebook_norms(ct)

    lead = tuple(x.shape[:-1])
    xf = x.reshape(-1, x.shape[-1])
    n = xf.shape[0]
    if device.type == "cuda":
        step = chunk or (262144 if was_numpy else 1 << 20)
    else:
        step = chunk or 2048
    ids = torch.empty(n, dtype=torch.int64, device=device)
    scores = torch.empty(n, dtype=torch.float32, device=device)
    xnorm = torch.empty(n, dtype=torch.float32, device=device) if return_distance else None

    starts = range(0, n, step)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, total=(n + step - 1) // step, unit="chunk", desc="nearest")
    for r0 in starts:
        xs = xf[r0:r0 + step]
        if was_numpy:
            # a read-only memory map cannot back a tensor: copy the chunk (it is read anyway)
            xs = torch.from_numpy(np.ascontiguousarray(xs) if xs.flags.writeable else np.array(xs))
        xs = xs.to(device, non_blocking=True)
        if xs.stride(-1) != 1:
            xs = xs.contiguous()
        i, s = torch.ops.xlx_fast.nearest(xs, ct, norms, precision, step, backend or "")
        ids[r0:r0 + step] = i
        scores[r0:r0 + step] = s
        if return_distance:
            xnorm[r0:r0 + step] = xs.float().square().sum(1)
    if not torch.compiler.is_compiling():
        _raise_non_finite(ids, scores)

    ids = ids.reshape(lead)
    if was_numpy:
        ids = ids.cpu().numpy()
    if not return_distance:
        return ids
    dist = (xnorm + scores).clamp_min_(0.0).reshape(lead)
    if was_numpy:
        dist = dist.cpu().numpy()
    return ids, dist
