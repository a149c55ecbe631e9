"""The X-UNITER sampler in eager PyTorch: :func:`xlx_fast.reference.sample`'s strategies, step
for step, on the single-stream model (:class:`xlx_fast.models.XUniterForImageGeneration`).

One step, given the current codes ``code`` [B, n, F] and ``vis_mask`` [B, n] (1 = masked):

1. ``code = where(vis_mask, mask_feat, code)``
2. ``out = model(input_ids, attention_mask, code)``: BERT over [text embeddings; UNITER image
   embeddings of ``code``], key mask [caption mask; ones], the outputs at the image positions
3. ``prob = softmax(obj_predict_head(out))``; ``pred_prob, pred_id = prob.max(-1)``
4. ``code = where(update_mask, C[pred_id], code)``

The strategies' rules, schedules and tie-breaking are those of :mod:`.sampler`. Imports nothing
fast: only torch, the model and the neutral rules.
"""
from __future__ import annotations

import numbers

import torch

from ..models.xuniter import XUniterForImageGeneration
from ..sampler_io import SampleResult, check_inputs
from ..strategies import check_steps, check_strategy, mask_counts, random_order, tlbr_order

__all__ = ["sample"]


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           steps: int | None = None, strategy: str = "mask_predict", seed=None,
           progress: bool = False) -> SampleResult:
    """Run the samplers eagerly on an X-UNITER model; arguments and result as
    :func:`xlx_fast.reference.sample`."""
    if not isinstance(model, XUniterForImageGeneration):
        raise TypeError(f"model must be an XUniterForImageGeneration, got {type(model).__name__}")
    check_strategy(strategy)
    attention_mask = check_inputs(model, input_ids, attention_mask)
    n_cells = model.n_cells
    steps = check_steps(strategy, steps, n_cells)
    if model.training:
        raise ValueError("sample() runs inference only: call model.eval() first")
    b = input_ids.shape[0]
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * b
    if len(seeds) != b:
        raise ValueError(f"seed must be an int or one int per row ({b}), got {len(seeds)} values")
    seeds = [0 if x is None else x for x in seeds]
    for x in seeds:
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {type(x).__name__} {x!r}")
    seeds = [int(x) for x in seeds]

    centroids = model.centroids
    dtype, device = centroids.dtype, centroids.device
    mask_feat = model.mask_feat.to(dtype).view(1, 1, -1)
    rows = torch.arange(b, device=device)

    order = None
    if strategy == "tlbr":
        order = torch.tensor(tlbr_order(steps, n_cells), device=device)[:, None].expand(-1, b)
    elif strategy == "random":
        order = torch.tensor([random_order(steps, x, n_cells) for x in seeds], device=device).T
    counts = mask_counts(steps, n_cells) if strategy == "mask_predict" else None

    code = torch.zeros(b, n_cells, model.feat_dim, dtype=dtype, device=device)
    ids = torch.full((b, n_cells), -1, dtype=torch.int64, device=device)
    vis_mask = torch.ones(b, n_cells, dtype=torch.bool, device=device)
    visited = torch.zeros(b, n_cells, dtype=torch.bool, device=device)
    masks = []
    pred_prob = None

    step_iter = range(steps)
    if progress:
        from tqdm.auto import tqdm

        step_iter = tqdm(step_iter, desc=f"reference x-uniter {strategy}", unit="step")
    for i in step_iter:
        if strategy == "mask_predict" and i > 0:
            lowest = torch.sort(pred_prob, dim=1, stable=True).indices[:, :counts[i]]
            vis_mask = torch.zeros_like(vis_mask).scatter_(1, lowest, True)
        elif strategy == "random":
            vis_mask[rows, order[i]] = True
        masks.append(vis_mask.clone())

        code = torch.where(vis_mask.unsqueeze(-1), mask_feat, code)
        image_output = model(input_ids, attention_mask, code)
        prob = torch.softmax(model.obj_predict_head(image_output), dim=2)
        pred_prob, pred_id = prob.max(dim=2)

        if strategy == "mask_predict":
            update = vis_mask
        elif strategy == "confidence":
            best = pred_prob.masked_fill(visited, -10000).argmax(dim=1)
            update = torch.zeros_like(vis_mask)
            update[rows, best] = True
            vis_mask = vis_mask & ~update
            visited |= update
        else:  # tlbr, random
            update = torch.zeros_like(vis_mask)
            update[rows, order[i]] = True
            vis_mask = vis_mask & ~update

        code = torch.where(update.unsqueeze(-1), model.vis_emb(pred_id), code)
        ids = torch.where(update, pred_id, ids)

    return SampleResult(ids=ids, codes=code, probs=pred_prob.float(), masks=torch.stack(masks))
