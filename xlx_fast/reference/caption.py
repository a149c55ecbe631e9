"""Captioning by Mask-Predict over words, in eager PyTorch: the reference of ``xlx_fast.caption``.

The image-generation checkpoint also carries the masked-LM head (``cls.predictions``, its
decoder tied to the word embeddings), so the same network writes a caption for an image the
way it paints: the caption's words are the cells, the image is the fixed context.

A caption of L words is ``[CLS] w_1 … w_L [SEP]`` (:func:`xlx_fast.caption_io.layout`, padded
with ``[PAD]`` and attention mask 0 to the batch's longest). One step, given the words so far
and the mask (True = the word reads ``[MASK]``):

1. ``tokens = [CLS] where(mask, [MASK], words) [SEP] [PAD]…``
2. ``language_output = bert(tokens, visual_feats=image, visual_pos, attention_mask).language_output``
3. ``logits = cls.predictions(language_output)`` at the word positions, with BERT's special
   tokens ([PAD], [UNK], [CLS], [SEP], [MASK]) set to -inf; ``prob = softmax(logits)``;
   ``(pred_prob, pred_id) = prob.max(-1)``
4. the strategy's rule decides which words take ``pred_id`` and which are masked next

The rules are the image sampler's (:mod:`xlx_fast.reference.sampler`) over the row's L words
instead of the grid's cells: Mask-Predict-K re-masks the ``int((K-i)/K·L)`` words with the lowest
``pred_prob``, stable (ties: the lowest position); ``confidence``, ``tlbr`` and ``random`` decide
one word a step. Each row has its own length, and with it its own schedule and default steps.
"""
from __future__ import annotations

import numbers

import torch

from ..caption_io import (DEFAULT_WORDS, MASK_ID, SPECIAL_IDS, CaptionResult, check_image,
                          check_lengths, layout)
from ..strategies import check_steps, check_strategy, mask_counts, random_order, tlbr_order
from .grid import box_positions
from .sampler import check_eager


def check_captioner(model) -> None:
    """The model must carry the masked-LM head and be in eval mode."""
    if getattr(model, "cls", None) is None:
        raise ValueError("captioning needs the masked-LM head (cls.predictions): build the model "
                         "with pretraining_heads=True (from_default or from_checkpoint)")
    if model.training:
        raise ValueError("captioning runs inference only: call model.eval() first")


def row_seeds(seed, b: int) -> list[int]:
    """One int seed per row from an int, None (0) or a list of one per row."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * b
    if len(seeds) != b:
        raise ValueError(f"seed must be an int or one int per row ({b}), got {len(seeds)} values")
    out = []
    for x in seeds:
        x = 0 if x is None else x
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {type(x).__name__} {x!r}")
        out.append(int(x))
    return out


@torch.no_grad()
def caption(model, features=None, cluster_ids=None, length=DEFAULT_WORDS, steps=None,
            strategy: str = "mask_predict", seed=None) -> CaptionResult:
    """Write a caption of ``length`` words (an int, or one per row) for each image, eagerly
    (see the module docstring). ``features`` [B, n, F] or ``cluster_ids`` [B, n], n the cells of
    the model's grid (``model.n_cells``); ``steps``
    defaults per row to the strategy's default for the row's length; ``seed`` fixes the
    ``random`` order. Runs in the model's dtype."""
    check_strategy(strategy)
    check_eager(model)
    check_captioner(model)
    image = check_image(model, features, cluster_ids)
    b = image.shape[0]
    lengths = check_lengths(length, b)
    seeds = row_seeds(seed, b)
    row_steps = [check_steps(strategy, steps, n) for n in lengths]
    k = max(row_steps)
    # per row: the Mask-Predict counts, or the word each step decides (tlbr, random)
    counts = [mask_counts(kb, n) for kb, n in zip(row_steps, lengths)]
    orders = [tlbr_order(kb, n) if strategy == "tlbr" else random_order(kb, s, n)
              if strategy == "random" else None for kb, n, s in zip(row_steps, lengths, seeds)]

    dtype, device = image.dtype, image.device
    tokens, attention_mask = (t.to(device) for t in layout(lengths))
    width = max(lengths)
    is_word = torch.zeros(b, width, dtype=torch.bool, device=device)
    for r, n in enumerate(lengths):
        is_word[r, :n] = True
    visual_pos = box_positions(model.grid, dtype, device).expand(b, -1, -1)
    special = torch.tensor(SPECIAL_IDS, device=device)

    words = torch.full((b, width), -1, dtype=torch.int64, device=device)
    mask = is_word.clone()
    visited = ~is_word
    probs = torch.zeros(b, width, dtype=torch.float32, device=device)
    masks = torch.zeros(k, b, width, dtype=torch.bool, device=device)
    pred_prob = None
    for i in range(k):
        live = [r for r in range(b) if i < row_steps[r]]
        for r in live:  # the mask this step's forward sees
            if strategy == "mask_predict" and i > 0:
                lowest = torch.sort(pred_prob[r, :lengths[r]], stable=True).indices[:counts[r][i]]
                mask[r] = False
                mask[r, lowest] = True
            elif strategy == "random":
                mask[r, orders[r][i]] = True
            masks[i, r] = mask[r]

        tokens[:, 1:width + 1] = torch.where(is_word, torch.where(mask, MASK_ID, words.clamp(min=0)),
                                             tokens[:, 1:width + 1])
        out = model.bert(input_ids=tokens, visual_feats=image, visual_pos=visual_pos,
                         attention_mask=attention_mask, return_dict=True).language_output
        logits = model.cls.predictions(out[:, 1:width + 1])
        logits[..., special] = float("-inf")
        pred_prob, pred_id = torch.softmax(logits, dim=-1).max(dim=-1)

        for r in live:
            update = torch.zeros(width, dtype=torch.bool, device=device)
            if strategy == "mask_predict":
                update = mask[r].clone()
            elif strategy == "confidence":
                open_ = ~visited[r]
                if bool(open_.any()):
                    best = pred_prob[r].masked_fill(~open_, -10000).argmax()
                    update[best] = True
            else:  # tlbr, random
                update[orders[r][i]] = True
            visited[r] |= update
            mask[r] &= ~update
            words[r] = torch.where(update, pred_id[r], words[r])
            probs[r, :lengths[r]] = pred_prob[r, :lengths[r]].float()
    pad = ~is_word
    return CaptionResult(ids=words.masked_fill(pad, 0), probs=probs.masked_fill(pad, 0.0),
                         masks=masks, lengths=torch.tensor(lengths, device=device))

