"""Per-example random draws of the pre-training step, computed on the device in one batch.

The draws are those of :mod:`xlx_fast.reference.pretrain` (``draw``): a 32-bit integer hash of
(seed, step, example index, stream, position), here evaluated elementwise on int64 tensors so
that a whole batch's masks come from a few vectorised ops on whatever device holds the batch,
with no host loop and no generator state. Every result is a pure function of the example's
dataset index, so a DDP rank draws for its examples exactly what one process would.

Integer arithmetic: values stay in [0, 2^32); a product of two such values may wrap in int64,
but its low 32 bits (all that is kept) are those of the exact product, on CPU and CUDA alike.
"""
from __future__ import annotations

import torch

__all__ = ["draw", "vis_mask", "word_mask", "matched_indices", "CLS_ID", "SEP_ID", "MASK_ID",
           "IGNORE_INDEX", "WORD_MASK_RATE"]

CLS_ID, SEP_ID, MASK_ID = 101, 102, 103
IGNORE_INDEX = -100
WORD_MASK_RATE = 0.15
S_VIS_COUNT, S_VIS_KEY, S_WORD_SELECT, S_WORD_KIND, S_WORD_RANDOM, S_MATCH, S_MATCH_OTHER = range(7)
_M32 = 0xFFFFFFFF


def _mix(x):
    """lowbias32 on ints or int64 tensors holding values in [0, 2^32)."""
    x = (x + 0x9E3779B9) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _threshold(p: float) -> int:
    return int(p * 2 ** 32)


def draw(seed: int, step: int, index: torch.Tensor, stream: int, position: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` uniform 32-bit integers (int64) for examples ``index`` [B] at ``position`` [P]."""
    h = _mix(_mix(seed & _M32) ^ (step & _M32))          # host ints: the same for the whole batch
    h = _mix(torch.bitwise_xor(index.long() & _M32, h))   # [B]
    h = _mix(h ^ (stream & _M32))
    return _mix(h[:, None] ^ (position.long() & _M32)[None, :])


def vis_mask(seed: int, step: int, index: torch.Tensor, n_cells: int = 64) -> torch.Tensor:
    """``[B, n_cells]`` bool: ``1 + draw % n_cells`` cells per example, those with the smallest
    keys (ties by cell index, i.e. a stable sort): uniform masking."""
    dev = index.device
    n = 1 + draw(seed, step, index, S_VIS_COUNT, torch.zeros(1, dtype=torch.long, device=dev)) % n_cells
    keys = draw(seed, step, index, S_VIS_KEY, torch.arange(n_cells, device=dev))
    order = torch.sort(keys, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_cells, device=dev).expand_as(order))
    return rank < n


def word_mask(seed: int, step: int, index: torch.Tensor, ids: torch.Tensor, vocab_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT 80/10/10 masking of captions ``ids`` [B, L]: returns (input ids, labels)."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    eligible = (ids != 0) & (ids != CLS_ID) & (ids != SEP_ID)
    sel = eligible & (draw(seed, step, index, S_WORD_SELECT, pos) < _threshold(WORD_MASK_RATE))
    kind = draw(seed, step, index, S_WORD_KIND, pos)
    rand = draw(seed, step, index, S_WORD_RANDOM, pos) % vocab_size
    inputs = torch.where(sel & (kind < _threshold(0.8)), MASK_ID,
                         torch.where(sel & (kind < _threshold(0.9)), rand, ids))
    return inputs, torch.where(sel, ids, IGNORE_INDEX)


def matched_indices(seed: int, step: int, index: torch.Tensor, n_examples: int) -> torch.Tensor:
    """The example whose caption each example shows: itself with probability 0.5, else another."""
    zero = torch.zeros(1, dtype=torch.long, device=index.device)
    if n_examples < 2:
        return index.clone()
    swap = draw(seed, step, index, S_MATCH, zero)[:, 0] < _threshold(0.5)
    other = draw(seed, step, index, S_MATCH_OTHER, zero)[:, 0] % (n_examples - 1)
    other = other + (other >= index)
    return torch.where(swap, other, index)
