"""The fast pre-training step of X-UNITER: the reference's semantics
(:mod:`xlx_fast.reference.xuniter_pretrain`) with fused loss heads, on X-LXMERT's batches.

Batches, tasks and the update are X-LXMERT's (:mod:`xlx_fast.training.step`: ``make_batch``
draws the masks on the device; step ``s`` trains ``TASKS[s % 3]``). Only the loss differs:
the model's single stream ``seq = model.encode(words, words > 0, feats)`` [B, L + N², H], then

- ``vis_mask`` (CCC): only the masked cells' rows of ``seq[:, L:]`` go through
  ``obj_predict_head.transform → linear_feat``, then :func:`fused_linear_cross_entropy` against
  the frozen centroid table with ``out_cluster.bias``: the ``[B, N², K]`` logits are never
  formed and no gradient is computed for the centroids;
- ``word_mask`` (MLM): only the selected words' rows of ``seq[:, :L]`` go through
  ``cls.predictions.transform``, then the fused cross-entropy against the word-embedding table
  (the tied decoder, trainable) with ``cls.predictions.bias``: no ``[B, L, vocab]`` logits;
- ``matched`` (ITM): ``cls.seq_relationship(bert.pooler(seq))`` and plain ``F.cross_entropy``
  (two classes: nothing to fuse).

Selecting rows before the head is exact: a row with label -100 contributes nothing to the loss
or to any gradient. It costs one host synchronisation (the number of selected rows).

Attention is the model's own HF ``BertSelfAttention``; :func:`prepare_for_training` switches it
to HF's SDPA implementation (differentiable, fused kernels on CUDA), :func:`unprepare` back to
eager. Both agree with the eager reference to rounding (with dropout 0; SDPA draws its own
dropout masks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from xlx_fast.models.xuniter import XUniterForImageGeneration
from xlx_fast.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

from . import masking
from .step import (TASKS, Batch, PretrainingLoss, _check_batch, make_batch, target_count,
                   task_for_step)
from .step import train_step as _train_step

__all__ = ["TASKS", "Batch", "XUniterPretrainingLoss", "make_batch", "prepare_for_training",
           "pretrain_loss", "task_for_step", "train_step", "unprepare"]


def prepare_for_training(model: XUniterForImageGeneration) -> XUniterForImageGeneration:
    """Switch the model's BERT attention to HF's SDPA implementation, in place; returns
    ``model``. Parameters and state-dict keys are untouched."""
    _check_model(model)
    model.bert.set_attn_implementation("sdpa")
    return model


def unprepare(model: XUniterForImageGeneration) -> XUniterForImageGeneration:
    """Undo :func:`prepare_for_training` (back to HF's eager attention)."""
    _check_model(model)
    model.bert.set_attn_implementation("eager")
    return model


def _check_model(model) -> None:
    if not isinstance(model, XUniterForImageGeneration):
        raise TypeError(f"model must be an XUniterForImageGeneration, got {type(model).__name__}")


def pretrain_loss(model: XUniterForImageGeneration, batch: Batch) -> torch.Tensor:
    """The reference's loss for ``batch.task`` through the fused heads (see the module
    docstring). ``model``: ``XUniterForImageGeneration`` with pre-training heads."""
    _check_model(model)
    if model.cls is None:
        raise ValueError("model has no pre-training heads: call model.add_pretraining_heads()")
    _check_batch(model, batch)
    device = model.mask_feat.device
    ids, words = batch.cluster_ids.to(device), batch.input_ids.to(device)
    feats = F.embedding(ids, model.centroids)
    if batch.task == "vis_mask":
        feats = torch.where(batch.vis_mask.to(device)[..., None],
                            model.mask_feat.to(feats.dtype), feats)
    seq = model.encode(words, words > 0, feats)
    L = words.shape[1]
    labels = batch.labels.to(device)
    if batch.task == "matched":
        return F.cross_entropy(model.cls.seq_relationship(model.bert.pooler(seq)), labels)
    sel = labels != masking.IGNORE_INDEX
    if batch.task == "vis_mask":
        head = model.obj_predict_head
        x = head.linear_feat(head.transform(seq[:, L:][sel]))
        return fused_linear_cross_entropy(x, head.out_cluster.weight, labels[sel], head.out_cluster.bias)
    pred = model.cls.predictions
    x = pred.transform(seq[:, :L][sel])
    return fused_linear_cross_entropy(x, pred.decoder.weight, labels[sel], pred.bias)


class XUniterPretrainingLoss(PretrainingLoss):
    """:class:`~xlx_fast.training.step.PretrainingLoss` (the module DDP wraps, the same global
    rescaling with ``global_count`` and ``world``) over :func:`pretrain_loss`."""

    def __init__(self, model: XUniterForImageGeneration):
        _check_model(model)
        super().__init__(model)

    def forward(self, batch: Batch, global_count: int | None = None, world: int = 1) -> torch.Tensor:
        loss = pretrain_loss(self.model, batch)
        if global_count is not None:
            loss = loss * (target_count(batch) * world / global_count)
        return loss


def train_step(model, optimizer, scheduler, batch: Batch, **kwargs) -> float:
    """:func:`xlx_fast.training.step.train_step` (same recipe, arguments and errors) on the
    X-UNITER loss. ``model``: the model, an :class:`XUniterPretrainingLoss`, or a
    ``DistributedDataParallel`` around one."""
    module = XUniterPretrainingLoss(model) if isinstance(model, XUniterForImageGeneration) else model
    return _train_step(module, optimizer, scheduler, batch, **kwargs)
