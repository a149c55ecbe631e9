"""The X-UNITER step plan: one sampling step's forward on the single-stream model, exact algebra
on :class:`xlx_fast.models.XUniterForImageGeneration`'s modules (what
:mod:`xlx_fast.reference.xuniter` runs eagerly).

The image embedding of a cell holding feature f (a centroid C[k] or ``mask_feat``) is
``LN_s((LN_img(img_linear(f)) + LN_pos(pos_linear(box7))) + t)`` (UNITER's order of the sum; t
the token-type-1 embedding). ``f`` only ever is a codebook row or the mask feature, so
``LN_img(img_linear(·))`` is applied once per model to the whole codebook (:attr:`XUniterTables.
table`, [K, H]) and to ``mask_feat`` (``mask_row``), and the sampler step gathers from that
table: a row per cell instead of an F→H GEMM per cell per step. ``LN_pos(pos_linear(box7))`` is
constant (``pos``, [n, H]). What stays per step is the two adds, in the reference's order, and
the shared LayerNorm (:func:`image_embeddings`). Up to the rounding of GEMMs of other shapes,
nothing changes.

Then the BERT layers through :func:`xlx_fast.step_plan.layer` (fused linears, fused attention)
over [text; image] with the key mask [caption; ones], the head's transform
(``step_plan.head_transform``) and the folded ``linear_feat → out_cluster``
(``ops.codebook_head.fold_head``) for ``codebook_head``.

The caption's text embeddings (BERT's word + position + type 0, LayerNorm) never change in a
request: they are computed when it joins (:func:`text_embeddings`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model_tables import Sources, record, unchanged
from .models.xuniter import box7
from .ops.codebook_head import fold_head
from .step_plan import layer

__all__ = ["XUniterTables", "prepare", "text_embeddings", "image_embeddings", "encoder"]


@dataclass
class XUniterTables:
    """Per-model tables (model dtype and device).

    table:       [K, H]  LN_img(img_linear(C))          the projected codebook
    mask_row:    [H]     LN_img(img_linear(mask_feat))  the projected mask feature
    pos:         [n, H]  LN_pos(pos_linear(box7))       the cells' constant box embedding
    type_row:    [H]     token type 1's embedding
    head_weight: [K, H], head_bias [K]                  linear_feat → out_cluster, folded
    """

    table: torch.Tensor
    mask_row: torch.Tensor
    pos: torch.Tensor
    type_row: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    sources: Sources


def _sources(model) -> list:
    emb, head = model.img_embeddings, model.obj_predict_head
    seen, out = set(), []
    for p in (model.vis_emb.weight, model.mask_feat, emb.img_linear.weight, emb.img_linear.bias,
              emb.img_layer_norm.weight, emb.img_layer_norm.bias, emb.pos_linear.weight,
              emb.pos_linear.bias, emb.pos_layer_norm.weight, emb.pos_layer_norm.bias,
              model.bert.embeddings.token_type_embeddings.weight, head.linear_feat.weight,
              head.linear_feat.bias, head.out_cluster.weight, head.out_cluster.bias):
        if id(p) not in seen:  # out_cluster.weight is the codebook (tied)
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def prepare(model) -> XUniterTables:
    """The model's :class:`XUniterTables`, cached on the model and rebuilt when any weight they
    derive from changed (:mod:`xlx_fast.model_tables`, as ``step_plan.prepare``)."""
    cached = getattr(model, "_xlx_xuniter_tables", None)
    sources = _sources(model)
    if cached is not None and unchanged(cached.sources, model, sources):
        return cached
    rec = record(model, sources)
    emb = model.img_embeddings
    dtype, device = model.centroids.dtype, model.centroids.device
    table = emb.img_layer_norm(emb.img_linear(model.centroids))
    mask_row = emb.img_layer_norm(emb.img_linear(model.mask_feat.to(dtype).view(1, -1))).view(-1)
    pos = emb.pos_layer_norm(emb.pos_linear(box7(model.grid, dtype, device)[0]))
    type_row = model.bert.embeddings.token_type_embeddings.weight[1]
    w, b = fold_head(model.obj_predict_head.linear_feat, model.obj_predict_head.out_cluster)
    tables = XUniterTables(table.contiguous(), mask_row.contiguous(), pos.contiguous(),
                           type_row.clone().contiguous(), w.contiguous(), b.float().contiguous(), rec)
    model._xlx_xuniter_tables = tables
    return tables


def text_embeddings(model, input_ids: torch.Tensor) -> torch.Tensor:
    """BERT's embedding of the captions (type 0), [B, L, H]: constant for a request."""
    return model.bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))


def image_embeddings(model, out: torch.Tensor, pos: torch.Tensor, type_row: torch.Tensor):
    """The cells' image embedding from the gathered ``out`` [B, n, H] (rows of ``table`` or
    ``mask_row``): the shared LayerNorm of ``(out + pos) + type_row``."""
    ln = model.img_embeddings.LayerNorm
    return F.layer_norm((out + pos) + type_row, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def encoder(model, x: torch.Tensor, ext_mask: torch.Tensor) -> torch.Tensor:
    """The BERT layers over [text; image] ``x`` with the additive key mask [B, 1, 1, L]."""
    for bert_layer in model.bert.encoder.layer:
        x = layer(bert_layer, x, ext_mask)
    return x
