"""Training X-LXMERT fast: the authors' pre-training step (:mod:`xlx_fast.reference.pretrain`)
with fused loss heads, on-device per-example masking and SDPA attention with a backward.

    model = XLxmertForImageGeneration.from_default(pretraining_heads=True)
    xlx_fast.training.prepare_for_training(model).train()
    opt, sched = xlx_fast.training.make_optimizer(model, total_steps=...)
    batch = xlx_fast.training.make_batch(captions, cluster_ids, indices, step, seed, vocab_size)
    loss = xlx_fast.training.train_step(model, opt, sched, batch, step=step)
"""
from .attention import TrainingLxmertAttention, prepare_for_training, unprepare
from .step import TASKS, Batch, PretrainingLoss, make_batch, pretrain_loss, task_for_step, train_step

__all__ = ["TASKS", "Batch", "PretrainingLoss", "TrainingLxmertAttention", "make_batch",
           "make_optimizer", "prepare_for_training", "pretrain_loss", "task_for_step", "train_step",
           "unprepare"]


def make_optimizer(model, lr: float = 1e-4, weight_decay: float = 0.01, total_steps: int = 1000,
                   warmup_ratio: float = 0.05):
    """The reference's BERT-style AdamW and linear warm-up/decay schedule (same groups, same math)."""
    from xlx_fast.reference.pretrain import make_optimizer as _make

    return _make(model, lr=lr, weight_decay=weight_decay, total_steps=total_steps,
                 warmup_ratio=warmup_ratio)
