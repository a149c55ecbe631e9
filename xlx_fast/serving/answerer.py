"""Batched answering: the answer requests waiting at a step boundary, in one forward.

An answer is one forward of the answer model (no steps), so the scheduler does not hold answer
requests in slots: at a step boundary it takes those waiting (up to its batch bound) and runs
:func:`answer_batch` on them, which stacks their questions and images and calls
:func:`xlx_fast.answer` once, with the largest ``top_k`` asked; each request gets the first
``top_k`` of its own row. A row's logits depend on that row only (nothing in the forward mixes
rows; ``answer`` cuts trailing padding no row attends to, whose softmax weight is exactly 0), so
a request's answers are those of the request alone, and its scores agree with them to the float
rounding of GEMMs at another batch size (SPEC §4).

Memory: the forward's activations at the batch's size (one [B, 20 + 64, hidden] pass; NLVR2
runs two images per question).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AnswerRequest", "answer_batch"]


@dataclass
class AnswerRequest:
    """One question: ``input_ids`` / ``attention_mask`` [L] (the tokenizer's row), ``cluster_ids``
    [64] (NLVR2: [2, 64]) int64, and the answers wanted."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cluster_ids: torch.Tensor
    top_k: int
    tag: object = None


@torch.no_grad()
def answer_batch(model, requests: list[AnswerRequest]) -> list[list[tuple[str, float]]]:
    """One forward for ``requests``: per request its ``top_k`` (answer, score) pairs, best first.
    Raises what :func:`xlx_fast.answer` raises (a ValueError naming the rows whose logits are
    not finite, for one)."""
    from ..answering import answer

    if not requests:
        return []
    device = next(model.parameters()).device
    ids = torch.stack([r.input_ids for r in requests]).to(device)
    mask = torch.stack([r.attention_mask for r in requests]).to(device)
    images = torch.stack([r.cluster_ids for r in requests]).to(device)
    k = max(r.top_k for r in requests)
    result = answer(model, ids, mask, cluster_ids=images, top_k=k)
    scores = result.top_scores.float().cpu().tolist()
    return [list(zip(result.answers[n][:r.top_k], scores[n][:r.top_k]))
            for n, r in enumerate(requests)]
