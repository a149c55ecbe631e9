"""The reference fine-tuning step for the answer tasks (VQA, GQA, NLVR2) in plain eager PyTorch.

This is what "same losses and gradients" means for :mod:`xlx_fast.training.tasks`. The forward
is :func:`xlx_fast.reference.answer.answer_logits` (HF's eager ``LxmertModel``, the answer head
on the pooled output; NLVR2 repeats each sentence for its two images). The losses:

- ``vqa``, ``gqa`` (``task.loss == "bce"``): ``BCEWithLogitsLoss()(logits, target)`` with
  ``target`` the soft answer scores ``[B, A]``: the mean over B·A entries, as X-LXMERT's own
  ``vqa.py``/``gqa.py`` compute it. (LXMERT's multiplies it by the answer count A,
  ``loss * logit.size(1)``; under AdamW a constant factor changes the update only through
  Adam's epsilon and gradient clipping, whose threshold it would meet A times sooner.)
- ``nlvr2`` (``task.loss == "ce"``): ``CrossEntropyLoss()(logits, label)``, ``label`` [B] in {0, 1}.

A batch is any object with ``input_ids`` [B, L] and ``attention_mask`` [B, L] (the question,
``[CLS] words [SEP]`` padded), ``features`` (``[B, 64, F]``; NLVR2 ``[B, 2, 64, F]``) and
``target`` (``[B, A]`` float scores, or ``[B]`` int64 labels for NLVR2), e.g.
:class:`xlx_fast.training.task_data.TaskBatch`.

The update is the pre-training reference's: :func:`xlx_fast.reference.pretrain.make_optimizer`
(BERT-style AdamW, linear warm-up then decay) and
:func:`xlx_fast.reference.pretrain.apply_update` (backward, clip the global gradient norm,
optimizer and schedule steps).
"""
from __future__ import annotations

import torch
from torch import nn

from .answer import answer_logits
from .pretrain import make_optimizer, update_step

__all__ = ["finetune_loss", "finetune_step", "make_optimizer"]


def finetune_loss(model, batch) -> torch.Tensor:
    """The authors' loss of ``XLxmertForQuestionAnswering`` ``model`` on ``batch`` (a scalar);
    see the module docstring."""
    device = next(model.parameters()).device
    logits = answer_logits(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                           features=batch.features.to(device))
    target = batch.target.to(device)
    logits = logits.float()  # under autocast the loss runs in fp32, as the authors' amp runs did
    if model.task.loss == "bce":
        return nn.BCEWithLogitsLoss()(logits, target.float())
    return nn.CrossEntropyLoss()(logits, target)


def finetune_step(model, optimizer, scheduler, batch, *, clip: float = 1.0,
                  autocast_dtype: torch.dtype | None = None, scaler=None) -> float:
    """One update: loss, backward, clip the global gradient norm to ``clip``, step, schedule.

    Returns the loss. Raises ``FloatingPointError`` on a non-finite loss (nothing is updated).
    """
    return update_step(model, optimizer, scheduler, lambda: finetune_loss(model, batch),
                       model.task.name, clip=clip, autocast_dtype=autocast_dtype, scaler=scaler)
