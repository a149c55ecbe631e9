"""Attention at LXMERT's shapes: HF's eager formula vs ``xlx_fast.ops.attention`` vs torch SDPA.

Inputs are laid out as the model produces them: ``(B, L, H·d)`` projections, for self-attention
column slices of one fused QKV output (what ``optimize`` feeds the kernel), for cross-attention a
query and column slices of a fused KV output. Keys of length 20 are caption tokens and carry HF's
additive ``[B, 1, 1, 20]`` padding mask (captions of different lengths); keys of length 64 are grid
cells and have no mask, as in X-LXMERT. (Lq, Lk): (20, 20) language self-attention, (64, 64)
visual self-attention, (20, 64) language→vision and (64, 20) vision→language cross-attention;
the full sweep adds the finer grids' 256 and 1,024 cells (``GRID_LENGTHS``). On CUDA the op
measures itself against SDPA per shape (``ops.measured``) and runs the faster: its row is then
at least SDPA's default, and the rows of each SDPA backend show which one it met.

Reference: the eager math of ``transformers``' ``LxmertAttention.forward`` after its projections
(matmul, scale, mask, softmax, matmul, permute + contiguous). Peers: SDPA through each of torch's
backends on CUDA (flash, efficient, cuDNN, math; one that refuses the shape or the mask is shown
as n/a), the default SDPA dispatch on the CPU. Each output is brought back to ``(B, Lq, H·d)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..harness import FAST, PEER, Case, Prepared, Spec, close, fast_module, not_implemented

LENGTHS = ((20, 20), (64, 64), (20, 64), (64, 20))
QUICK_LENGTHS = ((20, 20), (64, 64), (64, 20))
BATCHES = {True: (1, 64), False: (1, 8, 64, 256)}
# Finer grids (16x16, 32x32: 256 and 1,024 cells): the visual self-attention and both
# cross-attentions stop being tiny there. Full sweep only, at the batches of the generate rows.
GRID_LENGTHS = ((256, 256), (1024, 1024), (20, 1024), (1024, 20))
GRID_BATCHES = {"cpu": (1, 8), "cuda": (1, 64)}
TEXT_LENGTH = 20  # keys this long are caption tokens (masked); others are grid cells (no mask)

_SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def eager_attention(q, k, v, mask, num_heads):
    """HF ``LxmertAttention`` after the projections, step for step."""
    b, lq, width = q.shape
    d = width // num_heads
    ql = q.view(b, lq, num_heads, d).transpose(1, 2)
    kl = k.view(b, k.shape[1], num_heads, d).transpose(1, 2)
    vl = v.view(b, v.shape[1], num_heads, d).transpose(1, 2)
    scores = torch.matmul(ql, kl.transpose(-1, -2)) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    probs = F.softmax(scores, dim=-1)
    ctx = torch.matmul(probs, vl).permute(0, 2, 1, 3).contiguous()
    return ctx.view(b, lq, width)


def sdpa_attention(q, k, v, mask, num_heads):
    b, lq, width = q.shape
    d = width // num_heads

    def heads(t):
        return t.view(b, t.shape[1], num_heads, d).transpose(1, 2)

    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    return o.transpose(1, 2).reshape(b, lq, width)


def _sdpa_with(backend: str, *args):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def run():
        with sdpa_kernel(which):
            return sdpa_attention(*args)

    return run


def dims(spec: Spec) -> tuple[int, int]:
    """(heads, head dim) of the model at ``spec.size``."""
    return (2, 32) if spec.size == "tiny" else (12, 64)


def make_inputs(batch, lq, lk, heads, d, dtype, device, seed=0):
    """q, k, v (column slices of fused projections) and the key mask (None for grid keys)."""
    gen = torch.Generator().manual_seed(seed)
    width = heads * d
    if lq == lk:
        qkv = torch.randn(batch, lq, 3 * width, generator=gen).to(device, dtype)
        q, k, v = qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:]
    else:
        q = torch.randn(batch, lq, width, generator=gen).to(device, dtype)
        kv = torch.randn(batch, lk, 2 * width, generator=gen).to(device, dtype)
        k, v = kv[..., :width], kv[..., width:]
    mask = None
    if lk == TEXT_LENGTH:
        # caption lengths 5..20 tokens; HF's extended mask: 0 where attended, finfo.min where padded
        lengths = torch.randint(5, lk + 1, (batch,), generator=gen)
        keep = torch.arange(lk)[None, :] < lengths[:, None]
        mask = ((1.0 - keep.to(dtype)) * torch.finfo(dtype).min).view(batch, 1, 1, lk).to(device)
    return q, k, v, mask


def dispatch_note(q, k, device) -> str:
    """Which backend the op ran at this shape and why: on CUDA the per-shape measurement
    (``ops.measured``: the Triton kernel or SDPA, the faster on this call's inputs), elsewhere
    the device's one backend."""
    from xlx_fast.ops import measured, registry

    for c in measured.choices():
        key = c["key"]
        if (c["op"] == "attention" and c["dtype"] == str(q.dtype).removeprefix("torch.")
                and key[0][0] == tuple(q.shape) and key[1][0] == tuple(k.shape)):
            times = ", ".join(f"{b} {ms:.3f} ms" for b, ms in sorted(c["ms"].items()))
            return f"ran {c['chosen']} (measured per shape: {times})"
    return f"ran {registry.select_impl('attention', device, q.dtype).backend} (this device's backend)"


def make_case(spec: Spec, dtype: torch.dtype, batch: int, lq: int, lk: int) -> Case:
    heads, d = dims(spec)
    device = spec.device
    peers = [f"sdpa-{b}" for b in _SDPA_BACKENDS] if device.type == "cuda" else ["sdpa"]
    backends = {"xlx_fast": FAST, **{p: PEER for p in peers}}

    def build() -> Prepared:
        attention = fast_module("xlx_fast.ops.attention")
        q, k, v, mask = make_inputs(batch, lq, lk, heads, d, dtype, device)
        args = (q, k, v, mask, heads)
        fns = {}
        if attention is None:
            fns["xlx_fast"] = not_implemented("xlx_fast/ops/attention.py")
        else:
            fns["xlx_fast"] = lambda: attention.attention(q, k, v, mask, num_heads=heads)
        for p in peers:
            fns[p] = (lambda: sdpa_attention(*args)) if p == "sdpa" else _sdpa_with(p[len("sdpa-"):], *args)
        notes = {} if attention is None else {"xlx_fast": lambda: dispatch_note(q, k, device)}
        return Prepared(reference=lambda: eager_attention(*args), backends=fns,
                        compare=lambda ref, out, _name: close(out, ref, dtype), notes=notes)

    width = heads * d
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return Case(op="attention", shape=f"B={batch} Lq={lq} Lk={lk} H={heads} d={d}", dtype=dtype,
                device=device, backends=backends, build=build,
                flops=4.0 * batch * heads * lq * lk * d,
                bytes=float((2 * batch * lq * width + 2 * batch * lk * width) * itemsize),
                bound="compute")


def cases(spec: Spec):
    if spec.size == "tiny":
        batches, lengths = (1, 3), ((20, 20), (5, 20))
    else:
        batches, lengths = BATCHES[spec.quick], (QUICK_LENGTHS if spec.quick else LENGTHS)
    for dtype in spec.dtypes:
        for batch in batches:
            for lq, lk in lengths:
                yield make_case(spec, dtype, batch, lq, lk)
    if spec.size == "tiny" or (spec.quick and spec.device.type != "cuda"):
        return
    # a GPU's quick sweep (gpu_check.sh) takes the 1,024-cell self-attention: the row that
    # says whether the kernel or SDPA serves a 32x32 grid
    grid_lengths = GRID_LENGTHS[1:2] if spec.quick else GRID_LENGTHS
    for dtype in spec.dtypes:
        for batch in GRID_BATCHES[spec.device.type]:
            for lq, lk in grid_lengths:
                yield make_case(spec, dtype, batch, lq, lk)
