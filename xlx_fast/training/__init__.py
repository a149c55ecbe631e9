"""Training X-LXMERT fast: the authors' pre-training step (:mod:`xlx_fast.reference.pretrain`)
with fused loss heads, on-device per-example masking and SDPA attention with a backward.

    model = XLxmertForImageGeneration.from_default(pretraining_heads=True)
    xlx_fast.training.prepare_for_training(model).train()
    opt, sched = xlx_fast.training.make_optimizer(model, total_steps=...)
    batch = xlx_fast.training.make_batch(captions, cluster_ids, indices, step, seed, vocab_size)
    loss = xlx_fast.training.train_step(model, opt, sched, batch, step=step)
"""
from __future__ import annotations

import importlib

# Loaded on first use: the step and the attention import the model code (transformers), which
# the run-file and data helpers (``checkpoint``, ``data``) do not need, so a command line can
# check its arguments and its run directory before paying for it.
_LAZY = {
    "TrainingLxmertAttention": "attention", "prepare_for_training": "attention", "unprepare": "attention",
    "TASKS": "step", "Batch": "step", "PretrainingLoss": "step", "make_batch": "step",
    "pretrain_loss": "step", "task_for_step": "step", "train_step": "step",
}
_SUBMODULES = ("attention", "checkpoint", "data", "masking", "step", "task_data", "tasks")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TASKS", "Batch", "PretrainingLoss", "TrainingLxmertAttention", "make_batch",
           "make_optimizer", "prepare_for_training", "pretrain_loss", "task_for_step", "train_step",
           "unprepare"]


def make_optimizer(model, lr: float = 1e-4, weight_decay: float = 0.01, total_steps: int = 1000,
                   warmup_ratio: float = 0.05):
    """The reference's BERT-style AdamW and linear warm-up/decay schedule (same groups, same math)."""
    from xlx_fast.reference.pretrain import make_optimizer as _make

    return _make(model, lr=lr, weight_decay=weight_decay, total_steps=total_steps,
                 warmup_ratio=warmup_ratio)
