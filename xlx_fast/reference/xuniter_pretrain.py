"""The reference pre-training step of X-UNITER, in plain eager PyTorch: X-LXMERT's recipe
(:mod:`.pretrain`) on the single-stream model.

This is what "same losses and gradients" means for :mod:`xlx_fast.training.xuniter_step`. The
paper's claim is that its changes (CCC targets over a codebook, uniform masking, aligned data)
carry to a single-stream model; so everything but the forward is X-LXMERT's, unchanged:

- tasks: step ``s`` trains one task, ``TASKS[s % 3]`` = vis_mask, word_mask, matched, each with
  weight 1 (one task and one loss per batch, as the authors' X-LXMERT and as UNITER, which
  also samples one task per mini-batch);
- batches: :func:`.pretrain.make_batch` itself, so the draws are the same pure function of
  (seed, step, example index, stream, position): uniform masking of ``randint(1, N²)`` cells
  without replacement, BERT's 15 % word masking (80/10/10, never [CLS], [SEP] or padding), and
  for matching, with probability 0.5 another example's caption (label 0, else 1);
- the optimiser, schedule, clipping and autocast of :mod:`.pretrain`.

The forward (:meth:`XUniterForImageGeneration.encode`): BERT over [caption embeddings (type 0);
UNITER image embeddings (type 1) of ``feats``], key mask [caption ids > 0; ones], where
``feats = C[cluster_ids]`` with the masked cells' rows replaced by ``mask_feat`` (vis_mask
only). With ``seq`` its output [B, L + N², H]:

- ``vis_mask`` (CCC): ``CE(obj_predict_head(seq[:, L:]), label)`` over the K centroids (the
  head's output weight is the frozen table C), averaged over the masked cells of the batch;
- ``word_mask`` (MLM): ``CE(cls.predictions(seq[:, :L]), label)`` over the vocabulary (decoder
  tied to the word embeddings), averaged over the selected words; the image is not masked;
- ``matched`` (ITM): ``CE(cls.seq_relationship(bert.pooler(seq)), label)``, the pooler reading
  the [CLS] row, averaged over the examples.

Labels are -100 wherever a position is not a target. Imports nothing fast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.xuniter import XUniterForImageGeneration
from .pretrain import (IGNORE_INDEX, TASKS, Batch, make_batch, make_optimizer, masked_inputs,
                       task_for_step, update_step)

__all__ = ["TASKS", "IGNORE_INDEX", "Batch", "make_batch", "make_optimizer", "task_for_step",
           "pretrain_loss", "train_step"]


def pretrain_loss(model, batch: Batch) -> torch.Tensor:
    """The loss of ``batch.task`` on an X-UNITER model with pre-training heads (a scalar)."""
    if not isinstance(model, XUniterForImageGeneration):
        raise TypeError(f"model must be an XUniterForImageGeneration, got {type(model).__name__}")
    if batch.task not in TASKS:
        raise ValueError(f"batch.task must be one of {TASKS}, got {batch.task!r}")
    words, feats = masked_inputs(model, batch)
    device, (B, n) = feats.device, feats.shape[:2]
    seq = model.encode(words, words > 0, feats)
    L = words.shape[1]
    lang, visual, pooled = seq[:, :L], seq[:, L:], model.bert.pooler(seq)
    labels = batch.labels.to(device)
    if batch.task == "vis_mask":
        logits = model.obj_predict_head(visual)
        return F.cross_entropy(logits.reshape(B * n, -1), labels.reshape(-1))
    scores, relationship = model.cls(lang, pooled)
    if batch.task == "word_mask":
        return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), labels.reshape(-1))
    return F.cross_entropy(relationship, labels)


def train_step(model, optimizer, scheduler, batch: Batch, *, clip: float = 1.0,
               autocast_dtype: torch.dtype | None = None, scaler=None) -> float:
    """One update, as :func:`.pretrain.train_step`: loss, backward, clip the global gradient norm
    to ``clip``, step, schedule. Returns the loss; raises ``FloatingPointError`` on a non-finite
    loss (nothing is updated)."""
    return update_step(model, optimizer, scheduler, lambda: pretrain_loss(model, batch), batch.task,
                       clip=clip, autocast_dtype=autocast_dtype, scaler=scaler)
