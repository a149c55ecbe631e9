"""Fused multi-head attention with a key padding mask (the attention inside HF ``LxmertAttention``).

Math. For every batch row ``b``, head ``h`` and query ``i``::

    s_ij = (q_i · k_j) / sqrt(d) + bias_bj
    o_i  = sum_j softmax_j(s_ij) · v_j

with ``q_i``, ``k_j``, ``v_j`` the ``d`` columns ``h·d .. h·d+d-1`` of the projections, laid out
``(B, L, H·d)`` exactly as ``nn.Linear`` writes them, and the output written back in the same
``(B, Lq, H·d)`` layout that the output dense reads: no transposes, no contiguous copies.

Mask semantics (``key_padding_mask``):

- ``None``: every key is attended.
- bool or integer ``[B, Lk]``: nonzero = attend, zero = padded key (HF's ``attention_mask``).
  A padded key gets ``bias = finfo(float32).min``.
- floating ``[B, 1, 1, Lk]``: HF's additive extended mask (``(1 - mask) · finfo(dtype).min``),
  added to the scores as is. Values below ``finfo(float32).min`` (``-inf`` included) are clamped
  to it.

Either way a masked key gets a huge finite negative bias, never ``-inf``: a row whose keys are all
masked therefore gets the plain mean of ``V`` over all ``Lk`` keys, which is what HF's eager
softmax gives, and never NaN. (An fp16 extended mask holds only -65504: its fully masked rows
get the softmax of the scores shifted by that constant, as the formula says.) The Triton kernel reads the mask in place, in any of these dtypes
and with any strides, so HF's extended mask is never converted, neither per layer nor per forward.

Backends (registered in :mod:`xlx_fast.ops.registry`, which picks one per device, explicitly):

- CUDA tensors: ``attention_triton``, a FlashAttention-style forward kernel (online softmax in
  base 2, fp32 accumulation). Without Triton installed this raises instead of falling back.
- CPU tensors: ``attention_sdpa``, i.e. ``torch.nn.functional.scaled_dot_product_attention``
  with the mask turned into an fp32 additive ``[B, 1, 1, Lk]`` bias (B·Lk elements per call).
  fp16 inputs are computed in fp32 there.
  The Triton kernel runs on the CPU only under ``TRITON_INTERPRET=1`` and when named, i.e. in
  tests; SDPA runs CUDA tensors only when named (benchmarks).

Precision. fp16/bf16 inputs: both products run on the tensor cores in the input dtype with fp32
accumulation, the probabilities are rounded to the input dtype before ``P·V`` (as in
FlashAttention). fp32 inputs: IEEE fp32 products, or tf32 when
``torch.get_float32_matmul_precision()`` is not ``"highest"`` (the same switch as torch matmul).
tf32 rounding model (:mod:`xlx_fast.ops.dot_error`): Triton passes raw fp32 registers to the tf32
MMA, which truncates each operand to 10 significand bits (relative error < 2^-10, not the 2^-11
of rounding), so a score errs by at most eps_ij = gamma(d)·sum_l |q_il k_jl| / sqrt(d) with
gamma(d) = 2·2^-10 + 2^-20 + d·2^-23; every softmax weight then moves by a factor within
e^(±2 max_j eps_ij), and P·V adds gamma(Lk)·sum_j p_ij |v_jc|. Hence per output element
``|o_ic - o_ic(exact)| <= (e^(2 eps_i) - 1 + gamma(Lk)) sum_j p_ij |v_jc|`` plus fp32 rounding
(about 1e-5 of it). At d = 64 with unit-variance q, k the bound is about 2% of
sum_j p_ij |v_jc| (a worst case; typical errors are far smaller).

Memory traffic: each program reads its ``BLOCK_M×d`` query tile once and streams K, V of its
(b, h) once per query tile; the ``Lq×Lk`` scores never leave registers. Per call that is
``2·B·H·Lk·d·ceil(Lq/BLOCK_M) + B·H·Lq·d`` elements read, ``B·Lq·H·d`` written, plus ``B·Lk``
mask elements per query tile. At LXMERT lengths (20, 64) one tile covers the whole sequence, so
every byte is touched once. Short sequences give few, small tiles, so one program handles
``ROWS`` consecutive (b, h) pairs and the autotuner picks tiles and ``ROWS`` per (Lq, Lk, d,
number of (b, h) pairs rounded up to a power of two).

Registers: every tuning config compiles without spills or stack frame for sm_80 and sm_90 (checked
by tests/test_triton_compile.py); fp32 has its own, smaller tiles (16/32 query rows).

NaN and inf. NaN in q, k or v gives NaN where the formula does, on both backends. inf in q or k
can make every score of a row -inf; the formula's softmax is then NaN, which the Triton kernel
gives, but torch's CPU kernel (``attention_sdpa``) writes 0 for such a row (it takes all -inf
rows for fully masked ones). Detecting it would cost a pass over q and k on every call.

Limits: head dim 32, 64 or 128; fp32, fp16, bf16 inputs (q, k, v of one dtype); any Lq, Lk >= 1;
forward only (no autograd: ``xlx_fast.optimize`` keeps the eager path wherever a gradient is
needed); the last dimension of q, k, v and out may have any stride, though stride 1 is the fast
case; query tiles form grid axis 1, so ``Lq <= 65535·BLOCK_M``. The first call per tuning key
(which includes the dtype) benchmarks the candidates: run one before capturing a CUDA graph.
With ``XLX_FAST_TUNING=test`` (the test suite) it takes the first fitting config instead.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import _common
from ._common import FLOAT_DTYPES, HAS_TRITON, check_tensor, inference_op, interpreting, tl, triton
from . import measured
from .registry import Capability, register_op, triton_capability

__all__ = ["attention", "attention_triton", "attention_sdpa", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)
_FP32_MIN = torch.finfo(torch.float32).min
_LOG2E = 1.4426950408889634

# Mask kinds (a constexpr of the kernel).
_NO_MASK, _KEEP_MASK, _ADDITIVE_MASK = 0, 1, 2


if HAS_TRITON:

    @triton.jit
    def _mma(a, b, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # Triton 3.6's interpreter multiplies bf16 operands as their raw uint16 bits. A product of
        # two bf16 values is exact in fp32, so upcasting first gives what the tensor cores give.
        if UPCAST:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            r = tl.dot(a, b, input_precision=INPUT_PRECISION)
        return r

    @triton.jit
    def _attn_fwd(
        Q, K, V, Mask, Out,
        stride_qb, stride_qm, stride_qd,
        stride_kb, stride_kn, stride_kd,
        stride_vb, stride_vn, stride_vd,
        stride_mb, stride_mn,
        stride_ob, stride_om, stride_od,
        BH, H, Lq, Lk, qk_scale,
        BH_BUCKET,  # autotuning key only: number of (b, h) pairs rounded up to a power of two
        MASK_KIND: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        FP32_MIN: tl.constexpr = -3.4028234663852886e38
        LOG2E: tl.constexpr = 1.4426950408889634
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_in = offs_m < Lq
        # Several (b, h) pairs per program: at L = 20 one pair is a single small tile, too little
        # work to amortise a program's start-up.
        for r in tl.static_range(ROWS):
            bh = tl.program_id(0) * ROWS + r
            if bh < BH:
                b = (bh // H).to(tl.int64)
                col = (bh % H) * HEAD_DIM + offs_d  # this head's columns in the (B, L, H·d) rows
                q = tl.load(Q + b * stride_qb + offs_m[:, None] * stride_qm + col[None, :] * stride_qd,
                            mask=q_in[:, None], other=0.0)
                m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 units)
                l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of exp2(s - m_i)
                acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)      # running sum of exp2(s - m_i)·v
                for start_n in range(0, Lk, BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    k_in = offs_n < Lk
                    kt = tl.load(K + b * stride_kb + offs_n[None, :] * stride_kn + col[:, None] * stride_kd,
                                 mask=k_in[None, :], other=0.0)
                    # scores in base 2: s = q·k/sqrt(d)·log2(e) (+ bias·log2(e)), so exp2 below is exp
                    s = _mma(q, kt, INPUT_PRECISION, UPCAST_DOT) * qk_scale
                    if MASK_KIND == 1:
                        keep = tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=k_in, other=1)
                        s = tl.where((keep != 0)[None, :], s, FP32_MIN)
                    if MASK_KIND == 2:
                        bias = tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=k_in, other=0.0)
                        # clamp: masked keys stay finite, so an all-masked row averages V, not NaN
                        s = s + tl.maximum(bias.to(tl.float32) * LOG2E, FP32_MIN)[None, :]
                    # keys past Lk (tile padding) are not keys at all: exactly zero weight
                    s = tl.where(k_in[None, :], s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
                    p = tl.math.exp2(s - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    v = tl.load(V + b * stride_vb + offs_n[:, None] * stride_vn + col[None, :] * stride_vd,
                                mask=k_in[:, None], other=0.0)
                    acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, INPUT_PRECISION, UPCAST_DOT)
                    m_i = m_new
                acc = acc / l_i[:, None]  # l_i >= 1: the row max contributes exp2(0)
                tl.store(Out + b * stride_ob + offs_m[:, None] * stride_om + col[None, :] * stride_od,
                         acc.to(Out.dtype.element_ty), mask=q_in[:, None])

    def _config(block_m, block_n, rows, num_warps, num_stages):
        return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "ROWS": rows},
                             num_warps=num_warps, num_stages=num_stages)

    # sm_80 / sm_90 candidates, each free of register spills and stack frames on both
    # (tests/test_triton_compile.py compiles every one for every head dim and mask kind).
    # fp16/bf16 (tensor cores, operands in 16 bits): L in {20, 64} take one 32- or 64-row tile
    # per (b, h), several pairs per program when the batch is large; longer sequences the usual
    # 64/128 x 64 tiles.
    _HALF_CONFIGS = [
        _config(32, 32, 1, 2, 1),
        _config(32, 32, 2, 2, 2),
        _config(64, 32, 1, 4, 2),
        _config(128, 64, 1, 8, 2),
    ]
    # fp32: every operand tile takes twice the registers, and IEEE products run on the FMA units
    # with the operands broadcast through registers; 64-row tiles spill there (up to 16 KB of
    # stack at head dim 128), so fp32 gets 16- and 32-row tiles.
    _FP32_CONFIGS = [
        _config(16, 32, 1, 4, 1),
        _config(16, 32, 2, 4, 1),
        _config(32, 32, 1, 8, 1),
    ]
    _CONFIGS = _HALF_CONFIGS + _FP32_CONFIGS

    def _prune(configs, named_args, **kwargs):
        # Configs of the operand dtype only; tiles much larger than the sequence only add
        # padding; several (b, h) pairs per program only pay off when there are many pairs.
        lq, lk, bh = named_args["Lq"], named_args["Lk"], named_args["BH"]
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        mine = _FP32_CONFIGS if named_args["Q"].dtype == torch.float32 else _HALF_CONFIGS
        kept = [
            c for c in configs
            if c in mine
            and c.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(lq))
            and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(lk))
            and (c.kwargs["ROWS"] == 1 or bh >= 1024)
            and not (head_dim == 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)
        ] or [c for c in configs if c in mine][:1]
        if tuning() == "test":
            return kept[:1]  # one config per key: no benchmarking, one compile
        return kept

    _attn_fwd_tuned = triton.autotune(
        configs=_CONFIGS,
        key=["Lq", "Lk", "BH_BUCKET", "HEAD_DIM", "MASK_KIND", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": _prune},
    )(_attn_fwd)

    # Under the interpreter (tests) there is nothing to tune: small tiles so that short test
    # lengths still span several query and key tiles, and two (b, h) pairs per program.
    _INTERPRET_CONFIG = _config(16, 16, 2, 4, 1)


TUNING_ENV = "XLX_FAST_TUNING"


def tuning() -> str:
    """"full" (default): the autotuner benchmarks every fitting config on the first call per
    tuning key. "test" (``XLX_FAST_TUNING=test``, set by the test suite): the first fitting
    config only, so a GPU test run compiles one kernel per key and benchmarks nothing; the
    wide search belongs to benchmarks and to the first call of a real workload."""
    value = os.environ.get(TUNING_ENV, "full")
    if value not in ("full", "test"):
        raise ValueError(f"{TUNING_ENV} must be 'full' or 'test', got {value!r}")
    return value


def _check_inputs(q, k, v, key_padding_mask, num_heads, out):
    """Validates arguments; returns (B, Lq, Lk, H, head_dim)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dim=3, layout="(B, L, num_heads*head_dim)", dtypes=FLOAT_DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    B, Lq, width = q.shape
    if width % num_heads:
        raise ValueError(f"q width {width} is not a multiple of num_heads={num_heads}")
    head_dim = width // num_heads
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} (q width {width} / num_heads {num_heads}) is not "
                         f"supported; supported head dims: {SUPPORTED_HEAD_DIMS}")
    if k.shape[2] != width or v.shape[2] != width:
        raise ValueError(f"k and v must have q's width {width} (num_heads*head_dim), "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    Lk = k.shape[1]
    if k.shape[0] != B or v.shape[0] != B or v.shape[1] != Lk:
        raise ValueError(f"k and v must have shape ({B}, Lk, {width}) with one Lk, "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if B == 0 or Lq == 0 or Lk == 0:
        raise ValueError(f"empty input: batch {B}, Lq {Lq}, Lk {Lk} (all must be >= 1)")
    m = key_padding_mask
    if m is not None:
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(m).__name__}")
        if m.device != q.device:
            raise ValueError(f"key_padding_mask is on {m.device}, q on {q.device}")
        if m.dtype == torch.bool or not (m.dtype.is_floating_point or m.dtype.is_complex):
            if tuple(m.shape) != (B, Lk):
                raise ValueError(f"bool/int key_padding_mask must have shape (B, Lk) = ({B}, {Lk}), "
                                 f"got {tuple(m.shape)}")
        elif m.dtype.is_floating_point:
            if tuple(m.shape) != (B, 1, 1, Lk):
                raise ValueError(f"floating (additive) key_padding_mask must have shape (B, 1, 1, Lk) = "
                                 f"({B}, 1, 1, {Lk}), got {tuple(m.shape)}")
        else:
            raise TypeError(f"key_padding_mask must be bool, integer or floating, got {m.dtype}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != (B, Lq, width) or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must be a {q.dtype} tensor of shape ({B}, {Lq}, {width}) on {q.device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return B, Lq, Lk, num_heads, head_dim


def attention_triton(q, k, v, key_padding_mask=None, *, num_heads, out=None):
    """The Triton kernel: ``softmax(q·kᵀ/√d + mask)·v`` per head, see the module docstring.

    Args:
        q: ``(B, Lq, H·d)``; k, v: ``(B, Lk, H·d)``; any strides (e.g. column slices of one fused
            QKV projection output). fp32, fp16 or bf16, one dtype, one device.
        key_padding_mask: ``None``, bool/int ``(B, Lk)`` (nonzero = attend) or HF's additive
            floating ``(B, 1, 1, Lk)``; read in place.
        num_heads: H; ``d = q.shape[-1] // H`` must be 32, 64 or 128.
        out: optional ``(B, Lq, H·d)`` destination (any strides), e.g. to avoid an allocation.

    Returns ``out`` (allocated contiguous if not given), in q's dtype. CUDA tensors, or CPU tensors
    under ``TRITON_INTERPRET=1`` (tests); anything else raises.
    """
    B, Lq, Lk, H, head_dim = _check_inputs(q, k, v, key_padding_mask, num_heads, out)
    if not _common.HAS_TRITON:
        raise RuntimeError("attention_triton needs the 'triton' package (pip install xlx_fast[triton])")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"attention_triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                         f"got q on {q.device}; use attention() to dispatch")
    if out is None:
        out = torch.empty(B, Lq, H * head_dim, device=q.device, dtype=q.dtype)
    _launch(q, k, v, key_padding_mask, out, H, head_dim)
    return out


def _launch(q, k, v, mask, out, num_heads, head_dim, config=None):
    """Launches the kernel on validated arguments: autotuned on the GPU, ``_INTERPRET_CONFIG`` under
    the interpreter, or the given ``triton.Config`` (tests run every tuning candidate this way)."""
    B, Lq, _ = q.shape
    Lk = k.shape[1]
    if mask is None:
        mask_kind, mask, stride_mb, stride_mn = _NO_MASK, q, 0, 0  # q: a dummy pointer, never read
    elif mask.dtype.is_floating_point:
        mask_kind, stride_mb, stride_mn = _ADDITIVE_MASK, mask.stride(0), mask.stride(3)
    else:
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # same bytes; Triton loads bytes more reliably than i1
        mask_kind, stride_mb, stride_mn = _KEEP_MASK, mask.stride(0), mask.stride(1)

    if q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        precision = "ieee"
    else:  # tf32 for fp32 when torch allows it; fp16/bf16 operands ignore it (exact on tensor cores)
        precision = "tf32"

    BH = B * num_heads
    args = (
        q, k, v, mask, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_mb, stride_mn,
        out.stride(0), out.stride(1), out.stride(2),
        BH, num_heads, Lq, Lk, _LOG2E / math.sqrt(head_dim),
        triton.next_power_of_2(BH),
    )
    consts = dict(MASK_KIND=mask_kind, HEAD_DIM=head_dim, INPUT_PRECISION=precision,
                  UPCAST_DOT=interpreting() and q.dtype == torch.bfloat16)

    def grid(meta):
        return (triton.cdiv(BH, meta["ROWS"]), triton.cdiv(Lq, meta["BLOCK_M"]))

    if config is None and interpreting():
        config = _INTERPRET_CONFIG
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if config is None:
            _attn_fwd_tuned[grid](*args, **consts)
        else:
            _attn_fwd[grid](*args, **consts, **config.kwargs,
                            num_warps=config.num_warps, num_stages=config.num_stages)


def attention_sdpa(q, k, v, key_padding_mask=None, *, num_heads, out=None):
    """The same op through ``torch.nn.functional.scaled_dot_product_attention`` (the CPU path).

    Same arguments, checks and mask semantics as ``attention_triton``. The mask becomes an fp32
    additive ``(B, 1, 1, Lk)`` bias (a masked key gets ``finfo(float32).min``); fp16 inputs are
    computed in fp32 so that this bias stays representable. Without a mask the bias is zero
    (a broadcast view), so that NaN in q gives NaN as the formula does (see the code).
    """
    _check_inputs(q, k, v, key_padding_mask, num_heads, out)
    return _sdpa(q, k, v, key_padding_mask, num_heads=num_heads, out=out)


def _sdpa(q, k, v, key_padding_mask=None, *, num_heads, out=None):
    """:func:`attention_sdpa` on validated arguments: the registered backend (the op validated
    them before dispatch; at batch 1 a second check was a tenth of the call)."""
    B, Lq, width = q.shape
    Lk, H, head_dim = k.shape[1], num_heads, width // num_heads
    compute = torch.float32 if q.dtype == torch.float16 else q.dtype
    # CPU SDPA takes an fp32 bias with any query dtype; elsewhere it must match the query.
    bias_dtype = torch.float32 if q.device.type == "cpu" else compute
    bias_min = torch.finfo(bias_dtype).min
    bias = None
    m = key_padding_mask
    if m is not None:
        if m.dtype.is_floating_point:
            bias = m.to(bias_dtype).clamp_min(bias_min)  # -inf (or fp32 min cast to bf16) -> finite
        else:
            bias = torch.zeros(m.shape, dtype=bias_dtype, device=m.device).masked_fill_(m == 0, bias_min)
            bias = bias.view(B, 1, 1, Lk)

    elif q.device.type == "cpu":
        # A zero bias even without a mask, as a stride-0 view of one element (no memory, and no
        # measurable time): torch's CPU flash kernel takes the row maximum of unmasked scores with
        # a comparison that skips NaN, so a row of all-NaN scores (NaN in q) gets max -inf, is
        # taken for a fully masked row and zero-filled, returning 0 where the formula gives NaN.
        # With a bias it takes the masked branch, whose maximum propagates NaN.
        bias = torch.zeros((), dtype=bias_dtype, device=q.device).expand(B, 1, 1, Lk)

    def heads(t):  # (B, L, H·d) -> (B, H, L, d) view, no copy (fp16: widened)
        t = t.view(B, t.shape[1], H, head_dim).transpose(1, 2)  # a view of a column slice too
        return t if t.dtype == compute else t.to(compute)

    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias)
    o = o.transpose(1, 2).flatten(2)
    if out is None:
        return o.to(q.dtype)
    return out.copy_(o)


# ||out - ref|| / ||ref|| against HF's formula in float64 (SPEC §4); fp32 through tf32 products
# (torch's matmul precision not "highest") is held to the elementwise bound of the docstring instead
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
register_op("attention", "triton", impl=attention_triton, capability=triton_capability(dtypes=FLOAT_DTYPES),
            preference_rank=0, tolerances=TOLERANCES)
# on CUDA only when named: there the Triton kernel is the op, and a missing triton is an error
register_op("attention", "sdpa", impl=_sdpa,
            capability=Capability(devices=("cpu",), on_request=("cuda",), measured_on=("cuda",),
                                  dtypes=FLOAT_DTYPES),
            preference_rank=1, tolerances=TOLERANCES)


def _run(q, k, v, key_padding_mask, num_heads, backend, out=None):
    def trial(impl):
        return impl.impl(q, k, v, key_padding_mask, num_heads=num_heads, out=out)

    return trial(measured.select("attention", q.device, q.dtype, backend or None, trial,
                                 q, k, v, key_padding_mask, num_heads, out))


measured.install("attention")  # on CUDA, per shape: this kernel or SDPA, whichever is faster


def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_padding_mask: Optional[torch.Tensor], num_heads: int, backend: str) -> torch.Tensor:
    """A new (B, Lq, H·d) output of validated inputs; backend "" = the registry's choice."""
    return _run(q, k, v, key_padding_mask, num_heads, backend)


def _attention_fake(q, k, v, key_padding_mask, num_heads, backend):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2])


inference_op("attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, int num_heads, "
             "str backend) -> Tensor", _attention_op, _attention_fake)


@torch.library.custom_op("xlx_fast::attention_out", mutates_args=("out",))
def _attention_out_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: Optional[torch.Tensor], out: torch.Tensor, num_heads: int,
                      backend: str) -> None:
    """The same, written into ``out`` (any strides): no allocation."""
    _run(q, k, v, key_padding_mask, num_heads, backend, out=out)


@_attention_out_op.register_fake
def _(q, k, v, key_padding_mask, out, num_heads, backend):
    return None


def attention(q, k, v, key_padding_mask=None, *, num_heads, out=None, backend=None):
    """Multi-head attention ``softmax(q·kᵀ/√d + mask)·v`` on ``(B, L, H·d)`` projections.

    The backend is the registry's choice for the device (CUDA: ``attention_triton``, CPU:
    ``attention_sdpa``, never the interpreter; ``xlx-fast info`` shows it), or the one named by
    ``backend`` ("triton": CPU tensors only under ``TRITON_INTERPRET=1``; "sdpa"), which raises
    naming why if it cannot run here. Runs the custom op ``torch.ops.xlx_fast.attention`` (or
    ``attention_out`` with ``out``). Arguments, mask semantics and limits: see the module
    docstring and ``attention_triton``. Returns ``(B, Lq, H·d)`` in q's dtype (``out`` when given).
    """
    _check_inputs(q, k, v, key_padding_mask, num_heads, out)
    if q.device.type not in _common.DEVICE_TYPES:
        raise ValueError(f"attention supports CUDA and CPU tensors, got q on {q.device}")
    if out is None:
        return torch.ops.xlx_fast.attention(q, k, v, key_padding_mask, num_heads, backend or "")
    torch.ops.xlx_fast.attention_out(q, k, v, key_padding_mask, out, num_heads, backend or "")
    return out
