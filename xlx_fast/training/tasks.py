"""The fast fine-tuning step for the answer tasks (VQA, GQA, NLVR2): the reference's semantics
(:mod:`xlx_fast.reference.finetune`) with SDPA attention that has a backward.

    model = build_answer_model("vqa", size="tiny", labels=data.answers)   # or checkpoint=...
    prepare_for_training(model).train()
    opt, sched = make_optimizer(model, total_steps=...)
    loss = finetune_step(model, opt, sched, data.batch(indices), step=step)

What is fast, and what is not. The answer head is small (a [B, 2H] → [B, answers] MLP, and
BCE over 3,129 answers is ``B·3129`` elements): nothing there is worth a kernel. The gain is
the encoder's attention (:func:`xlx_fast.training.prepare_for_training`: SDPA with its fused
backward, flash/memory-efficient on CUDA) and, under ``--dtype bf16``, autocast. The loss runs
in fp32, as the reference's does. Everything else is the reference's formula, so with dropout 0
the loss and every gradient equal the reference's to rounding (tests/test_finetune.py).

Parameters the loss never reaches (the last cross layer's visual half: only the pooled
language output feeds the head) get no gradient; DDP needs ``find_unused_parameters=True``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from xlx_fast.grid import box_positions
from xlx_fast.models import XLxmertForQuestionAnswering
from xlx_fast.models.checkpoint import IGNORED_BUFFERS, CheckpointError, load_into, read_state_dict
from xlx_fast.reference.pretrain import apply_update

from .task_data import TaskBatch

__all__ = ["TaskLoss", "build_answer_model", "finetune_step", "task_loss"]


def task_loss(model, batch: TaskBatch) -> torch.Tensor:
    """The task's loss (see :mod:`xlx_fast.reference.finetune`) of ``XLxmertForQuestionAnswering``
    ``model`` on ``batch``: BCE with logits over the soft scores times the number of answers
    (VQA, GQA), or cross-entropy over the two classes (NLVR2). Call
    :func:`xlx_fast.training.prepare_for_training` on the model first for the SDPA attention."""
    _check_batch(model, batch)
    device = model.answer_head.logit_fc[0].weight.device
    words = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    feats = batch.features.to(device)
    feats = feats.reshape(-1, *feats.shape[-2:])  # NLVR2: [B, 2, 64, F] -> [2B, 64, F]
    images = model.task.images
    if images > 1:  # one sentence per image: [s0, s0, s1, s1, ...]
        words, mask = words.repeat_interleave(images, 0), mask.repeat_interleave(images, 0)
    n = feats.shape[1]
    pos = box_positions(int(round(n ** 0.5)), feats.dtype, device).expand(feats.shape[0], n, 4)
    out = model.bert(input_ids=words, visual_feats=feats, visual_pos=pos, attention_mask=mask,
                     token_type_ids=torch.zeros_like(words), return_dict=True)
    pooled = out.pooled_output.reshape(-1, images * model.config.hidden_size)
    logits = model.answer_head(pooled).float()
    target = batch.target.to(device)
    if model.task.loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, target.float())
    return F.cross_entropy(logits, target)


def _check_batch(model, batch: TaskBatch) -> None:
    task = getattr(model, "task", None)
    if task is None or not hasattr(model, "answer_head"):
        raise TypeError(f"model must be an XLxmertForQuestionAnswering, got {type(model).__name__}")
    B = batch.input_ids.shape[0]
    if batch.input_ids.dim() != 2 or batch.attention_mask.shape != batch.input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, L], got "
                         f"{tuple(batch.input_ids.shape)} and {tuple(batch.attention_mask.shape)}")
    want = (B, 2) if task.images == 2 else (B,)
    f = batch.features
    if f.dim() != len(want) + 2 or tuple(f.shape[:len(want)]) != want or f.shape[-1] != model.feat_dim:
        raise ValueError(f"features must be [{', '.join(map(str, want))}, cells, {model.feat_dim}] for "
                         f"{task.name}, got {tuple(f.shape)}")
    if task.loss == "bce":
        if batch.target.shape != (B, model.n_answers) or not batch.target.is_floating_point():
            raise ValueError(f"target must be float scores [{B}, {model.n_answers}], got "
                             f"{batch.target.dtype} {tuple(batch.target.shape)}")
    elif batch.target.shape != (B,) or batch.target.dtype != torch.long \
            or bool(((batch.target < 0) | (batch.target >= model.n_answers)).any()):
        raise ValueError(f"target must be int64 labels [{B}] in [0, {model.n_answers}), got "
                         f"{batch.target.dtype} {tuple(batch.target.shape)}")


class TaskLoss(torch.nn.Module):
    """``forward(batch) = task_loss(model, batch)``: the module DDP wraps (its state dict is the
    model's under ``model.``). Every rank holds the same number of examples, so DDP's average
    of the per-rank means is the mean over the global batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: TaskBatch) -> torch.Tensor:
        return task_loss(self.model, batch)


def finetune_step(model, optimizer, scheduler, batch: TaskBatch, *, step: int | None = None,
                  clip: float = 1.0, autocast_dtype: torch.dtype | None = None, scaler=None,
                  world: int = 1) -> float:
    """One update with the reference's recipe (clip the global gradient norm to ``clip``,
    AdamW, schedule) on the fast loss. ``model``: the model, a :class:`TaskLoss`, or a
    ``DistributedDataParallel`` around one. Raises ``FloatingPointError`` naming ``step`` on a
    non-finite loss, before anything is updated. Returns the loss (with ``world > 1``: the
    global batch's, the same on every rank)."""
    module = model if not hasattr(model, "answer_head") else TaskLoss(model)
    optimizer.zero_grad(set_to_none=True)
    device = next(module.parameters()).device
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        loss = module(batch)
    value = float(loss.detach())
    if world > 1:  # the global batch's loss, identical on every rank (so all stop on a NaN)
        import torch.distributed as dist

        t = loss.detach().clone().float()
        dist.all_reduce(t)
        value = float(t) / world
    if value != value or value in (float("inf"), float("-inf")):
        inner = getattr(module, "module", module)  # through DDP to the TaskLoss
        raise FloatingPointError(f"non-finite {inner.model.task.name} loss {value} at step {step}")
    apply_update(loss, module, optimizer, scheduler, scaler, clip)  # the reference's own update
    return value


def build_answer_model(task: str, *, seed: int = 0, size: str = "base", labels=None, checkpoint=None):
    """The model a fine-tuning run starts from: ``XLxmertForQuestionAnswering.from_default(task,
    seed, size, labels)`` (seeded random weights; the head is always this fresh one) with, if
    ``checkpoint`` is given, its ``bert`` taken from an X-LXMERT checkpoint's ``bert.*`` weights
    (a pre-training ``*_LXRT.pth``, or an answer checkpoint). Every ``bert`` key must be there
    with the model's shape, or this raises naming them; the checkpoint's other keys (heads,
    ``mask_feat``, the codebook) are left out and listed in ``model.load_report``.

    The codebook ``vis_emb`` is dropped: fine-tuning reads grid features, and a run's
    checkpoints hold no random codebook (``set_visual_embedding`` installs one for cluster-id
    input later)."""
    model = XLxmertForQuestionAnswering.from_default(task, seed=seed, size=size, labels=labels)
    model.vis_emb = None
    model.load_report = {"unused": []}
    if checkpoint is not None:
        state = read_state_dict(checkpoint, "X-LXMERT checkpoint")
        for k in IGNORED_BUFFERS:
            state.pop(k, None)
        bert = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
        if not bert:
            raise CheckpointError(f"X-LXMERT checkpoint {checkpoint} holds no bert.* weights")
        load_into(model.bert, bert, f"X-LXMERT checkpoint {checkpoint} (bert.*)", strict=True)
        model.load_report = {"unused": sorted(k for k in state if not k.startswith("bert."))}
    return model.eval()
