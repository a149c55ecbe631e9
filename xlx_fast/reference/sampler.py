"""The authors' samplers, step for step, in eager PyTorch (SPEC §1).

One step, given the current codes ``code`` [B, 64, F] and ``vis_mask`` [B, 64] (1 = masked):

1. ``code = where(vis_mask, mask_feat, code)``
2. ``visual_output = bert(input_ids, visual_feats=code, visual_pos, attention_mask).vision_output``
3. ``prob = softmax(obj_predict_head(visual_output))``; ``pred_prob, pred_id = prob.max(-1)``
4. ``code = where(update_mask, C[pred_id], code)``

Strategies (which cells are masked before the forward and updated after it):

- ``mask_predict`` (Mask-Predict-K, "NAR"): step 0 masks every cell (codes start at zero);
  step i > 0 masks the ``int((K-i)/K·64)`` cells with the lowest ``pred_prob`` of the previous
  step, over all 64 cells. Every masked cell takes its prediction. K may exceed 64.
- ``confidence`` (AR): every cell starts masked; each step decides the not-yet-visited cell
  with the highest ``pred_prob`` (unmasks it and writes its prediction). K <= 64.
- ``tlbr`` (AR): step i decides cell i. K <= 64.
- ``random`` (AR): a seeded permutation decides the order; the decided cell is re-masked
  before its forward (this matters when K > 64 revisits cells).

Ties: the lowest index wins (stable ascending sort for the lowest probabilities, first maximum
for the highest), which is what the fast sampler guarantees too; the authors' ``topk`` leaves
ties unspecified.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.lxmert.modeling_lxmert import LxmertAttention

from ..models.xlxmert import GRID, N_CELLS
from .grid import box_positions
from .schedule import mask_counts, random_order, tlbr_order

STRATEGIES = ("mask_predict", "confidence", "tlbr", "random")


@dataclass
class SampleResult:
    """What a sampler returns.

    ids:   [B, 64] int64 cluster id of each cell; -1 for a cell no step decided (AR with K < 64)
    codes: [B, 64, F] the final visual codes (centroid rows, ``mask_feat`` where undecided)
    probs: [B, 64] float32 the last step's ``pred_prob`` (max softmax probability per cell)
    masks: [K, B, 64] bool, the mask each step's forward saw
    """

    ids: torch.Tensor
    codes: torch.Tensor
    probs: torch.Tensor
    masks: torch.Tensor


def default_steps(strategy: str) -> int:
    """4 for Mask-Predict (the authors' sampling script), 64 (one per cell) for the AR orders."""
    check_strategy(strategy)
    return 4 if strategy == "mask_predict" else N_CELLS


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    return strategy


def check_inputs(model, input_ids, attention_mask):
    """Validate caption inputs; returns ``attention_mask`` (default ``input_ids > 0``)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    b, length = input_ids.shape
    if b == 0 or length == 0:
        raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
    vocab = model.config.vocab_size
    if input_ids.min().item() < 0 or input_ids.max().item() >= vocab:
        raise ValueError(f"input_ids out of range: values must lie in [0, {vocab}), got "
                         f"[{input_ids.min().item()}, {input_ids.max().item()}]")
    if length > model.config.max_position_embeddings:
        raise ValueError(f"input_ids length {length} exceeds the model's "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")
    device = model.centroids.device
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    if attention_mask is None:
        return input_ids > 0
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
    return attention_mask


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


def check_steps(strategy: str, steps) -> int:
    steps = default_steps(strategy) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if strategy in ("confidence", "tlbr") and steps > N_CELLS:
        raise ValueError(f"steps must be <= {N_CELLS} for strategy {strategy!r} (one cell per "
                         f"step), got {steps}")
    return steps


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           steps: int | None = None, strategy: str = "mask_predict", seed=None,
           progress: bool = False) -> SampleResult:
    """Run the authors' sampler eagerly (see module docstring). ``seed`` fixes the random order
    (``None`` means 0): one int for every row, or a list of one int per row (each row then
    follows its own seeded order); the other strategies are deterministic. Runs in the model's
    dtype."""
    check_strategy(strategy)
    check_eager(model)
    attention_mask = check_inputs(model, input_ids, attention_mask)
    steps = check_steps(strategy, steps)
    b = input_ids.shape[0]
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * b
    if len(seeds) != b:
        raise ValueError(f"seed must be an int or one int per row ({b}), got {len(seeds)} values")
    seeds = [0 if x is None else x for x in seeds]
    for x in seeds:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"seed must be an int, got {type(x).__name__}")

    centroids = model.centroids
    dtype, device = centroids.dtype, centroids.device
    visual_pos = box_positions(GRID, dtype, device).expand(b, -1, -1)
    mask_feat = model.mask_feat.to(dtype).view(1, 1, -1)
    rows = torch.arange(b, device=device)

    # order[i] = the cell each row decides at step i: a [B] tensor (rows differ for ``random``)
    order = None
    if strategy == "tlbr":
        order = torch.tensor(tlbr_order(steps), device=device)[:, None].expand(-1, b)
    elif strategy == "random":
        order = torch.tensor([random_order(steps, x) for x in seeds], device=device).T
    counts = mask_counts(steps) if strategy == "mask_predict" else None

    code = torch.zeros(b, N_CELLS, model.feat_dim, dtype=dtype, device=device)
    ids = torch.full((b, N_CELLS), -1, dtype=torch.int64, device=device)
    vis_mask = torch.ones(b, N_CELLS, dtype=torch.bool, device=device)
    visited = torch.zeros(b, N_CELLS, dtype=torch.bool, device=device)
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


@torch.no_grad()
def paint(model, codes: torch.Tensor, seed: int | None = 0) -> torch.Tensor:
    """The generator on the final codes: [B, 64, F] → [B, 3, 256, 256] in [0, 1].

    Noise injection is on, as in the authors' sampler, drawn from a generator seeded with
    ``seed`` (``None`` turns the noise off).
    """
    if model.generator is None:
        raise ValueError("the model has no generator: build it with a generator or load one "
                         "with from_checkpoint(..., generator_path=...)")
    b = codes.shape[0]
    if codes.dim() != 3 or codes.shape[1] != N_CELLS:
        raise ValueError(f"codes must be [B, {N_CELLS}, F], got {tuple(codes.shape)}")
    gen_param = next(model.generator.parameters())
    grid = codes.reshape(b, GRID, GRID, -1).to(gen_param.dtype)
    noise = None
    if seed is not None:
        noise = torch.Generator(device=gen_param.device).manual_seed(seed)
    return model.generator(grid, noise)
