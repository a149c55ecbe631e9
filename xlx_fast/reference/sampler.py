"""The authors' samplers, step for step, in eager PyTorch (SPEC §1).

The model paints an N×N grid of n = N² cells (``model.grid``, ``model.n_cells``: 64 on the
paper's 8×8 grid). One step, given the current codes ``code`` [B, n, F] and ``vis_mask`` [B, n]
(1 = masked):

1. ``code = where(vis_mask, mask_feat, code)``
2. ``visual_output = bert(input_ids, visual_feats=code, visual_pos, attention_mask).vision_output``
3. ``prob = softmax(obj_predict_head(visual_output))``; ``pred_prob, pred_id = prob.max(-1)``
4. ``code = where(update_mask, C[pred_id], code)``

Strategies (which cells are masked before the forward and updated after it; defaults and step
limits: :mod:`xlx_fast.strategies`):

- ``mask_predict`` (Mask-Predict-K, "NAR"): step 0 masks every cell (codes start at zero);
  step i > 0 masks the ``int((K-i)/K·n)`` cells with the lowest ``pred_prob`` of the previous
  step, over all n cells. Every masked cell takes its prediction. K may exceed n.
- ``confidence`` (AR): every cell starts masked; each step decides the not-yet-visited cell
  with the highest ``pred_prob`` (unmasks it and writes its prediction). K <= n.
- ``tlbr`` (AR): step i decides cell i. K <= n.
- ``random`` (AR): a seeded permutation decides the order; the decided cell is re-masked
  before its forward (this matters when K > n revisits cells).

Cell (row i, col j) is index i·N + j, with the box ``(j/N, i/N, (j+1)/N, (i+1)/N)``.

Ties: the lowest index wins (stable ascending sort for the lowest probabilities, first maximum
for the highest), which is what the fast sampler guarantees too; the authors' ``topk`` leaves
ties unspecified.
"""
from __future__ import annotations

import numbers

import torch
from transformers.models.lxmert.modeling_lxmert import LxmertAttention

from ..strategies import NAMES as STRATEGIES
from ..strategies import (check_steps, check_strategy, default_steps, mask_counts, random_order,
                          tlbr_order)
from ..models.painting import paint  # noqa: F401 (re-exported: the authors' painting step)
from ..sampler_io import SampleResult, check_inputs, default_pad_id  # noqa: F401 (re-exported)
from .grid import box_positions


def check_eager(model) -> None:
    """The reference must run HF's own modules: refuse a model whose attentions were swapped
    for fused ones (by ``xlx_fast.optimize`` or ``xlx_fast.generate``). Checked by the swapped
    class's module name, so the reference still imports nothing fast."""
    swapped = [name for name, m in model.named_modules()
               if isinstance(m, LxmertAttention) and type(m).__module__.startswith("xlx_fast.")]
    if swapped:
        raise ValueError(
            f"the reference runs HF's eager modules, but {len(swapped)} attention module(s) of this "
            f"model were optimized (e.g. {swapped[0]}): sample from an unoptimized copy "
            "(copy.deepcopy before xlx_fast.optimize/generate) or call "
            "xlx_fast.patching.unoptimize(model) first")


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           steps: int | None = None, strategy: str = "mask_predict", seed=None,
           progress: bool = False) -> SampleResult:
    """Run the authors' sampler eagerly (see module docstring). ``seed`` fixes the random order
    (``None`` means 0): one int for every row, or a list of one int per row (each row then
    follows its own seeded order); the other strategies are deterministic. Runs in the model's
    dtype, over the model's grid (``model.grid``: the AR strategies default to, and confidence
    and tlbr allow at most, ``model.n_cells`` steps). ``attention_mask`` defaults to
    ``input_ids != default_pad_id(model)``; the model must be in eval mode (dropout off), as for
    ``xlx_fast.generate``."""
    check_strategy(strategy)
    check_eager(model)
    attention_mask = check_inputs(model, input_ids, attention_mask)
    grid, n_cells = model.grid, model.n_cells
    steps = check_steps(strategy, steps, n_cells)
    if model.training:  # dropout would make every call different, and unlike generate()
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
    visual_pos = box_positions(grid, dtype, device).expand(b, -1, -1)
    mask_feat = model.mask_feat.to(dtype).view(1, 1, -1)
    rows = torch.arange(b, device=device)

    # order[i] = the cell each row decides at step i: a [B] tensor (rows differ for ``random``)
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

        step_iter = tqdm(step_iter, desc=f"reference {strategy}", unit="step")
    for i in step_iter:
        if strategy == "mask_predict" and i > 0:
            lowest = torch.sort(pred_prob, dim=1, stable=True).indices[:, :counts[i]]
            vis_mask = torch.zeros_like(vis_mask).scatter_(1, lowest, True)
        elif strategy == "random":
            vis_mask[rows, order[i]] = True
        masks.append(vis_mask.clone())

        code = torch.where(vis_mask.unsqueeze(-1), mask_feat, code)
        visual_output = model.bert(input_ids=input_ids, visual_feats=code, visual_pos=visual_pos,
                                   attention_mask=attention_mask, return_dict=True).vision_output
        prob = torch.softmax(model.obj_predict_head(visual_output), dim=2)
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
