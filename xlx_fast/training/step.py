"""The fast pre-training step: the reference's semantics (:mod:`xlx_fast.reference.pretrain`)
with fused loss heads, masking on the device and SDPA attention with a backward.

Per task (step ``s`` trains ``TASKS[s % 3]``):

- ``vis_mask``: CCC loss. Only the masked cells' rows (on average (N²+1)/2 of the model's N²
  cells: 32.5 of 64 at 8×8) go through the obj head (``transform → linear_feat``), then
  :func:`fused_linear_cross_entropy` against the frozen centroid table with
  ``out_cluster.bias``: the ``[B, N², 10000]`` logits are never formed and no gradient is
  computed for the centroids.

The grid is the model's (``model.grid``): uniform masking over 1..N² cells and the boxes
``box_positions(model.grid)``, as in the reference.
- ``word_mask``: MLM loss. Only the selected tokens (15 %) go through ``cls.predictions.transform``,
  then the fused cross-entropy against the word-embedding table (tied decoder, trainable) with
  ``cls.predictions.bias``: the ``[B, 20, 30522]`` logits are never formed.
- ``matched``: the 2-way classifier on the pooled output (tiny: plain ``F.cross_entropy``).

Selecting rows before the head is exact: a row with label -100 contributes nothing to the loss
or to any gradient. It costs one host synchronisation (the number of selected rows), as does
the fused loss's target check; ``torch.compile`` therefore compiles the encoder and leaves the
loss head eager (a graph break there).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xlx_fast.grid import box_positions
from xlx_fast.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from xlx_fast.reference.pretrain import apply_update

from . import masking

__all__ = ["TASKS", "Batch", "PretrainingLoss", "task_for_step", "make_batch", "pretrain_loss",
           "target_count", "train_step"]

TASKS = ("vis_mask", "word_mask", "matched")


def task_for_step(step: int) -> str:
    return TASKS[step % len(TASKS)]


@dataclass
class Batch:
    """Same fields as the reference's ``Batch``, on the training device."""

    task: str
    input_ids: torch.Tensor
    cluster_ids: torch.Tensor
    vis_mask: torch.Tensor
    labels: torch.Tensor


def make_batch(captions: torch.Tensor, cluster_ids: torch.Tensor, indices: torch.Tensor, step: int,
               seed: int, vocab_size: int, device=None) -> Batch:
    """The batch of dataset examples ``indices`` for ``step``: captions and ids are gathered from the
    dataset tables (host or device), then masks are drawn on ``device`` in a few batched ops.
    ``cluster_ids`` [N, cells]: uniform masking is over its ``cells`` (the model's N², checked
    by :func:`pretrain_loss`).

    Raises ``ValueError`` for tables of mismatched sizes and indices outside the dataset (cluster
    ids and labels out of range are refused by :func:`pretrain_loss`).
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    n = captions.shape[0]
    if captions.dim() != 2 or cluster_ids.dim() != 2 or cluster_ids.shape[0] != n:
        raise ValueError(f"captions [N, L] and cluster_ids [N, cells] must have one N, got "
                         f"{tuple(captions.shape)} and {tuple(cluster_ids.shape)}")
    if indices.dim() != 1 or indices.numel() == 0:
        raise ValueError(f"indices must be a non-empty 1-D sequence, got shape {tuple(indices.shape)}")
    if int(indices.min()) < 0 or int(indices.max()) >= n:
        raise ValueError(f"indices must lie in [0, {n}), got {indices.min().item()}..{indices.max().item()}")
    device = torch.device(device) if device is not None else cluster_ids.device
    task = task_for_step(step)
    src = indices.to(captions.device)
    if task == "matched":
        shown = masking.matched_indices(seed, step, src, n)
        words = captions[shown].long().to(device)
        labels = (shown == src).long().to(device)
    else:
        words = captions[src].long().to(device)
    ids = cluster_ids[indices.to(cluster_ids.device)].long().to(device)
    index = indices.to(device)
    vmask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    if task == "vis_mask":
        vmask = masking.vis_mask(seed, step, index, ids.shape[1])
        labels = torch.where(vmask, ids, masking.IGNORE_INDEX)
    elif task == "word_mask":
        words, labels = masking.word_mask(seed, step, index, words, vocab_size)
    return Batch(task, words, ids, vmask, labels)


def pretrain_loss(model, batch: Batch) -> torch.Tensor:
    """The reference's loss for ``batch.task`` through the fused heads (see module docstring).

    ``model``: ``XLxmertForImageGeneration`` with pre-training heads; call
    :func:`xlx_fast.training.prepare_for_training` first for the SDPA attention.
    """
    if getattr(model, "cls", None) is None:
        raise ValueError("model has no pre-training heads: call model.add_pretraining_heads()")
    _check_batch(model, batch)
    device = model.mask_feat.device
    ids, words = batch.cluster_ids.to(device), batch.input_ids.to(device)
    B, n = ids.shape
    feats = F.embedding(ids, model.centroids)
    if batch.task == "vis_mask":
        feats = torch.where(batch.vis_mask.to(device)[..., None],
                            model.mask_feat.to(feats.dtype), feats)
    out = model.bert(input_ids=words, visual_feats=feats,
                     visual_pos=box_positions(model.grid, feats.dtype, device).expand(B, n, 4),
                     attention_mask=words > 0, token_type_ids=torch.zeros_like(words))
    labels = batch.labels.to(device)
    if batch.task == "matched":
        return F.cross_entropy(model.cls.seq_relationship(out[2]), labels)
    if batch.task == "vis_mask":
        head = model.obj_predict_head
        sel = labels != masking.IGNORE_INDEX
        x = head.linear_feat(head.transform(out[1][sel]))
        return fused_linear_cross_entropy(x, head.out_cluster.weight, labels[sel], head.out_cluster.bias)
    pred = model.cls.predictions
    sel = labels != masking.IGNORE_INDEX
    x = pred.transform(out[0][sel])
    return fused_linear_cross_entropy(x, pred.decoder.weight, labels[sel], pred.bias)


def _check_batch(model, batch: Batch) -> None:
    if batch.task not in TASKS:
        raise ValueError(f"batch.task must be one of {TASKS}, got {batch.task!r}")
    B = batch.cluster_ids.shape[0]
    if batch.input_ids.dim() != 2 or batch.input_ids.shape[0] != B:
        raise ValueError(f"mismatched batch sizes: input_ids {tuple(batch.input_ids.shape)} vs "
                         f"cluster_ids {tuple(batch.cluster_ids.shape)}")
    if batch.labels.shape[0] != B or batch.vis_mask.shape != batch.cluster_ids.shape:
        raise ValueError(f"mismatched batch sizes: labels {tuple(batch.labels.shape)}, vis_mask "
                         f"{tuple(batch.vis_mask.shape)}, cluster_ids {tuple(batch.cluster_ids.shape)}")
    if batch.cluster_ids.dim() != 2 or batch.cluster_ids.shape[1] != model.n_cells:
        raise ValueError(f"cluster_ids must be [B, {model.n_cells}] (the model's {model.grid}×"
                         f"{model.grid} grid), got {tuple(batch.cluster_ids.shape)}")
    k = model.n_clusters
    if bool(((batch.cluster_ids < 0) | (batch.cluster_ids >= k)).any()):
        raise ValueError(f"cluster_ids must lie in [0, {k}), got {int(batch.cluster_ids.min())}.."
                         f"{int(batch.cluster_ids.max())}")
    if batch.task == "vis_mask" and not bool(batch.vis_mask.any(1).all()):
        b = int((~batch.vis_mask.any(1)).nonzero()[0, 0])
        raise ValueError(f"vis_mask row {b} masks no cell (uniform masking masks 1..{model.n_cells} cells)")


def train_step(model, optimizer, scheduler, batch: Batch, *, step: int | None = None, clip: float = 1.0,
               autocast_dtype: torch.dtype | None = None, scaler=None, global_count: int | None = None,
               world: int = 1) -> float:
    """One update with the reference's recipe (clip the global grad norm to ``clip``, AdamW, schedule)
    on the fast loss. ``model``: the model, a :class:`PretrainingLoss`, or a
    ``DistributedDataParallel`` around one (``find_unused_parameters=True``: each task leaves the
    other heads unused). Raises ``FloatingPointError`` naming ``step`` and the task on a non-finite
    loss, before anything is updated. Returns the loss (of the global batch when ``world > 1``;
    ``global_count``/``world``: see :class:`PretrainingLoss`).
    """
    module = model if isinstance(model, torch.nn.Module) and not hasattr(model, "mask_feat") \
        else PretrainingLoss(model)
    optimizer.zero_grad(set_to_none=True)
    device = next(module.parameters()).device
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        loss = module(batch, global_count, world) if global_count is not None else module(batch)
    value = float(loss.detach())
    if world > 1:  # the global batch's loss, identical on every rank (so all stop on a NaN)
        import torch.distributed as dist

        t = loss.detach().clone().float()
        dist.all_reduce(t)
        value = float(t) / world
    if value != value or value in (float("inf"), float("-inf")):
        raise FloatingPointError(f"non-finite {batch.task} loss {value} at step {step}")
    apply_update(loss, module, optimizer, scheduler, scaler, clip)  # the reference's own update
    return value


def target_count(batch: Batch) -> int:
    """How many targets the batch's loss averages over (masked cells, selected words, examples)."""
    if batch.task == "matched":
        return int(batch.labels.shape[0])
    return int((batch.labels != masking.IGNORE_INDEX).sum())


class PretrainingLoss(torch.nn.Module):
    """``forward(batch) = pretrain_loss(model, batch)``: the module DDP wraps (DDP hooks a module's
    forward; its state dict is the model's under ``model.``).

    With ``global_count`` (the targets of the whole global batch, summed over ranks) and ``world``
    (the number of ranks), the local mean is rescaled to ``sum_local / global_count · world``:
    DDP averages gradients over ranks, so the update is that of the mean over the *global*
    batch, as one process would compute it. (Ranks see different numbers of masked cells and
    words: averaging per-rank means would weight them unequally.)
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, global_count: int | None = None, world: int = 1) -> torch.Tensor:
        loss = pretrain_loss(self.model, batch)
        if global_count is not None:
            loss = loss * (target_count(batch) * world / global_count)
        return loss
