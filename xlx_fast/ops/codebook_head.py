"""Codebook head: (max probability, argmax) of softmax(h·Wᵀ + b) without materialising the logits.

Math. For a row h and classes k < K, with z_k = (h·w_k + b_k) / τ (τ = 1 when greedy)::

    m  = max_k z_k,   s = Σ_k exp(z_k - m)
    id = argmax_k z_k                        (greedy, temperature 0; ties → lowest k)
    id = argmax_k z_k + g_k,  g_k ~ Gumbel   (temperature τ > 0: an exact sample of softmax(z))
    prob = exp(z_id - m) / s                 (= 1/s when greedy)

So at temperature 0 ``prob`` is the softmax maximum of the reference (``softmax(logits).max(-1)``),
and at τ > 0 it is the probability that softmax(logits/τ) gives to the sampled id.

Kernel. One Triton program owns BLOCK_M rows and one slice of the classes (split-K over classes,
so that batch 1 = 64 rows still fills the GPU). It walks its slice in BLOCK_K tiles: tl.dot over H
(fp32 accumulation), bias, then the online-softmax update (running max m, running sum s rescaled
by exp(m_old - m_new)) and the running argmax of the key (z, or z + g). Each program writes five
numbers per row; a second small kernel merges the slices (max of m, rescaled sum of s, first
slice holding the largest key), walking them in chunks of 32 so any number of slices fits in
registers. Traffic per call (b bytes per element, R = ceil(M/BLOCK_M) row blocks, S slices):
W is read R times (K·H·b each: 15 MB at K = 10000, H = 768 fp16, once per row block; a batch of
64 rows is one block), h once per class tile of its slice (from L2: M·H·b·K/BLOCK_K in all), 20
bytes of partials per row and slice written and read, 12 bytes per row out; the M×K logits never
leave registers. Limits: H and K any size below 2^31 (tiles are masked; class numbers are int32,
row and weight offsets int64). Tiles do not depend on K or H; an H (or row stride) not divisible
by 16 would load element by element, and the tiles then spilled registers: h and W are copied
into zero-padded rows of a multiple of 16 instead (W once per unchanged tensor, K·ceil16(H)
elements; h per call), which compile as an aligned width and add only zeros to the dot products.

Scratch (besides the inputs and the [M] outputs). GPU: the partials, 24 bytes per row and slice,
with S = min(splits, ceil(K / BLOCK_K)) slices; the default splits = ceil(2·SMs / row blocks)
bound M·S by M + 2·SMs·BLOCK_M (at most 24·M bytes + 405 KB on a 132-SM GPU, whatever K). CPU:
one chunk of rows × K fp32 logits with rows = ``split_scan.cpu_rows(chunk, K)`` (<= 2^25 floats =
128 MB: 1024 rows up to K = 32768, 512 at K = 65536), plus, when sampling, the Gumbel noise drawn
``NOISE_BLOCK`` values at a time (a dozen int64 temporaries of that size, about 6 MB). An odd H
adds the padded copies of h (per call) and W (cached). Nothing grows with M·K.

Masked classes: a logit of -inf (a bias of -inf, as the captioner gives BERT's special tokens) has
probability 0 and is never picked, even when a whole tile or slice is masked: the running max
starts at the lowest finite float, not -inf, so a masked tile adds exp(-inf) = 0 where
exp(-inf - -inf) would be NaN (finite logits give the same max either way). A row whose logits
are all -inf has no softmax: prob NaN, as on the CPU.

Precision (rounding model in :mod:`xlx_fast.ops.dot_error`): a logit errs by at most
gamma(H)·sum_d |h_d w_kd| + 2^-23 |b_k|, with gamma(H, "ieee") = H·2^-23 for fp32 (FMA) and
fp16/bf16 inputs (exact products), gamma(H, "tf32x3") = 3·2^-20 + 3H·2^-23·(1 + 2^-9) for fp32
with ``precision="tf32x3"`` (the default: three tf32 tensor-core products carrying fp32's
accuracy; the FMA loop of "ieee" ran at a fifth of cuBLAS's fp32 rate on an H200), and
gamma(H, "tf32") = 2·2^-10 + 2^-20 + H·2^-23 for fp32 with ``precision="tf32"``: Triton gives
the raw fp32 registers to the tf32 MMA, which truncates each operand to 10 significand bits. With logit errors <= e the returned probability is within a
factor e^(±4e) of the exact one (numerator and sum each move by at most e^(±2e)); the id is the
exact argmax wherever the top-2 gap exceeds 2e.

Gumbel noise is counter-based: u = Philox4x32-10(key = per-row 64-bit seed, counter = (class,
step, 0, 0)), first word, u = ((r >> 8) + 0.5)·2^-24 ∈ (0, 1), g = -log(-log u). A row's noise
depends only on its own seed, the step and the class: never on its batch neighbours, the block
sizes or the class split. The CPU path draws the same bits (a torch twin of Philox). What can still
move a sample is the last bit of a logit (GEMM blocking differs with batch size and device), so
samples agree across re-batching and devices except where two keys tie to within that rounding.

Per-row temperatures: ``temperature`` may be a float32 tensor with one τ_m per row (τ_m = 0:
that row is greedy, exactly as in a greedy call: its logits are multiplied by 1 and its key
gets no noise). Rows of different temperatures then share one launch; the noise is drawn for
every row (the sampling kernel's cost), so an all-greedy batch should pass the scalar 0.

Tie-breaking: the lowest class index among equal keys (within a tile explicitly, across tiles by a
strict '>' in class order, across slices by the first slice).

NaN: each program flags rows whose logits contain NaN (one compare per logit, no extra pass) and
writes prob = NaN for them; the wrapper checks the [M] output (one small host sync, skipped
during CUDA graph capture) and raises a ValueError naming h, weight or bias.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import split_scan
from ._common import (FLOAT_DTYPES, HAS_TRITON, INDEX_DTYPES, check_choice, check_device, check_int,
                      check_same_dtype, check_tensor, tl, triton)
from . import frozen_weights
from .codebook_tile import interpreter_widen, padded
from .derived import widened
from .dot_error import PRECISIONS
from . import measured

__all__ = ["codebook_head", "codebook_head_triton", "codebook_head_torch", "fold_head", "gumbel_noise"]

if HAS_TRITON:
    from .codebook_tile import rows_dot_entries
    from .split_scan import (best_slice, first_index, keep_better, row_block, running_best, slice_bounds,
                             slice_chunk)

    LOWEST_FLOAT = tl.constexpr(-3.4028234663852886e38)  # the most negative finite float32

    @triton.jit
    def _gumbel(seed, cols, step, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """g[m, k] = -log(-log(u)), u from Philox keyed by seed[m], counter (cols[k], step, 0, 0)."""
        zero = tl.zeros([BLOCK_M, BLOCK_K], tl.int32)
        c0 = (zero + cols[None, :]).to(tl.uint32, bitcast=True)
        c1 = (zero + step).to(tl.uint32, bitcast=True)
        c2 = zero.to(tl.uint32, bitcast=True)
        r, _, _, _ = tl.philox(seed[:, None], c0, c1, c2, c2)
        u = ((r >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24
        return -tl.log(-tl.log(u))

    # step changes every sampling step: specialising it (== 1, multiple of 16) would compile the
    # kernel up to three times, some of them in the middle of a generation loop
    @triton.jit(do_not_specialize=["step"])
    def _head_partial_kernel(
        H, W, B, SEEDS, P_M, P_S, P_KEY, P_Z, P_ID,
        M, K, HD, K_PER_SPLIT, NSPLIT,
        stride_hm, stride_hd, stride_wk, stride_wd,
        inv_temp, step, TEMPS,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
        SAMPLE: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDEN: tl.constexpr,
        PER_ROW: tl.constexpr,
    ):
        split = tl.program_id(1)
        rows, row_ok = row_block(tl.program_id(0), M, BLOCK_M)
        k_begin, k_end = slice_bounds(split, K_PER_SPLIT, K)
        if SAMPLE:
            seed = tl.load(SEEDS + rows, mask=row_ok, other=0)
        if PER_ROW:  # tau_m per row; tau_m = 0: greedy row (scale 1, no noise)
            tau = tl.load(TEMPS + rows, mask=row_ok, other=0.0)
            row_scale = tl.where(tau > 0, 1.0 / tl.where(tau > 0, tau, 1.0), 1.0)
            noisy = tau > 0
        # the running max starts at the lowest finite float, not -inf: a tile of masked (-inf)
        # classes then adds exp(-inf) = 0, never exp(-inf + inf) = NaN
        m_run = tl.full([BLOCK_M], LOWEST_FLOAT, tl.float32)
        s_run = tl.zeros([BLOCK_M], tl.float32)
        best_z = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best, best_id = running_best(BLOCK_M, False)
        has_nan = tl.zeros([BLOCK_M], tl.int32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            cols, col_ok, acc = rows_dot_entries(H, stride_hm, stride_hd, rows, row_ok, W, stride_wk, stride_wd,
                                               k0, k_end, HD, BLOCK_M, BLOCK_K, BLOCK_H, INPUT_PRECISION, WIDEN)
            bias = tl.load(B + cols, mask=col_ok, other=0.0)
            if PER_ROW:
                z = (acc + bias[None, :]) * row_scale[:, None]
            else:
                z = (acc + bias[None, :]) * inv_temp
            has_nan = tl.maximum(has_nan, tl.max((z != z).to(tl.int32), axis=1))
            z = tl.where(col_ok[None, :], z, float("-inf"))
            # online softmax: rescale the running sum to the new running max
            m_new = tl.maximum(m_run, tl.max(z, axis=1))
            s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m_run = m_new
            # running argmax of the key: z (greedy) or z + Gumbel noise (sampling)
            if PER_ROW:
                key = tl.where(noisy[:, None], z + _gumbel(seed, cols, step, BLOCK_M, BLOCK_K), z)
            elif SAMPLE:
                key = z + _gumbel(seed, cols, step, BLOCK_M, BLOCK_K)
            else:
                key = z
            tile_best = tl.max(key, axis=1)
            tile_id = first_index(key, tile_best, cols, K)
            if SAMPLE:
                tile_z = tl.sum(tl.where(cols[None, :] == tile_id[:, None], z, 0.0), axis=1)
            else:
                tile_z = tile_best
            # strict: equal keys keep the lower class index
            better, best, best_id = keep_better(tile_best, tile_id, best, best_id, False)
            best_z = tl.where(better, tile_z, best_z)
        s_run = tl.where(has_nan > 0, float("nan"), s_run)
        out = rows * NSPLIT + split
        tl.store(P_M + out, m_run, mask=row_ok)
        tl.store(P_S + out, s_run, mask=row_ok)
        tl.store(P_KEY + out, best, mask=row_ok)
        tl.store(P_Z + out, best_z, mask=row_ok)
        tl.store(P_ID + out, best_id, mask=row_ok)

    @triton.jit
    def _head_merge_kernel(P_M, P_S, P_KEY, P_Z, P_ID, OUT_P, OUT_ID, M, NSPLIT,
                           BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
        # Walks the slices in chunks of BLOCK_S (any NSPLIT, bounded registers): the running max
        # and rescaled sum as in the partial kernel, and the best key by a strict '>' over the
        # chunks in class order, so the first slice holding the best key wins.
        rows, row_ok = row_block(tl.program_id(0), M, BLOCK_M)
        m_all = tl.full([BLOCK_M], LOWEST_FLOAT, tl.float32)  # as in the partial kernel
        s_all = tl.zeros([BLOCK_M], tl.float32)
        key_best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        z_best = tl.zeros([BLOCK_M], tl.float32)
        id_best = tl.zeros([BLOCK_M], tl.int32)
        for s0 in range(0, NSPLIT, BLOCK_S):
            sp, ok, idx = slice_chunk(rows, row_ok, s0, NSPLIT, BLOCK_S)
            m = tl.load(P_M + idx, mask=ok, other=float("-inf"))
            s = tl.load(P_S + idx, mask=ok, other=0.0)
            key = tl.load(P_KEY + idx, mask=ok, other=float("-inf"))
            m_new = tl.maximum(m_all, tl.max(m, axis=1))
            s_all = s_all * tl.exp(m_all - m_new) + tl.sum(
                tl.where(ok, s * tl.exp(m - m_new[:, None]), 0.0), axis=1)
            m_all = m_new
            chunk_best, first = best_slice(key, sp, NSPLIT, False)
            better = chunk_best > key_best
            pick = rows * NSPLIT + first
            z = tl.load(P_Z + pick, mask=row_ok & better, other=0.0)
            ids = tl.load(P_ID + pick, mask=row_ok & better, other=0)
            key_best = tl.where(better, chunk_best, key_best)
            z_best = tl.where(better, z, z_best)
            id_best = tl.where(better, ids, id_best)
        # a row of -inf logits only has no softmax (its sum is 0): NaN, as the CPU path gives
        prob = tl.where(s_all == 0.0, float("nan"), tl.exp(z_best - m_all) / s_all)
        tl.store(OUT_P + rows, prob, mask=row_ok)
        tl.store(OUT_ID + rows, id_best.to(tl.int64), mask=row_ok)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

def _launches(h, weight, bias, seeds, prob, ids, temperature, step, precision,
              block_m=None, block_k=None, block_h=None, splits=None, sms=1, cuda=None):
    """The kernel launches of one call: [(kernel, grid, args, kwargs)], shared by the launcher and
    by the compile check (tests/test_triton_compile.py), so both see the same configs. ``sms``:
    multiprocessors of the device (sizes the default class split); ``cuda``: launch options for
    a GPU (default: whether h is on one). An odd width is padded to one divisible by 16."""
    h, weight = padded(h, weight)
    m, hd = h.shape
    k = weight.shape[0]
    if block_m is None:
        block_m = 64 if m >= 64 else max(16, triton.next_power_of_2(m))
    per_row = isinstance(temperature, torch.Tensor)  # float32 [M]: one temperature per row
    sample = per_row or temperature > 0
    fp32 = h.dtype == torch.float32
    # fp32 sampling: half-width class tiles; with per-row temperatures (the engine's mixed
    # batches) a quarter, the extra per-row scale and noise flags spill at 64 on sm_80
    block_k = block_k or ((32 if per_row else 64) if fp32 and sample else 128)
    block_h = block_h or (32 if fp32 else 64)
    row_blocks = triton.cdiv(m, block_m)
    if splits is None:  # about two waves of programs on the GPU
        splits = max(1, triton.cdiv(2 * sms, row_blocks))
    k_per, nsplit = split_scan.slices(k, block_k, splits)
    part = torch.empty(5, m, nsplit, dtype=torch.float32, device=h.device)
    part_id = torch.empty(m, nsplit, dtype=torch.int32, device=h.device)
    if seeds is None:
        seeds = ids  # never read when not sampling
    cuda = h.device.type == "cuda" if cuda is None else cuda
    # 4 warps hold a 64 x 128 tile with room to spare only for half greedy; fp32 operands (twice
    # the registers, FMA broadcasts) and the Gumbel noise (Philox state per logit) spill there,
    # so those get 8 warps, and fp32 sampling also half-width class tiles (set above)
    warps = 8 if block_m >= 32 and (sample or fp32) else 4
    partial = (
        _head_partial_kernel, (row_blocks, nsplit),
        (h, weight, bias, seeds, part[0], part[1], part[2], part[3], part_id,
         m, k, hd, k_per, nsplit,
         h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
         (1.0 / temperature) if sample and not per_row else 1.0, int(step),
         temperature if per_row else prob),  # TEMPS is never read unless per row
        dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_H=block_h, SAMPLE=sample, PER_ROW=per_row,
             # precision only means something for fp32 operands; half operands take the default
             INPUT_PRECISION=precision if h.dtype == torch.float32 else "tf32",
             WIDEN=interpreter_widen(h),
             **({"num_warps": warps, "num_stages": 3} if cuda else {})))
    merge_block = 32
    merge = (
        _head_merge_kernel, (triton.cdiv(m, merge_block),),
        (part[0], part[1], part[2], part[3], part_id, prob, ids, m, nsplit),
        dict(BLOCK_M=merge_block, BLOCK_S=split_scan.merge_chunk(nsplit),
             **({"num_warps": 4, "num_stages": 1} if cuda else {})))
    return [partial, merge]


def compile_variants(h, weight, *, sample, precision, sms):
    """[(label, kernel, args, kwargs)] a CUDA call on h [M, H] and weight [K, H] compiles (any
    device: only shapes, strides and dtypes matter), on a GPU with ``sms`` multiprocessors."""
    m, k = h.shape[0], weight.shape[0]
    bias = torch.empty(k, dtype=torch.float32)
    seeds, ids = torch.empty(m, dtype=torch.int64), torch.empty(m, dtype=torch.int64)
    prob = torch.empty(m, dtype=torch.float32)
    # sampling: one temperature for the batch, or one per row (the engine's mixed batches)
    temperatures = [1.0, torch.ones(m, dtype=torch.float32)] if sample else [0.0]
    return split_scan.compile_variants(
        [_launches(h, weight, bias, seeds, prob, ids, t, 5, precision, sms=sms, cuda=True)
         for t in temperatures])


def codebook_head_triton(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                         temperature=0.0, seeds: torch.Tensor | None = None, step: int = 0,
                         precision: str = "tf32x3", block_m: int | None = None,
                         block_k: int | None = None, block_h: int | None = None,
                         splits: int | None = None,
                         out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the two kernels on validated h [M, H], weight [K, H], float32 bias [K] and (when
    temperature > 0) int64 seeds [M]. Returns (prob float32 [M], ids int64 [M]).

    ``splits`` is the number of class slices (default: enough programs for ~2 waves on the GPU);
    results do not depend on it. ``out`` = preallocated (prob, ids) to write into. Runs on
    CUDA, or on the CPU under ``TRITON_INTERPRET=1``.
    """
    sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 1
    return split_scan.scan(
        h.shape[0], h.device, (torch.float32, torch.int64), out,
        lambda prob, ids: _launches(h, weight, bias, seeds, prob, ids, temperature, step, precision,
                                    block_m, block_k, block_h, splits, sms))


# --------------------------------------------------------------------------------------------
# CPU path
# --------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a*b for a 32-bit constant a and int64 b < 2^32, without
    overflowing int64 (b split into 16-bit halves)."""
    t = a * (b & 0xFFFF)
    u = a * (b >> 16) + (t >> 16)
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def philox4x32(k0, k1, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32 (Salmon et al., SC'11) on int64 tensors holding 32-bit words, the round
    structure of ``tl.philox``. Returns the four output words."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def gumbel_noise(seeds: torch.Tensor, cols: torch.Tensor, step: int) -> torch.Tensor:
    """The kernel's Gumbel noise on the CPU: float32 [len(seeds), len(cols)].

    Philox4x32-10 with key (low, high word of the int64 seed) and counter (col, step, 0, 0),
    first output word; bit-identical to the kernel's ``tl.philox`` draw.
    """
    seeds = seeds.to(torch.int64)
    k0 = (seeds & _MASK32)[:, None]
    k1 = ((seeds >> 32) & _MASK32)[:, None]
    c0 = (cols.to(torch.int64) & _MASK32)[None, :].expand(len(seeds), -1)
    c1 = torch.full_like(c0, int(step) & _MASK32)
    c2 = torch.zeros_like(c0)
    c0, _, _, _ = philox4x32(k0, k1, c0, c1, c2, c2)
    u = ((c0 >> 8).to(torch.float32) + 0.5) * 2.0 ** -24
    return -torch.log(-torch.log(u))


_EXP_FLOOR = -80.0
# Gumbel values drawn per step on the CPU: the Philox rounds then run on int64 blocks that stay
# in cache (2.3x faster per value than over a whole 64 x 10000 chunk on one core), and the noise
# of a 65,536-class chunk never exists at once
NOISE_BLOCK = 1 << 16


def _sampled_ids(z: torch.Tensor, seeds: torch.Tensor, step: int,
                 noisy: torch.Tensor | None = None) -> torch.Tensor:
    """Per row the first class maximising z + Gumbel noise (rows where ``noisy`` is False: z),
    the noise drawn for column slices of about NOISE_BLOCK values: within a slice torch.max
    takes the first maximum, across slices a strict '>' keeps the earlier (lower) class."""
    rows, k = z.shape
    per = max(1, NOISE_BLOCK // max(1, rows))
    cols = torch.arange(k, device=z.device)
    best = torch.full((rows,), float("-inf"), dtype=z.dtype, device=z.device)
    best_id = torch.zeros(rows, dtype=torch.int64, device=z.device)
    for c0 in range(0, k, per):
        zs = z[:, c0:c0 + per]
        key = zs + gumbel_noise(seeds, cols[c0:c0 + per], step)
        if noisy is not None:
            key = torch.where(noisy[:, None], key, zs)
        v, j = key.max(1)
        better = v > best
        best = torch.where(better, v, best)
        best_id = torch.where(better, j + c0, best_id)
    return best_id


def codebook_head_torch(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                        temperature=0.0, seeds: torch.Tensor | None = None, step: int = 0,
                        chunk: int = 1024,
                        out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path, blocked over rows: per chunk one GEMM (F.linear, fp32 accumulation; half inputs
    are widened, which is exact; a frozen model's folded head multiplies from its packed copy,
    ``frozen_weights``), then max / sum-exp / argmax over the classes. Scratch: one
    [rows, K] fp32 logit block, rows = ``split_scan.cpu_rows(chunk, K)`` (<= 128 MB), and when
    sampling Gumbel noise in blocks of NOISE_BLOCK values. Same contract and same Gumbel bits as
    :func:`codebook_head_triton` (``out``: preallocated (prob, ids) to write into);
    ``split_scan.row_best`` returns the first maximal index, so ties go to the lowest class.
    """
    m = h.shape[0]
    w = widened(weight)
    chunk = split_scan.cpu_rows(chunk, w.shape[0])
    prob, ids = split_scan.outputs(m, h.device, (torch.float32, torch.int64), out)
    per_row = isinstance(temperature, torch.Tensor)
    sample = per_row or temperature > 0
    if per_row:  # the kernel's rule: tau > 0 -> scale 1/tau (fp32) and noise; tau = 0 -> greedy
        noisy = temperature > 0
        scale = torch.where(noisy, 1.0 / torch.where(noisy, temperature, 1.0), 1.0)
    else:
        inv_temp = torch.tensor(1.0 / temperature if sample else 1.0, dtype=torch.float32).item()
    for r0 in range(0, m, chunk):
        z = frozen_weights.linear(h[r0:r0 + chunk].float(), w, bias)  # a frozen model's head: packed
        if per_row:
            z.mul_(scale[r0:r0 + chunk, None])
        elif sample:
            z.mul_(inv_temp)
        if sample:
            zmax = z.amax(1)
            i = _sampled_ids(z, seeds[r0:r0 + chunk], step, noisy[r0:r0 + chunk] if per_row else None)
            zi = z.gather(1, i[:, None])[:, 0]
        else:
            zmax, i = split_scan.row_best(z, largest=True)
            zi = zmax
        # in place: z becomes exp(z - max), then its row sums. Terms below e^-80 are raised to
        # e^-80 so exp never produces subnormals (a 10-40x slowdown on x86 for sharp logits);
        # even 2^31 such terms add < 4e-26 to a sum >= 1, far below fp32's last bit: the result
        # is unchanged.
        s = z.sub_(zmax[:, None]).clamp_(min=_EXP_FLOOR).exp_().sum(1)
        prob[r0:r0 + chunk] = torch.exp(zi - zmax) / s
        ids[r0:r0 + chunk] = i
        del z  # before the next chunk's GEMM: one block alive at a time
    return prob, ids


# --------------------------------------------------------------------------------------------
# backends, the custom op, the public entry point
# --------------------------------------------------------------------------------------------

def _run_triton(h, weight, bias, *, temperature, seeds, step, precision):
    return codebook_head_triton(h, weight, bias, temperature=temperature, seeds=seeds, step=step,
                                precision=precision)


def _run_torch(h, weight, bias, *, temperature, seeds, step, precision):
    return codebook_head_torch(h, weight, bias, temperature=temperature, seeds=seeds, step=step)


# ||prob - ref|| / ||ref|| against the float64 head on the same (rounded) inputs: half inputs
# multiply exactly in fp32, so every dtype is held to fp32's bound (the "tf32" precision is not:
# its logits carry ~3 digits, see the module docstring)
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
split_scan.register_backends("codebook_head", triton_impl=_run_triton, torch_impl=_run_torch,
                             tolerances=TOLERANCES)


@torch.library.custom_op("xlx_fast::codebook_head", mutates_args=())
def _codebook_head_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      temperatures: Optional[torch.Tensor], temperature: float,
                      seeds: Optional[torch.Tensor], step: int, precision: str,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prob, ids) of validated h [M, H], weight [K, H], fp32 bias [K]; per-row temperatures
    [M] when given, else the scalar; backend "" = the registry's choice."""
    tau = temperature if temperatures is None else temperatures

    def trial(impl):
        return impl.impl(h, weight, bias, temperature=tau, seeds=seeds, step=step, precision=precision)

    return trial(measured.select("codebook_head", h.device, h.dtype, backend or None, trial,
                                 h, weight, temperatures, temperature > 0, seeds, precision))


@_codebook_head_op.register_fake
def _(h, weight, bias, temperatures, temperature, seeds, step, precision, backend):
    return h.new_empty(h.shape[0], dtype=torch.float32), h.new_empty(h.shape[0], dtype=torch.int64)


def _raise_nan(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, prob: torch.Tensor):
    """Error path only: find which argument holds the NaN (full scans are fine here)."""
    rows = torch.nonzero(torch.isnan(prob)).flatten()[:8].tolist()
    if bool(torch.isnan(h).any()):
        raise ValueError(f"h contains NaN (rows {rows})")
    if bool(torch.isnan(weight).any()):
        raise ValueError("weight contains NaN")
    if bool(torch.isnan(bias).any()):
        raise ValueError("bias contains NaN")
    raise ValueError(f"h, weight and bias give non-finite logits (rows {rows}); inputs contain inf")


def codebook_head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  temperature=0.0, seeds: torch.Tensor | None = None, step: int = 0,
                  precision: str = "tf32x3", check_nan: bool = True,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prob, id) of softmax(h·Wᵀ + b) per row, the logits never stored.

    Args:
        h: [..., H] float32/float16/bfloat16 (e.g. [B, 64, 768] hidden states).
        weight: [K, H], same dtype and device as h (e.g. the folded head from :func:`fold_head`).
        bias: [K] (any float dtype; used in fp32) or None.
        temperature: 0 → greedy argmax and the softmax maximum (the reference's
            ``softmax(logits).max(-1)``); τ > 0 → a Gumbel-max sample of softmax(logits/τ) and
            the probability softmax(logits/τ) gives to it. A float32 tensor of h.shape[:-1]
            (or [M]) gives each row its own τ (0 = greedy row; finite, >= 0: values are not
            checked here, which would sync; the caller validates them).
        seeds: int64, h.shape[:-1] (or [M]) per-row seeds; required when temperature > 0.
        step: sampling step, part of the RNG counter (0 ≤ step < 2^31).
        precision: for float32 inputs on CUDA (the CPU is IEEE): "tf32x3" (default; fp32-level
            error, tensor cores), "ieee" (FMA units, slower) or "tf32" (fastest, ~3 digits).
        check_nan: look for NaN in the [M] output and raise (one small host sync on CUDA);
            a hot loop that validates its inputs elsewhere may turn it off.
        backend: None (the registry's choice for the device: CUDA → "triton", CPU → "torch";
            see ``xlx-fast info``) or a backend by name ("triton" runs CPU tensors only under
            ``TRITON_INTERPRET=1``); one that cannot run here raises naming why.

    Returns:
        prob float32 h.shape[:-1], ids int64 h.shape[:-1]. Ties go to the lowest class.

    Runs the custom op ``torch.ops.xlx_fast.codebook_head``. NaN in h, weight or bias raises
    ValueError (checked on the [M] output unless ``check_nan`` is False; skipped while a CUDA
    graph is captured or torch.compile traces, where a value cannot be read without a sync).
    """
    check_tensor("h", h, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES)
    check_same_dtype("weight", weight, "h", h)
    if h.dim() < 1:
        raise ValueError("h must have shape [..., H]")
    check_tensor("weight", weight, dim=2)
    k = weight.shape[0]
    if k < 1:
        raise ValueError("weight has no classes (K = 0)")
    if weight.shape[1] != h.shape[-1]:
        raise ValueError(f"h has hidden size {h.shape[-1]} but weight has H = {weight.shape[1]}")
    check_tensor("weight", weight, device=h.device, device_of="h")
    if bias is None:
        bias = torch.zeros(k, dtype=torch.float32, device=h.device)
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError("bias must be a floating-point torch.Tensor or None")
    check_tensor("bias", bias, shape=(k,), device=h.device, device_of="h")
    check_choice("precision", precision, PRECISIONS)
    step = check_int("step", step, 0, 2 ** 31, hi_text="2^31")
    check_device("h", h)
    h2 = h.reshape(-1, h.shape[-1])
    m = h2.shape[0]
    temperatures = None
    if isinstance(temperature, torch.Tensor):
        check_tensor("temperature", temperature, dtypes=(torch.float32,), device=h.device, device_of="h")
        if temperature.numel() != m:
            raise ValueError(f"temperature must have one entry per row ({m}), got shape "
                             f"{tuple(temperature.shape)}")
        temperatures, temperature = temperature.reshape(m).contiguous(), 0.0
    else:
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if temperatures is not None or temperature > 0:
        if seeds is None:
            raise ValueError("seeds (one int64 per row) are required when temperature > 0")
        check_tensor("seeds", seeds, dtypes=INDEX_DTYPES)
        if seeds.numel() != m:
            raise ValueError(f"seeds must have one entry per row ({m}), got shape {tuple(seeds.shape)}")
        seeds = seeds.reshape(m).to(h.device, torch.int64).contiguous()
    bias = bias.to(torch.float32).contiguous()
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()

    prob, ids = torch.ops.xlx_fast.codebook_head(h2, weight, bias, temperatures, temperature, seeds,
                                                 step, precision, backend or "")
    if check_nan and m and not torch.compiler.is_compiling() \
            and not (h.is_cuda and torch.cuda.is_current_stream_capturing()) \
            and bool(torch.isnan(prob).any()):
        _raise_nan(h2, weight, bias, prob)
    return prob.reshape(h.shape[:-1]), ids.reshape(h.shape[:-1])


@torch.no_grad()
def fold_head(linear_feat, out_cluster) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``linear_feat`` (Linear 768→2048) then ``out_cluster`` (Linear 2048→K) into one map.

    out_cluster(linear_feat(x)) = W_out (W_feat x + b_feat) + b_out = W x + b with
    W = W_out·W_feat [K, 768] and b = W_out·b_feat + b_out [K]. Computed in float64 and rounded
    once to out_cluster's dtype, so the folded map is at least as accurate as the two fp32 layers
    it replaces (which round twice). Either argument may be an nn.Linear or any object with
    ``weight`` and ``bias`` (bias may be None).
    """
    w_feat, b_feat = linear_feat.weight, linear_feat.bias
    w_out, b_out = out_cluster.weight, out_cluster.bias
    if w_feat.dim() != 2 or w_out.dim() != 2:
        raise ValueError("linear_feat and out_cluster weights must be 2-D")
    if w_out.shape[1] != w_feat.shape[0]:
        raise ValueError(f"out_cluster takes {w_out.shape[1]} features but linear_feat gives "
                         f"{w_feat.shape[0]}")
    w_out64 = w_out.double()
    w = w_out64 @ w_feat.to(w_out.device).double()
    b = torch.zeros(w_out.shape[0], dtype=torch.float64, device=w_out.device)
    if b_feat is not None:
        b += w_out64 @ b_feat.to(w_out.device).double()
    if b_out is not None:
        b += b_out.double()
    return w.to(w_out.dtype), b.to(w_out.dtype)
