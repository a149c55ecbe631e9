"""Codebook head: (max softmax probability, argmax) over 10,000 clusters for B×64 grid cells, and
in the full sweep over 65,536 (a larger vocabulary, as SPEC's next steps name).

Reference (the timed baseline): ``F.linear(h, W, b).softmax(-1).max(-1)`` — step 3 of SPEC §1 on
the folded head weight ``W`` [10000, 768], materialising the [B·64, 10000] logits and
probabilities. Peer: the same through ``logsumexp`` (no probability matrix, still the logits).
Fast: ``xlx_fast.ops.codebook_head.codebook_head`` (never materialises the logits), called as the
sampling loop calls it, without its NaN check (a host sync the reference does not make either).

Agreement is checked against the exact answer (float64 logits), since a bf16 reference rounds its
logits to bf16 and is itself a few percent off in probability: the fast path's probabilities must
be within the SPEC §4 bound of the exact ones, and its ids must equal the exact argmax on every
row whose best-vs-second logit gap exceeds the rounding bound of the dtype. The share of ids equal
to the same-dtype reference is reported next to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness import (FAST, PEER, Agreement, Case, Prepared, Spec, TOLERANCE, fast_module,
                       id_share, not_implemented, rel_error)

CLUSTERS, HIDDEN, CELLS = 10_000, 768, 64
BIG_CLUSTERS = 65_536
BATCHES = {  # (batch, K)
    ("cpu", True): ((1, CLUSTERS), (8, CLUSTERS)),
    ("cpu", False): ((1, CLUSTERS), (8, CLUSTERS), (64, CLUSTERS), (256, CLUSTERS),
                     (1, BIG_CLUSTERS), (8, BIG_CLUSTERS)),
    ("cuda", True): ((1, CLUSTERS), (64, CLUSTERS)),
    ("cuda", False): ((1, CLUSTERS), (8, CLUSTERS), (64, CLUSTERS), (256, CLUSTERS),
                      (1, BIG_CLUSTERS), (64, BIG_CLUSTERS)),
}
LOGIT_STD = 3.0  # spread of the logits: a peaked but not one-hot softmax, as a trained head gives
# Rounding of the reference's own logits (an output in the input dtype), per unit of |logit|.
_UNIT = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def linear_softmax_max(h, w, b):
    return F.linear(h, w, b).softmax(-1).max(-1)


def linear_logsumexp(h, w, b):
    z = F.linear(h, w, b)
    zmax, ids = z.max(-1)
    return torch.exp(zmax - torch.logsumexp(z, -1)), ids


def make_inputs(m, k, hidden, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(m, hidden, generator=gen)
    w = torch.randn(k, hidden, generator=gen) * (LOGIT_STD / hidden ** 0.5)
    b = 0.02 * torch.randn(k, generator=gen)
    return h.to(device, dtype), w.to(device, dtype), b.to(device, dtype)


def exact(h, w, b):
    """(prob, ids, decided) on the CPU: the float64 answer, and the rows whose top-2 logit gap
    exceeds the rounding bound (computed in float64 on the inputs' device)."""
    hd, wd = h.double(), w.double()
    z = F.linear(hd, wd, b.double())
    top = z.topk(2, dim=-1)
    prob = torch.softmax(z, -1).max(-1).values
    gap = top.values[:, 0] - top.values[:, 1]
    # the reference's logit rounding plus a worst-case fp32 accumulation error over H products
    bound = 2 * (_UNIT[h.dtype] * z.abs().max(-1).values
                 + h.shape[-1] * 2.0 ** -24 * hd.norm(dim=-1) * wd.norm(dim=-1).max())
    return prob.cpu(), top.indices[:, 0].cpu(), (gap > bound).cpu()


def make_case(spec: Spec, dtype: torch.dtype, batch: int, k: int = CLUSTERS) -> Case:
    device = spec.device
    hidden = 64 if spec.size == "tiny" else HIDDEN
    m = batch * CELLS

    def build() -> Prepared:
        head = fast_module("xlx_fast.ops.codebook_head")
        h, w, b = make_inputs(m, k, hidden, dtype, device)
        truth_prob, truth_ids, decided = exact(h, w, b)
        fns = {"xlx_fast": (not_implemented("xlx_fast/ops/codebook_head.py") if head is None
                            else lambda: head.codebook_head(h, w, b, check_nan=False)),
               "torch logsumexp": lambda: linear_logsumexp(h, w, b)}

        def compare(ref, out, _name) -> Agreement:
            prob, ids = out
            err = rel_error(prob.double(), truth_prob)
            wrong = (ids.cpu() != truth_ids) & decided
            ok = err <= TOLERANCE[dtype] and not bool(wrong.any())
            detail = f"{int(wrong.sum())} ids differ from the exact argmax on decided rows" if wrong.any() else ""
            return Agreement("rel err", err, TOLERANCE[dtype], ok, detail,
                             extra={"ref-ids agree": id_share(ids, ref[1])})

        notes = {}
        if device.type == "cpu" and dtype != torch.float32 and head is not None:
            notes["xlx_fast"] = lambda: ("logits in fp32 (exact products of the half inputs): every logit "
                                         "enters the softmax's sum, so a half GEMM's rounded logits "
                                         "would miss the bound, as the torch row's do")
        return Prepared(reference=lambda: linear_softmax_max(h, w, b), backends=fns, compare=compare,
                        same_gemm=lambda: F.linear(h, w, b), notes=notes)

    return Case(op="codebook_head", shape=f"M={batch}x{CELLS} K={k} H={hidden}", dtype=dtype,
                device=device, backends={"xlx_fast": FAST, "torch logsumexp": PEER}, build=build,
                flops=2.0 * m * k * hidden, bound="compute")


def cases(spec: Spec):
    batches = ((1, 97), (2, 97)) if spec.size == "tiny" else BATCHES[(spec.device.type, spec.quick)]
    for dtype in spec.dtypes:
        for batch, k in batches:
            yield make_case(spec, dtype, batch, k)
