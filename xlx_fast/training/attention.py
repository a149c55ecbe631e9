"""Attention for training: HF ``LxmertAttention`` routed through
``torch.nn.functional.scaled_dot_product_attention``, which has a backward.

``xlx_fast.optimize`` keeps HF's eager attention whenever a gradient is needed, because the fused
Triton kernel (``xlx_fast.ops.attention``) is forward-only. :func:`prepare_for_training` switches
each ``LxmertAttention`` (plain or already optimized) to :class:`TrainingLxmertAttention`, whose
forward is ``SDPA(query(h), key(ctx), value(ctx), mask, dropout_p)``: the same math as HF's
``softmax(q·kᵀ/√d + mask)·v`` with attention dropout, differentiable, and on CUDA dispatched by
torch to its flash / memory-efficient kernels (forward and backward). Parameters and state-dict
keys are untouched; :func:`unprepare` switches back.

Why SDPA's backward rather than a Triton backward here. LXMERT's sequences are short (L = 20
words, 64 grid cells): per layer the attention core costs ``4·B·L²·D`` FLOPs against
``24·B·L·D²`` for the projections and the FFN, i.e. ``L / (6·D)`` ≈ 0.4 % (L = 20) to 1.4 %
(L = 64) of the layer at D = 768. Its ``L×L`` probabilities per head are 1.6-16 KB, so even the
eager backward is not memory-bound on them. A hand-written backward could save at most that
sliver, while SDPA's fused backward is maintained upstream, covers dropout and the additive
key-padding mask, and composes with ``torch.compile`` and autocast. Measuring the actual share
on a GPU (bf16, batch 256) is pending: no GPU was available when this was written.

Dropout: SDPA draws its own dropout mask, so with ``attention_probs_dropout_prob > 0`` a
training step is statistically, not bitwise, the eager one; with dropout 0 (or in eval mode) the
two agree to rounding, which is what the tests check.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.lxmert.modeling_lxmert import LxmertAttention

__all__ = ["TrainingLxmertAttention", "prepare_for_training", "unprepare"]


class TrainingLxmertAttention(LxmertAttention):
    """``LxmertAttention`` whose forward runs SDPA (made by :func:`prepare_for_training`)."""

    def forward(self, hidden_states, context, attention_mask=None, output_attentions=False):
        if output_attentions:  # SDPA never forms the probabilities
            return LxmertAttention.forward(self, hidden_states, context, attention_mask, True)
        B, Lq, _ = hidden_states.shape
        H, d = self.num_attention_heads, self.attention_head_size

        def heads(t):
            return t.view(B, t.shape[1], H, d).transpose(1, 2)

        q = heads(self.query(hidden_states))
        k, v = heads(self.key(context)), heads(self.value(context))
        mask = attention_mask
        if mask is not None:
            # HF's additive [B, 1, 1, Lk] mask; SDPA wants the query dtype off the CPU, and
            # finfo(float32).min rounded to bf16 may overflow to -inf: clamp to stay finite.
            mask = mask.to(q.dtype).clamp_min(torch.finfo(q.dtype).min)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout.p if self.training else 0.0)
        return (o.transpose(1, 2).reshape(B, Lq, H * d),)


def prepare_for_training(model: nn.Module) -> nn.Module:
    """Switch every ``LxmertAttention`` of ``model`` (optimized or not) to
    :class:`TrainingLxmertAttention`, in place; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from xlx_fast.patching import FusedLxmertAttention

    for module in model.modules():
        if type(module) in (LxmertAttention, FusedLxmertAttention):
            for name in ("_xlx_weight", "_xlx_bias", "_xlx_key"):  # an optimize()d module's copies
                module.__dict__.pop(name, None)
            module.__class__ = TrainingLxmertAttention
    return model


def unprepare(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare_for_training` (back to plain ``LxmertAttention``)."""
    for module in model.modules():
        if type(module) is TrainingLxmertAttention:
            module.__class__ = LxmertAttention
    return model
