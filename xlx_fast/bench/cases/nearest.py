"""Codebook nearest neighbour: N features against the 10,000×2048 codebook (squared L2 argmin),
and in the full sweep against a 65,536×2048 one (a larger vocabulary, as SPEC's next steps name).

Reference (the timed baseline): ``torch.cdist(x, C).argmin(1)``. Peers: torch's chunked
``addmm`` + ``argmin`` (the usual hand-written alternative, 2048-row chunks) and, on the CPU at
fp32, FAISS ``IndexFlatL2`` search with k=1 (index built outside the timing). Fast:
``xlx_fast.ops.nearest.nearest``.

The features are centroids plus small noise, as when a vocabulary assigns features to the
clusters they came from: the nearest centroid then wins by a wide margin, so every backend must
return exactly the reference's ids (SPEC §4), whatever its rounding.

Rows report TFLOP/s on the 2·N·K·D FLOPs of the GEMM inside, against the device's matmul ceiling
and against ``torch.matmul`` timed on the very same GEMM (``x @ Cᵀ``) in the same run (SPEC §6:
≥ 80% of it on GPUs, ≥ 85% on the CPU).
"""
from __future__ import annotations

import torch

from ..harness import (DTYPE_NAMES, FAST, PEER, Case, NotAvailable, Prepared, Spec, fast_module,
                       ids_agree, not_implemented)

CLUSTERS, DIM = 10_000, 2048
BIG_CLUSTERS = 65_536
NOISE = 0.1
SIZES = {  # (N, K, D)
    ("cpu", True): ((1024, CLUSTERS, DIM),),
    # K = 65,536 at 1024 rows: about the FLOPs of the 8192-row K = 10,000 row
    ("cpu", False): ((1024, CLUSTERS, DIM), (8192, CLUSTERS, DIM), (1024, BIG_CLUSTERS, DIM)),
    ("cuda", True): ((65536, CLUSTERS, DIM),),
    # SPEC §6 sets its target at N >= 256k; K = 65,536 at 8192 rows keeps cdist's N×K fp32
    # distance matrix (the reference) at 2 GB
    ("cuda", False): ((65536, CLUSTERS, DIM), (262144, CLUSTERS, DIM), (8192, BIG_CLUSTERS, DIM)),
}
CHUNK = 2048


def mm_argmin(x: torch.Tensor, c: torch.Tensor, c_norms: torch.Tensor) -> torch.Tensor:
    """The hand-written torch baseline: ||c||² − 2·x·cᵀ per chunk of rows, then argmin."""
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for r0 in range(0, x.shape[0], CHUNK):
        s = torch.addmm(c_norms, x[r0:r0 + CHUNK], c.T, beta=1.0, alpha=-2.0)
        out[r0:r0 + CHUNK] = s.argmin(1)
    return out


def make_inputs(n, k, d, dtype, device, seed=0):
    # drawn on the device itself: 262144×2048 normals take seconds on a host CPU
    gen = torch.Generator(device=device).manual_seed(seed)
    c = torch.randn(k, d, generator=gen, device=device)
    planted = torch.randint(0, k, (n,), generator=gen, device=device)
    x = c[planted] + NOISE * torch.randn(n, d, generator=gen, device=device)
    return x.to(dtype).contiguous(), c.to(dtype).contiguous()


def make_case(spec: Spec, dtype: torch.dtype, n: int, k: int = CLUSTERS, d: int = DIM) -> Case:
    device = spec.device
    faiss_ok = device.type == "cpu" and dtype == torch.float32
    backends = {"xlx_fast": FAST, "torch mm+argmin": PEER}
    if device.type == "cpu":
        backends["faiss IndexFlatL2"] = PEER

    def build() -> Prepared:
        nearest = fast_module("xlx_fast.ops.nearest")
        x, c = make_inputs(n, k, d, dtype, device)
        c_norms = c.float().square().sum(1).to(dtype)
        fns = {"xlx_fast": (not_implemented("xlx_fast/ops/nearest.py") if nearest is None
                            else lambda: nearest.nearest(x, c)),
               "torch mm+argmin": lambda: mm_argmin(x, c, c_norms)}
        if "faiss IndexFlatL2" in backends:
            fns["faiss IndexFlatL2"] = _faiss(x, c) if faiss_ok else _unsupported(dtype)
        notes = {}
        if nearest is not None:  # which backend ran: on a CPU, bfloat16 takes the screen
            from xlx_fast.ops import registry

            notes["xlx_fast"] = lambda: f"ran {registry.select_impl('nearest', device, dtype).backend}"
        return Prepared(reference=lambda: torch.cdist(x, c).argmin(1), backends=fns,
                        compare=lambda ref, out, _name: ids_agree(out, ref),
                        same_gemm=lambda: torch.matmul(x, c.T), notes=notes)

    return Case(op="nearest", shape=f"N={n} K={k} D={d}", dtype=dtype, device=device,
                backends=backends, build=build, flops=2.0 * n * k * d, bound="compute")


def _unsupported(dtype):
    return NotAvailable(f"n/a — FAISS takes fp32 only, not {DTYPE_NAMES.get(dtype, dtype)}")


def _faiss(x: torch.Tensor, c: torch.Tensor):
    try:
        import faiss
    except ImportError:
        return NotAvailable("n/a — faiss not installed (pip install faiss-cpu)")
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c.numpy())
    xs = x.numpy()

    def search():
        _, ids = index.search(xs, 1)
        return torch.from_numpy(ids[:, 0])

    return search


def cases(spec: Spec):
    sizes = ((64, 97, 48),) if spec.size == "tiny" else SIZES[(spec.device.type, spec.quick)]
    for dtype in spec.dtypes:
        for n, k, d in sizes:
            yield make_case(spec, dtype, n, k, d)
