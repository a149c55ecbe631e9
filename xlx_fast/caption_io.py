"""What every captioner takes and gives, the reference and the fast path alike: the token
layout of a caption being written, the checks of the image input and :class:`CaptionResult`.

A caption of L words is written into ``[CLS] w_1 … w_L [SEP]``, padded with ``[PAD]`` (attention
mask 0) to the batch's longest, as BERT pads. The words are the Mask-Predict "cells": word i
is cell i - 1. They are drawn from the vocabulary minus BERT's special tokens (``[PAD]``,
``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``: their logits are -inf), so a caption is always
words; a masked word reads ``[MASK]``.

Neutral ground: the reference and the fast captioner both read it, neither is built on the other.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch


__all__ = ["CLS_ID", "SEP_ID", "MASK_ID", "PAD_ID", "UNK_ID", "SPECIAL_IDS", "MAX_WORDS",
           "DEFAULT_WORDS", "CaptionResult", "check_image", "check_lengths", "layout"]

# BERT-base-uncased's ids: the vocabulary X-LXMERT was trained with
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)
MAX_WORDS = 18      # the model reads captions of at most 20 tokens, [CLS] and [SEP] included
DEFAULT_WORDS = 12


@dataclass
class CaptionResult:
    """What a captioner returns.

    ids:     [B, W] int64 word ids, W the longest caption; a row's words are ``ids[b, :L_b]``;
             -1 for a word no step decided (AR strategies with fewer steps than words), ``[PAD]``
             (0) past the row's length
    probs:   [B, W] float32 the last step's max probability per word (0 past the length)
    masks:   [K, B, W] bool, the mask each step's forward saw
    lengths: [B] int64 the words of each caption
    """

    ids: torch.Tensor
    probs: torch.Tensor
    masks: torch.Tensor
    lengths: torch.Tensor

    def tokens(self, row: int) -> list[int]:
        """Row ``row``'s word ids (``[MASK]`` for an undecided word)."""
        n = int(self.lengths[row])
        return [MASK_ID if i < 0 else i for i in self.ids[row, :n].tolist()]


def check_lengths(length, batch: int) -> list[int]:
    """``length`` (an int, or one per row) as a list of ints in [1, MAX_WORDS]."""
    if isinstance(length, torch.Tensor):
        length = length.tolist()
    values = list(length) if isinstance(length, (list, tuple)) else [length] * batch
    if len(values) != batch:
        raise ValueError(f"length must be an int or one per row ({batch}), got {len(values)} values")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"length must be an int, got {type(v).__name__} {v!r}")
        if not 1 <= v <= MAX_WORDS:
            raise ValueError(f"length must be in [1, {MAX_WORDS}] words (the model reads captions "
                             f"of at most {MAX_WORDS + 2} tokens), got {v}")
    return [int(v) for v in values]


def check_image(model, features=None, cluster_ids=None) -> torch.Tensor:
    """The images as features [B, n, F] in the model's dtype and on its device: ``features``
    as given, or the codebook rows of ``cluster_ids`` [B, n], n = ``model.n_cells`` (the cells
    of the model's N×N grid: an image is read on the grid the model paints). Exactly one must
    be given."""
    if (features is None) == (cluster_ids is None):
        raise ValueError("give exactly one of features and cluster_ids")
    centroids, n_cells, grid = model.centroids, model.n_cells, model.grid
    on_grid = f" (the model's {grid}×{grid} grid)"
    if cluster_ids is not None:
        if not isinstance(cluster_ids, torch.Tensor):
            raise TypeError(f"cluster_ids must be a torch.Tensor, got {type(cluster_ids).__name__}")
        if cluster_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"cluster_ids must be int64 or int32, got {cluster_ids.dtype}")
        if cluster_ids.dim() != 2 or cluster_ids.shape[1] != n_cells or cluster_ids.shape[0] < 1:
            raise ValueError(f"cluster_ids must be [batch, {n_cells}]{on_grid}, got shape "
                             f"{tuple(cluster_ids.shape)}")
        k = centroids.shape[0]
        lo, hi = int(cluster_ids.min()), int(cluster_ids.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"cluster_ids must lie in [0, {k}), got [{lo}, {hi}]")
        return centroids[cluster_ids.to(centroids.device, torch.int64)]
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    f = centroids.shape[1]
    if features.dim() != 3 or features.shape[1:] != (n_cells, f) or features.shape[0] < 1:
        raise ValueError(f"features must be [batch, {n_cells}, {f}]{on_grid}, got shape "
                         f"{tuple(features.shape)}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or inf")
    return features.to(centroids.device, centroids.dtype)


def layout(lengths: list[int], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, attention_mask)`` [B, W + 2] of captions about to be written: ``[CLS]``,
    L ``[MASK]``, ``[SEP]``, ``[PAD]`` to the width (default: the longest, W = max L)."""
    width = max(lengths) if width is None else width
    tokens = torch.full((len(lengths), width + 2), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(lengths), width + 2), dtype=torch.bool)
    for b, n in enumerate(lengths):
        tokens[b, 0], tokens[b, 1:n + 1], tokens[b, n + 1] = CLS_ID, MASK_ID, SEP_ID
        mask[b, :n + 2] = True
    return tokens, mask
