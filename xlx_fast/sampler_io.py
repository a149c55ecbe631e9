"""What every sampler takes and gives, the reference and the fast loop alike: the checks of a
batch of captions (``input_ids``, ``attention_mask``) and :class:`SampleResult`.

Neutral ground: the reference and ``generate`` both read it, so neither is built on the other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SampleResult", "check_inputs", "default_pad_id"]


@dataclass
class SampleResult:
    """What a sampler returns, over the model's n = ``model.n_cells`` cells (N² for its N×N
    grid, row-major: 64 on the 8×8 grid).

    ids:   [B, n] int64 cluster id of each cell; -1 for a cell no step decided (AR with K < n)
    codes: [B, n, F] the final visual codes (centroid rows, ``mask_feat`` where undecided)
    probs: [B, n] float32 the last step's ``pred_prob`` (max softmax probability per cell)
    masks: [K, B, n] bool, the mask each step's forward saw
    """

    ids: torch.Tensor
    codes: torch.Tensor
    probs: torch.Tensor
    masks: torch.Tensor


def default_pad_id(model) -> int:
    """The id that pads captions when no ``attention_mask`` is given: ``model.config.
    pad_token_id`` when set (set it to your tokenizer's ``pad_id``), else 0, BERT's ``[PAD]``."""
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def check_inputs(model, input_ids, attention_mask):
    """Validate caption inputs; returns ``attention_mask`` as given, or by default
    ``input_ids != default_pad_id(model)``. Captions do not depend on the model's grid: the
    cell count (``model.n_cells``) is checked where cells are given or counted (steps, images).

    A given mask must be bool, or hold only 0 and 1: HF turns it into the additive bias
    ``(1 - mask) · finfo.min``, so any other value (7, 0.5) is not "attend" or "skip" but an
    overflow (NaN probabilities in the eager model) — refused, in every sampler alike.
    """
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
        return input_ids != default_pad_id(model)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
    if attention_mask.dtype != torch.bool:
        if attention_mask.dtype.is_complex:
            raise TypeError(f"attention_mask must be bool, integer or floating, got {attention_mask.dtype}")
        binary = (attention_mask == 0) | (attention_mask == 1)
        if not bool(binary.all()):
            bad = attention_mask[~binary].unique()[:5].tolist()
            raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token), got values "
                             f"{bad}: pass a bool mask or 0/1")
    return attention_mask
