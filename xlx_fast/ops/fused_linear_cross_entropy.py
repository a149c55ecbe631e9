"""Fused linear + cross-entropy: ``F.cross_entropy(hidden @ weight.T + bias, target)`` without the
``[N, V]`` logits.

Math. For rows ``i`` with ``t_i != ignore_index`` (``n`` of them)::

    z_i   = W h_i + b                          (V logits)
    loss  = (1/n) · Σ_i (logsumexp(z_i) - z_i[t_i])
    g_i   = (softmax(z_i) - onehot(t_i)) / n   (= ∂loss/∂z_i; 0 for ignored rows)
    ∂h_i  = g_i W,   ∂W = Σ_i g_iᵀ h_i,   ∂b = Σ_i g_i

Everything is computed in the forward, chunk of rows by chunk of rows: a chunk's logits are one
GEMM, then (per row, over the vocabulary) an online max/sum gives the log-sum-exp and a second
sweep overwrites the logits with ``g`` in place, then ``g`` feeds the three gradient GEMMs. The
backward only scales the stored gradients by the incoming scalar (Liger-Kernel's scheme). Peak
extra memory is one chunk of fp32 logits, ``chunk_rows × V × 4`` bytes (default chunk: about
``N·H`` elements, i.e. the size of ``hidden``, but at least 256 rows: rows × V <= max(256·V,
N·H + V) floats, 64 MB at V = 65,536 and few rows; the CPU sweep's ``logsumexp`` takes one more
chunk-sized temporary, half-precision inputs one more in their dtype), plus the gradients
themselves; nothing grows with N·V. The eager formula holds ``N × V`` logits, their softmax and
their gradient. The GPU sweep walks a row in blocks of at most 4096 classes (registers bounded
for any V; row offsets int64, class numbers int32: V < 2^31). The weight gradient is accumulated in
place (fp32 inputs; half-precision inputs add one half-precision ``V×H`` product per chunk) and
handed to autograd without a copy when the upstream gradient is 1. Memory traffic per chunk: the weight
is read three times (forward GEMM, ``∂h`` and ``∂W`` GEMMs) and the chunk logits twice.

Semantics: ``F.cross_entropy(..., ignore_index=-100, reduction="mean")``: the mean over
non-ignored rows. One documented difference: when *every* row is ignored torch returns NaN
(0/0); this op returns a loss of 0 and zero gradients, so a batch without a single target
contributes nothing instead of poisoning the parameters. Targets outside ``[0, V)`` other than
``ignore_index`` raise ``ValueError`` (one host synchronisation per call).

Frozen weight (the CCC head's weight is the frozen centroid table): no ``∂W`` is computed when
``weight.requires_grad`` is False, likewise for ``bias``/``hidden``.

Precision: the chunk GEMMs run in the inputs' dtype (bf16/fp16 on tensor cores with fp32
accumulation), the logits are upcast to fp32 before the log-sum-exp, the gradient is rounded to
the input dtype for the ``∂h``/``∂W`` GEMMs, ``∂W`` and ``∂b`` accumulate in fp32 across chunks.
Under ``torch.autocast`` the inputs are first cast to the autocast dtype (as ``F.linear`` would).

Backends (of the per-row softmax-gradient sweep, registered in :mod:`xlx_fast.ops.registry`):
CUDA tensors run it as a Triton kernel (``_ce_rows_kernel``), CPU tensors as torch ops;
``backend="triton"`` forces the kernel on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
The GEMMs are torch's either way. The op is the custom op
``torch.ops.xlx_fast.fused_linear_cross_entropy`` with a fake implementation and an autograd
formula (``torch.library.register_autograd``): its forward returns the loss and the gradients
asked for (an empty tensor for one that is not), its backward scales them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import FLOAT_DTYPES, HAS_TRITON, INDEX_DTYPES, check_dtype, check_tensor, tl, triton
from .registry import Capability, register_op, select_impl, triton_capability

__all__ = ["fused_linear_cross_entropy", "default_chunk_rows"]


if HAS_TRITON:

    @triton.jit
    def _ce_rows_kernel(Z, stride_z, T, Loss, n_cols, ignore_index, scale, BLOCK: tl.constexpr):
        """Row ``r`` of the fp32 logits ``Z``: loss_r = lse - z[t], z := (softmax(z) - onehot(t))·scale
        in place; an ignored row gets loss 0 and gradient 0."""
        row = tl.program_id(0).to(tl.int64)
        z_row = Z + row * stride_z
        t = tl.load(T + row)
        if t == ignore_index:
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(z_row + cols, tl.zeros([BLOCK], tl.float32), mask=cols < n_cols)
            tl.store(Loss + row, 0.0)
        else:
            m = float("-inf")  # running max
            s = 0.0            # running Σ exp(z - m)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                z = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf"))
                m_new = tl.maximum(m, tl.max(z, 0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
                m = m_new
            lse = m + tl.log(s)
            z_t = tl.load(z_row + t)
            tl.store(Loss + row, lse - z_t)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                inside = cols < n_cols
                z = tl.load(z_row + cols, mask=inside, other=0.0)
                g = tl.exp(z - lse) * scale
                g = tl.where(cols == t, g - scale, g)
                tl.store(z_row + cols, g, mask=inside)


def _block(n_cols: int, cuda: bool) -> tuple[int, int]:
    """(BLOCK, num_warps) of the row sweep. A GPU takes the vocabulary 4096 classes at a time (8
    warps from 2048 on); the CPU interpreter a sixteenth of it, at least 64, so that a small test
    vocabulary still takes several blocks and a 65,536-class row 16 blocks, not 1024. The block
    is a power of two <= 4096 whatever V: only the number of blocks grows with V."""
    if cuda:
        block = min(4096, triton.next_power_of_2(n_cols))
    else:
        block = min(4096, max(64, triton.next_power_of_2(n_cols) // 16))
    return block, 8 if block >= 2048 else 4


def _rows_launch(z, target, loss, ignore_index, scale, cuda):
    block, warps = _block(z.shape[1], cuda)
    return (_ce_rows_kernel, (z.shape[0],), (z, z.stride(0), target, loss, z.shape[1], ignore_index, scale),
            dict(BLOCK=block, num_warps=warps))


def _rows_triton(z: torch.Tensor, target: torch.Tensor, ignore_index: int, scale: float) -> torch.Tensor:
    loss = torch.empty(z.shape[0], device=z.device, dtype=torch.float32)
    kernel, grid, args, kwargs = _rows_launch(z, target, loss, ignore_index, scale, z.is_cuda)
    kernel[grid](*args, **kwargs)
    return loss


def compile_variants(vocab: int) -> list[tuple]:
    """[(label, kernel, args, kwargs)] a CUDA call over chunk logits [rows, vocab] compiles (any
    device: only shapes, strides and dtypes matter), for the sm_80/sm_90 compile check."""
    z = torch.empty(2, vocab)
    target, loss = torch.zeros(2, dtype=torch.int64), torch.empty(2)
    kernel, _grid, args, kwargs = _rows_launch(z, target, loss, -100, 0.5, cuda=True)
    return [(f"{kernel.fn.__name__} {kwargs}", kernel, args, kwargs)]


def _rows_torch(z: torch.Tensor, target: torch.Tensor, ignore_index: int, scale: float) -> torch.Tensor:
    """The same sweep in torch ops, in place on the fp32 chunk ``z``."""
    keep = target != ignore_index
    t = torch.where(keep, target, 0)
    lse = torch.logsumexp(z, dim=1)
    loss = torch.where(keep, lse - z.gather(1, t[:, None]).squeeze(1), 0.0)
    z.sub_(lse[:, None]).exp_().mul_(scale)
    z.scatter_add_(1, t[:, None], torch.full_like(lse[:, None], -scale))
    z.mul_(keep[:, None])
    return loss


# the loss against F.cross_entropy in float64 (fp32 logits either way: the GEMM dtype decides)
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
register_op("fused_linear_cross_entropy", "triton", impl=_rows_triton,
            capability=triton_capability(dtypes=FLOAT_DTYPES), preference_rank=0, tolerances=TOLERANCES)
register_op("fused_linear_cross_entropy", "torch", impl=_rows_torch,
            capability=Capability(devices=("cpu",), dtypes=FLOAT_DTYPES), preference_rank=1,
            tolerances=TOLERANCES)

MIN_CHUNK_ROWS = 256


def default_chunk_rows(n_rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk: enough that a chunk's logits hold about as many elements as ``hidden`` does
    (``N·H``: the logits cost no more memory than the activations already do), but at least
    ``MIN_CHUNK_ROWS`` (or all ``N``): every chunk reads and rewrites the whole ``V×H`` weight
    gradient, so chunks of a few rows would make the op memory-bound on it."""
    n_chunks = max(1, math.ceil(vocab / max(1, hidden)))
    return max(1, min(n_rows, max(MIN_CHUNK_ROWS, math.ceil(n_rows / n_chunks))))


def _check(hidden, weight, target, bias, ignore_index):
    for name, t in (("hidden", hidden), ("weight", weight)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, dim=2)
    if not isinstance(target, torch.Tensor) or target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must be an int64/int32 tensor, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"weight must be [V, {h}] to match hidden [N, {h}], got {tuple(weight.shape)}")
    if target.shape != (n,):
        raise ValueError(f"target must have shape ({n},) (one per hidden row), got {tuple(target.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (v,):
            raise ValueError(f"bias must be a tensor of shape ({v},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        check_dtype("bias", bias.dtype, FLOAT_DTYPES)
    devices = {t.device for t in (hidden, weight, target) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"hidden, weight, target and bias must be on one device, got {sorted(map(str, devices))}")
    if v == 0 or h == 0:
        raise ValueError(f"empty weight {tuple(weight.shape)}")


def _check_targets(target, ignore_index, v):
    """Targets are values: checked inside the op, when it runs (eager or compiled), with one sync."""
    bad = (target != ignore_index) & ((target < 0) | (target >= v))
    if target.numel() and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target[{i}] = {int(target[i])} is out of range for {v} classes "
                         f"(and is not ignore_index={ignore_index})")


def _loss_and_grads(hidden, weight, bias, target, ignore_index, chunk_rows, rows_fn,
                    need_h: bool, need_w: bool, need_b: bool):
    """The loss and the gradients asked for (None for the others), chunk by chunk."""
    n, h = hidden.shape
    v = weight.shape[0]
    dtype = hidden.dtype
    _check_targets(target, ignore_index, v)
    w = weight if weight.dtype == dtype else weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    target = target.long()
    n_valid = int((target != ignore_index).sum())
    scale = 1.0 / n_valid if n_valid else 0.0
    grad_h = torch.empty(n, h, device=hidden.device, dtype=dtype) if need_h else None
    grad_w = torch.zeros(v, h, device=hidden.device, dtype=torch.float32) if need_w else None
    grad_b = torch.zeros(v, device=hidden.device, dtype=torch.float32) if need_b else None
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    rows = chunk_rows or default_chunk_rows(n, v, h)
    for s in range(0, n, rows):
        hc, tc = hidden[s:s + rows], target[s:s + rows]
        z = hc @ w.T if b is None else torch.addmm(b, hc, w.T)
        z = z.float() if z.dtype != torch.float32 else z
        loss_rows = rows_fn(z, tc.contiguous(), ignore_index, scale)
        total += loss_rows.sum()
        g = z if dtype == torch.float32 else z.to(dtype)  # now ∂loss/∂logits of the chunk
        if need_h:
            torch.mm(g, w, out=grad_h[s:s + rows])
        if need_w:
            if dtype == torch.float32:
                grad_w.addmm_(g.T, hc)  # in place: no V×H temporary
            else:  # a half-precision V×H product per chunk, accumulated in fp32
                grad_w += g.T @ hc
        if need_b:
            grad_b += z.sum(0)
        del z, g
    return (total * scale, grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


@torch.library.custom_op("xlx_fast::fused_linear_cross_entropy", mutates_args=())
def _fused_linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor,
                                   bias: Optional[torch.Tensor], target: torch.Tensor,
                                   ignore_index: int, chunk_rows: int, backend: str, need_h: bool,
                                   need_w: bool, need_b: bool
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ∂hidden, ∂weight, ∂bias) of validated inputs; a gradient not asked for is an empty
    tensor (an op returns tensors, not None); chunk_rows 0 = the default; backend "" = the
    registry's choice."""
    rows_fn = select_impl("fused_linear_cross_entropy", hidden.device, hidden.dtype,
                          force=backend or None).impl
    loss, *grads = _loss_and_grads(hidden, weight, bias, target, ignore_index, chunk_rows or None,
                                   rows_fn, need_h, need_w, need_b)
    return (loss, *(hidden.new_empty(0) if g is None else g for g in grads))


@_fused_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, target, ignore_index, chunk_rows, backend, need_h, need_w, need_b):
    def grad(needed, like, dtype):
        return like.new_empty(like.shape if needed else (0,), dtype=dtype)

    return (hidden.new_empty((), dtype=torch.float32), grad(need_h, hidden, hidden.dtype),
            grad(need_w, weight, weight.dtype),
            grad(need_b, hidden if bias is None else bias, hidden.dtype if bias is None else bias.dtype))


def _setup_context(ctx, inputs, output):
    _, grad_h, grad_w, grad_b = output
    need_h, need_w, need_b = inputs[7:10]
    ctx.needs = (need_h, need_w, need_b)
    ctx.save_for_backward(grad_h, grad_w, grad_b)


def _backward(ctx, grad_out, *_unused):
    # The forward computed every gradient; the backward only scales them by the upstream
    # gradient. The usual one is exactly 1 (the loss is summed into the total): then the stored
    # gradients are returned as they are, without a V×H copy.
    one = bool(torch.equal(grad_out, torch.ones_like(grad_out)))
    grads = [g if needed and one else g * grad_out.to(g.dtype) if needed else None
             for g, needed in zip(ctx.saved_tensors, ctx.needs)]
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd("xlx_fast::fused_linear_cross_entropy", _backward,
                                setup_context=_setup_context)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                               chunk_rows: int | None = None, backend: str | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index)`` (mean
    over non-ignored rows) without materialising the ``[N, V]`` logits; differentiable in
    ``hidden``, ``weight`` and ``bias``. See the module docstring for the math, the all-ignored case
    (0, not NaN), memory and precision.

    Args:
        hidden: ``[N, H]``; weight: ``[V, H]``; target: ``[N]`` int; bias: ``[V]`` or None.
        chunk_rows: rows per chunk (default :func:`default_chunk_rows`).
        backend: None (the registry's choice: CUDA → Triton, CPU → torch; see ``xlx-fast info``),
            ``"torch"`` or ``"triton"`` (CPU tensors only under ``TRITON_INTERPRET=1``); one that
            cannot run here raises naming why.
    Returns a 0-d fp32 tensor.
    """
    _check(hidden, weight, target, bias, ignore_index)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    select_impl("fused_linear_cross_entropy", hidden.device, hidden.dtype, force=backend)  # raises why
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0  # no rows: 0, with (zero) gradients
    need_b = bias is not None and bias.requires_grad
    with torch.autocast(device_type, enabled=False):
        return torch.ops.xlx_fast.fused_linear_cross_entropy(
            hidden, weight, bias, target, ignore_index, chunk_rows or 0, backend or "",
            hidden.requires_grad, weight.requires_grad, need_b)[0]
