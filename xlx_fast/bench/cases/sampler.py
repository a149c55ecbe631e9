"""The Mask-Predict sampler step: pick the cells to re-mask, update ids, build the next visual input.

Reference (the timed baseline): the reference sampler's own torch ops between two forwards —
``where(mask, C[pred_id], code)``, ``where(mask, pred_id, ids)``, a stable sort of ``pred_prob``
and a scatter for the next mask, ``where(next_mask, mask_feat, code)``. Fast:
``xlx_fast.ops.sampler_step.sampler_step`` (one native launch: the C++ twin on the CPU, the CUDA
kernel on GPUs), in place on its state.

The step is a gather: it must read and write B·64·D table elements plus a little per-cell state
(``sampler_step_bytes``), so rows report GB/s against the measured copy ceiling (SPEC §6: ≥ 70%).
The output must equal the reference's exactly (a gather does no arithmetic). The inputs are
step 1 of Mask-Predict-4 from a fresh state; timed repetitions keep stepping the same state,
which moves the same bytes.
"""
from __future__ import annotations

import torch

from ..harness import (FAST, Agreement, Case, NotAvailable, Prepared, Spec, fast_module, id_share,
                       not_implemented, rel_error)

CELLS, CLUSTERS, DIM = 64, 10_000, 2048
STEPS = 4
BATCHES = {True: (1, 64), False: (1, 8, 64, 256)}


def reference_step(pred_prob, pred_id, vis_mask, code, ids, count, centroids, mask_feat):
    """Steps 4 and 1 of SPEC §1 with the Mask-Predict selection in between, as the reference does."""
    code = torch.where(vis_mask.unsqueeze(-1), torch.nn.functional.embedding(pred_id, centroids), code)
    ids = torch.where(vis_mask, pred_id, ids)
    lowest = torch.sort(pred_prob, dim=1, stable=True).indices[:, :count]
    next_mask = torch.zeros_like(vis_mask).scatter_(1, lowest, True)
    return torch.where(next_mask.unsqueeze(-1), mask_feat.view(1, 1, -1), code), ids, next_mask


def native_unavailable(device: torch.device) -> NotAvailable | None:
    """Why the native sampler step cannot run on ``device`` here (None when it can)."""
    from xlx_fast import native

    if device.type == "cpu":
        if not native.has_cpu_kernels():
            return NotAvailable(f"n/a — xlx_fast._C not built ({native.load_error() or 'no CPU kernels'})")
        return None
    if native.has_cuda_kernels() or native.cupy_status()[0]:
        return None
    return NotAvailable("n/a — no CUDA sampler kernel (xlx_fast._C built without CUDA, no CuPy)")


def make_case(spec: Spec, dtype: torch.dtype, batch: int) -> Case:
    device = spec.device
    k, d = (97, 48) if spec.size == "tiny" else (CLUSTERS, DIM)
    module = fast_module("xlx_fast.ops.sampler_step")
    nbytes = module.sampler_step_bytes(batch, d, dtype) if module is not None else None

    def build() -> Prepared:
        gen = torch.Generator().manual_seed(0)
        table = torch.randn(k, d, generator=gen).to(device, dtype)
        mask_row = torch.randn(d, generator=gen).to(device, dtype)
        pred_prob = torch.rand(batch, CELLS, generator=gen).to(device)
        pred_id = torch.randint(0, k, (batch, CELLS), generator=gen).to(device)
        count = int((STEPS - 1) / STEPS * CELLS)  # cells re-masked before step 1 of Mask-Predict-4
        vis_mask = torch.ones(batch, CELLS, dtype=torch.bool, device=device)
        code = mask_row.view(1, 1, -1).expand(batch, CELLS, d).contiguous()
        ids0 = torch.full((batch, CELLS), -1, dtype=torch.int64, device=device)

        def reference():
            return reference_step(pred_prob, pred_id, vis_mask, code, ids0, count, table, mask_row)

        if module is None:
            fast = not_implemented("xlx_fast/ops/sampler_step.py")
        else:
            fast = native_unavailable(device)
            if fast is None:
                state = module.init_state(batch, mask_row)
                counts = torch.full((batch,), count, dtype=torch.int32, device=device)

                def fast():
                    module.sampler_step(pred_prob, pred_id, state, table, mask_row, "mask_predict",
                                        count=counts)
                    # the live state, not copies (a copy would double the bytes timed);
                    # the harness compares it right after the checking call
                    return state.out, state.ids, state.mask

        def compare(ref, out, _name) -> Agreement:
            err = rel_error(out[0], ref[0])
            ids_share = id_share(out[1], ref[1])
            mask_share = id_share(out[2], ref[2])
            ok = err == 0 and ids_share == 1.0 and mask_share == 1.0
            detail = "" if ok else f"ids equal {ids_share:.2%}, next mask equal {mask_share:.2%}"
            return Agreement("rel err", err, 0.0, ok, detail)

        return Prepared(reference=reference, backends={"xlx_fast": fast}, compare=compare)

    return Case(op="sampler_step", shape=f"B={batch} K={k} D={d}", dtype=dtype, device=device,
                backends={"xlx_fast": FAST}, build=build, bytes=float(nbytes) if nbytes else None,
                bound="memory")


def cases(spec: Spec):
    batches = (1, 2) if spec.size == "tiny" else BATCHES[spec.quick]
    for dtype in spec.dtypes:
        for batch in batches:
            yield make_case(spec, dtype, batch)
