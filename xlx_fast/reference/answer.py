"""The answer tasks' forward (VQA, GQA, NLVR2), as the authors' fine-tuning models run it.

``logits = answer_head(pooled)``, ``pooled = bert(input_ids, visual_feats, visual_pos,
attention_mask).pooled_output`` (``tanh(dense(language_output[:, 0]))``), with ``visual_pos``
the grid's boxes and ``visual_feats`` the features, or ``vis_emb(cluster_ids)`` for cluster-id
input. NLVR2 views its two images per example as ``[B·2, 64, F]`` with each sentence repeated
(``[s0, s0, s1, s1, ...]``) and classifies the two pooled outputs side by side, ``[B, 2H]``.

Plain eager HF modules: everything the fast ``xlx_fast.answer`` computes is checked against
this.
"""
from __future__ import annotations

import torch

from .grid import box_positions


def visual_input(model, features=None, cluster_ids=None) -> torch.Tensor:
    """The grid features ``[B·images, cells, F]``: ``features`` as given (``[B, cells, F]``,
    NLVR2 ``[B, 2, cells, F]``) or ``vis_emb(cluster_ids)``."""
    if (features is None) == (cluster_ids is None):
        raise ValueError("give exactly one of features and cluster_ids")
    if features is None:
        if model.vis_emb is None:
            raise ValueError("this model has no codebook (vis_emb) to look cluster ids up in")
        features = model.vis_emb(cluster_ids)
    return features.reshape(-1, *features.shape[-2:])


def answer_logits(model, input_ids, attention_mask, features=None, cluster_ids=None) -> torch.Tensor:
    """``[B, answers]`` logits of ``XLxmertForQuestionAnswering`` ``model`` (eval mode) for
    questions ``input_ids`` ``[B, L]`` about ``features`` or ``cluster_ids``."""
    feats = visual_input(model, features, cluster_ids)
    images = model.task.images
    if images > 1:  # one sentence per image: [s0, s0, s1, s1, ...]
        input_ids = input_ids.repeat_interleave(images, dim=0)
        attention_mask = attention_mask.repeat_interleave(images, dim=0)
    pos = box_positions(int(round(feats.shape[1] ** 0.5)), feats.dtype, feats.device)
    out = model.bert(input_ids=input_ids, visual_feats=feats,
                     visual_pos=pos.expand(feats.shape[0], -1, -1),
                     attention_mask=attention_mask, return_dict=True)
    pooled = out.pooled_output.reshape(-1, images * model.config.hidden_size)
    return model.answer_head(pooled)
