"""A linear layer with its epilogue fused: bias, GELU, residual add and LayerNorm in one op.

Math. For x [M, K], weight W [N, K], bias b [N], optional residual r [M, N] and LayerNorm
weights (γ, β) [N]::

    y = x·Wᵀ + b
    y = GELU(y) = y·(1 + erf(y/√2))/2          if activation == "gelu"
    y = y + r                                  if a residual is given
    y = (y - mean(y)) / sqrt(var(y) + eps)·γ + β   over the N columns, if γ, β are given

which covers every linear of a transformer step: ``LxmertIntermediate`` (dense, GELU), the
``LxmertAttentionOutput`` / ``LxmertOutput`` pair (dense, then LayerNorm(· + input)) and the
head's ``LxmertPredictionHeadTransform`` (dense, GELU, LayerNorm). HF runs each as two to four
kernels with the [M, N] intermediate written to memory and read back between them; here it is
one op (one kernel on a GPU, one dispatch on a CPU).

Backends (``xlx_fast.ops.registry``):

- ``triton`` (CUDA): one program owns BLOCK_M rows and BLOCK_N columns, accumulates x·Wᵀ in fp32
  over K in BLOCK_K tiles (``tl.dot``; fp32 inputs through three tf32 products, "tf32x3", with
  fp32-level error, see :mod:`xlx_fast.ops.dot_error`), and applies the epilogue in registers.
  With a LayerNorm one program spans the whole row (BLOCK_N = next power of two >= N, so N is
  limited to ``MAX_LAYERNORM_WIDTH``), as the mean and variance need every column. Traffic: W
  once per row block, x once per column block, r, γ, β, b once, y written once; the
  intermediate never leaves registers. Everything between the GEMM and the store is fp32, so
  in bf16/fp16 it rounds once where HF rounds after every step (closer to the fp32 result).
- ``torch`` (CPU; CUDA when named or measured faster): HF's own ops in HF's order (``F.linear``,
  ``F.gelu``, the add, ``F.layer_norm``), so it is bit for bit HF's result. The GEMM of a frozen
  model's weight on a CPU runs against its packed copy (``ops.frozen_weights``, same bits). On a GPU it is what the dispatcher picks where cuBLAS's GEMM
  beats the fused kernel.

Both are behind the custom op ``torch.ops.xlx_fast.fused_linear`` (a fake implementation for
``torch.compile``/``torch.export``), which counts as one operation in a dispatch count.

Limits: x, W, r and y 2-D (callers flatten the batch), x's and W's last dimension contiguous,
one float dtype for x, W, b, r, γ, β; N <= ``MAX_LAYERNORM_WIDTH`` with a LayerNorm.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _common
from ._common import FLOAT_DTYPES, check_choice, check_tensor, inference_op, tl, triton
from .codebook_tile import interpreter_widen
from . import frozen_weights, measured
from .registry import Capability, register_op, triton_capability

__all__ = ["fused_linear", "linear_gelu", "linear_add_layernorm", "linear_gelu_layernorm", "feed_forward",
           "ACTIVATIONS", "MAX_LAYERNORM_WIDTH"]

ACTIVATIONS = ("none", "gelu")
MAX_LAYERNORM_WIDTH = 1024  # one program holds whole rows of the accumulator in registers

# ||y - ref|| / ||ref|| against the float64 formula (SPEC §4)
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


if _common.HAS_TRITON:
    from .codebook_tile import rows_dot_entries

    @triton.jit
    def _fused_linear_kernel(X, W, B, R, G, BETA, Y, M, N, K, stride_xm, stride_wn, stride_rm,
                             stride_ym, eps, GELU: tl.constexpr, HAS_RES: tl.constexpr,
                             LAYERNORM: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        # y = x·Wᵀ: the rows of W are the "entries" of the codebook kernels' tile
        cols, col_ok, acc = rows_dot_entries(X, stride_xm, 1, rows, row_ok, W, stride_wn, 1,
                                             tl.program_id(1) * BLOCK_N, N, K, BLOCK_M, BLOCK_N,
                                             BLOCK_K, PRECISION, WIDEN)
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        ok = row_ok[:, None] & col_ok[None, :]
        if HAS_RES:
            acc += tl.load(R + rows[:, None] * stride_rm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if LAYERNORM:  # the program holds whole rows (BLOCK_N >= N): masked columns count 0
            mean = tl.sum(tl.where(col_ok[None, :], acc, 0.0), axis=1) / N
            centred = tl.where(col_ok[None, :], acc - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
            gamma = tl.load(G + cols, mask=col_ok, other=0.0).to(tl.float32)
            beta = tl.load(BETA + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc = centred * rstd[:, None] * gamma[None, :] + beta[None, :]
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=ok)


def block_sizes(m: int, n: int, dtype: torch.dtype, layernorm: bool) -> dict:
    """The launch's tiles and warps. A LayerNorm needs whole rows in one program, so its row
    block stays at 16 (32 rows of a 768-wide fp32 accumulator spill on sm_80 and sm_90: the
    compile check). Few rows (a batch-1 step has 64) take small row blocks so that more programs
    share the GPU. fp32 tiles take half the K depth of 16-bit ones (same bytes in shared memory)."""
    block_k = 16 if dtype == torch.float32 else 32
    if layernorm:
        block_n = max(16, triton.next_power_of_2(n))
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
                    num_warps=8 if block_n >= 512 else 4, num_stages=2)
    block_m = 32 if m <= 256 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=block_k, num_warps=4, num_stages=3)


def _launch(x, weight, bias, residual, ln_weight, ln_bias, activation, eps, out):
    """(grid, positional args, keyword args) of the kernel launch for these tensors."""
    m, k = x.shape
    n = weight.shape[0]
    layernorm = ln_weight is not None
    cfg = block_sizes(m, n, x.dtype, layernorm)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), 1 if layernorm else triton.cdiv(n, cfg["BLOCK_N"]))
    r = residual if residual is not None else out  # never read without HAS_RES
    g = ln_weight if layernorm else bias
    beta = ln_bias if layernorm else bias
    args = (x, weight, bias, r, g, beta, out, m, n, k, x.stride(0), weight.stride(0), r.stride(0),
            out.stride(0), eps)
    kw = dict(GELU=activation == "gelu", HAS_RES=residual is not None, LAYERNORM=layernorm,
              PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32",
              WIDEN=interpreter_widen(x), **cfg)
    return grid, args, kw


def fused_linear_triton(x, weight, bias, residual, ln_weight, ln_bias, activation, eps, out=None):
    if out is None:
        out = x.new_empty(x.shape[0], weight.shape[0])
    grid, args, kw = _launch(x, weight, bias, residual, ln_weight, ln_bias, activation, eps, out)
    _fused_linear_kernel[grid](*args, **kw)
    return out


def compile_variants(m: int, k: int, n: int, dtype: torch.dtype):
    """[(label, kernel, args, kwargs)] of every epilogue's launch at x [m, k], weight [n, k]
    (any device: only shapes, strides and dtypes matter), for the sm_80/sm_90 compile check."""
    t = lambda *shape: torch.empty(*shape, dtype=dtype)  # noqa: E731
    x, w, b, r, out, g = t(m, k), t(n, k), t(n), t(m, n), t(m, n), t(n)
    variants = {"gelu": (None, None, None, "gelu"), "add_layernorm": (r, g, g, "none"),
                "gelu_layernorm": (None, g, g, "gelu")}
    out_list = []
    for label, (res, ln_w, ln_b, act) in variants.items():
        if ln_w is not None and n > MAX_LAYERNORM_WIDTH:
            continue
        _, args, kw = _launch(x, w, b, res, ln_w, ln_b, act, 1e-12, out)
        kw["WIDEN"] = False  # what CUDA compiles
        out_list.append((label, _fused_linear_kernel, args, kw))
    return out_list


def fused_linear_torch(x, weight, bias, residual, ln_weight, ln_bias, activation, eps, out=None):
    # HF's own sequence of ops (F.linear ran ~2.5% faster than addmm on the transposed weight
    # on a 2-core Xeon): the same bits. A frozen model's weight multiplies from its packed copy
    # (ops.frozen_weights), same bits. GELU and the residual add go in place on the GEMM's fresh
    # output: no second [M, N] buffer to allocate and fault in (the answer forward at batch 8,
    # frozen: 317 ms out of place, 295 ms in place; unchanged at batch 1).
    y = frozen_weights.linear(x, weight, bias)
    if activation == "gelu":
        y = torch.ops.aten.gelu_(y)
    if residual is not None:
        y = y.add_(residual)
    if ln_weight is not None:
        y = F.layer_norm(y, (y.shape[-1],), ln_weight, ln_bias, eps)
    return y if out is None else out.copy_(y)


register_op("fused_linear", "triton", impl=fused_linear_triton,
            capability=triton_capability(dtypes=FLOAT_DTYPES), preference_rank=0,
            tolerances=TOLERANCES)
register_op("fused_linear", "torch", impl=fused_linear_torch,
            capability=Capability(devices=("cpu",), on_request=("cuda",), measured_on=("cuda",),
                                  dtypes=FLOAT_DTYPES),
            preference_rank=1, tolerances=TOLERANCES)
measured.install("fused_linear")  # on CUDA, per shape: the fused kernel or cuBLAS + epilogue



def _fused_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     residual: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
                     ln_bias: Optional[torch.Tensor], activation: str, eps: float,
                     backend: str) -> torch.Tensor:
    """A new [M, N] output of validated inputs; backend "" = the registry's choice."""
    def trial(impl):
        return impl.impl(x, weight, bias, residual, ln_weight, ln_bias, activation, eps)

    return trial(_select(backend, trial, x, weight, residual, ln_weight, activation))


def _select(backend, trial, x, weight, residual, ln_weight, activation):
    """The backend for one linear: forced, or measured per shape on a GPU (``ops.measured``)."""
    return measured.select("fused_linear", x.device, x.dtype, backend or None, trial,
                           x, weight, residual, ln_weight is not None, activation)


def _fused_linear_fake(x, weight, bias, residual, ln_weight, ln_bias, activation, eps, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


inference_op("fused_linear(Tensor x, Tensor weight, Tensor bias, Tensor? residual, "
             "Tensor? ln_weight, Tensor? ln_bias, str activation, float eps, str backend) -> Tensor",
             _fused_linear_op, _fused_linear_fake)


def _feed_forward_op(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
                     b_out: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                     eps: float, backend: str) -> torch.Tensor:
    """LayerNorm(x + (GELU(x·W_inᵀ + b_in))·W_outᵀ + b_out): two fused linears, one op."""
    def up(impl):
        return impl.impl(x, w_in, b_in, None, None, None, "gelu", eps)

    h = up(_select(backend, up, x, w_in, None, None, "gelu"))  # each linear measured on its own

    def down(impl):
        return impl.impl(h, w_out, b_out, x, ln_weight, ln_bias, "none", eps)

    return down(_select(backend, down, h, w_out, x, ln_weight, "none"))


def _feed_forward_fake(x, w_in, b_in, w_out, b_out, ln_weight, ln_bias, eps, backend):
    return torch.empty_like(x)


inference_op("feed_forward(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, Tensor b_out, "
             "Tensor ln_weight, Tensor ln_bias, float eps, str backend) -> Tensor",
             _feed_forward_op, _feed_forward_fake)


def _check(x, weight, bias, residual, ln_weight, ln_bias, activation, eps):
    check_tensor("x", x, dtypes=FLOAT_DTYPES, dim=2, layout="[M, K]")
    if x.device.type not in _common.DEVICE_TYPES:
        raise ValueError(f"fused_linear supports CUDA and CPU tensors, got x on {x.device}")
    m, k = x.shape
    if m < 1 or k < 1:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"x's last dimension must be contiguous, got strides {x.stride()}")
    dt, dev = x.dtype, x.device
    check_tensor("weight", weight, dtypes=(dt,), shape=(None, k), device=dev, device_of="x")
    if weight.stride(1) != 1:
        raise ValueError(f"weight's last dimension must be contiguous, got strides {weight.stride()}")
    n = weight.shape[0]
    check_tensor("bias", bias, dtypes=(dt,), shape=(n,), device=dev, device_of="x", contiguous=True)
    if residual is not None:
        check_tensor("residual", residual, dtypes=(dt,), shape=(m, n), device=dev, device_of="x")
        if residual.stride(1) != 1:
            raise ValueError(f"residual's last dimension must be contiguous, got strides {residual.stride()}")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must be given together (LayerNorm) or not at all")
    if ln_weight is not None:
        for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
            check_tensor(name, t, dtypes=(dt,), shape=(n,), device=dev, device_of="x", contiguous=True)
        if n > MAX_LAYERNORM_WIDTH:
            raise ValueError(f"a fused LayerNorm spans at most {MAX_LAYERNORM_WIDTH} columns, "
                             f"weight has {n} rows")
    check_choice("activation", activation, ACTIVATIONS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")


def fused_linear(x, weight, bias, *, residual=None, ln_weight=None, ln_bias=None,
                 activation: str = "none", eps: float = 1e-12, backend: str | None = None):
    """``LayerNorm(act(x·Wᵀ + b) + residual)`` with each part optional (see the module
    docstring); x [M, K] or [..., K] (flattened to rows, the result shaped back), returns
    [..., N] in x's dtype. ``backend``: "triton" or "torch" to force one (an error naming why
    when it cannot run here); None: the registry's choice (``xlx-fast info``)."""
    lead = x.shape[:-1] if isinstance(x, torch.Tensor) and x.dim() > 2 else None
    if lead is not None:
        x = x.reshape(-1, x.shape[-1])
        if residual is not None:
            residual = residual.reshape(-1, residual.shape[-1])
    _check(x, weight, bias, residual, ln_weight, ln_bias, activation, eps)
    y = torch.ops.xlx_fast.fused_linear(x, weight, bias, residual, ln_weight, ln_bias, activation,
                                        float(eps), backend or "")
    return y if lead is None else y.view(*lead, y.shape[-1])


def linear_gelu(x, weight, bias, **kw):
    """GELU(x·Wᵀ + b): ``LxmertIntermediate``."""
    return fused_linear(x, weight, bias, activation="gelu", **kw)


def linear_add_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps, **kw):
    """LayerNorm(x·Wᵀ + b + residual): ``LxmertAttentionOutput`` and ``LxmertOutput``."""
    return fused_linear(x, weight, bias, residual=residual, ln_weight=ln_weight, ln_bias=ln_bias,
                        eps=eps, **kw)


def linear_gelu_layernorm(x, weight, bias, ln_weight, ln_bias, eps, **kw):
    """LayerNorm(GELU(x·Wᵀ + b)): the head's ``LxmertPredictionHeadTransform``."""
    return fused_linear(x, weight, bias, activation="gelu", ln_weight=ln_weight, ln_bias=ln_bias,
                        eps=eps, **kw)


def feed_forward(x, w_in, b_in, w_out, b_out, ln_weight, ln_bias, eps, *, backend=None):
    """LayerNorm(x + W_out·GELU(W_in·x + b_in) + b_out): ``LxmertIntermediate`` followed by
    ``LxmertOutput``, the FFN of a transformer layer, as ONE op (``xlx_fast::feed_forward``: the
    two fused linears of :func:`linear_gelu` and :func:`linear_add_layernorm`, two kernels on a
    GPU, the [M, N_in] activation between them never leaving the op). x [..., K]; w_in [N_in,
    K]; w_out [K, N_in]; returns [..., K] in x's dtype."""
    lead = x.shape[:-1] if isinstance(x, torch.Tensor) and x.dim() > 2 else None
    if lead is not None:
        x = x.reshape(-1, x.shape[-1])
    _check(x, w_in, b_in, None, None, None, "gelu", eps)
    width, n_in, same = x.shape[1], w_in.shape[0], dict(dtypes=(x.dtype,), device=x.device, device_of="x")
    check_tensor("w_out", w_out, shape=(width, n_in), **same)
    if w_out.stride(1) != 1:
        raise ValueError(f"w_out's last dimension must be contiguous, got strides {w_out.stride()}")
    for name, t in (("b_out", b_out), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_tensor(name, t, shape=(width,), contiguous=True, **same)
    if width > MAX_LAYERNORM_WIDTH:
        raise ValueError(f"a fused LayerNorm spans at most {MAX_LAYERNORM_WIDTH} columns, x has {width}")
    y = torch.ops.xlx_fast.feed_forward(x, w_in, b_in, w_out, b_out, ln_weight, ln_bias,
                                        float(eps), backend or "")
    return y if lead is None else y.view(*lead, width)
