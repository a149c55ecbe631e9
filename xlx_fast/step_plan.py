"""The step plan: the forward of one sampling step, below both ``generate`` and the engine.

What a sampling step computes, given the captions' language stream and the current visual
input, written once for every loop that drives it (``xlx_fast.generate`` and
``xlx_fast.engine.Engine`` today; the bulk, serving and benchmark code reach it through them):

- :func:`prepare` -- the per-model tables (projected codebook, projected mask feature, box
  embedding, folded head), cached on the model and rebuilt on any change of a weight they
  derive from;
- :func:`extended_mask` and :func:`language` -- the part of the forward no step changes (the
  9 language layers), run once per caption;
- :func:`vision` -- the relational and cross layers on one step's visual input, with the last
  cross layer's language half skipped (:func:`visual_half`).

Each is exact algebra on the reference's modules (SPEC §2); the tests compare each one with the
HF stream it replaces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import torch.nn.functional as F
from transformers.activations import GELUActivation
from transformers.models.lxmert.modeling_lxmert import LxmertAttention

from .grid import box_positions
from .model_tables import Sources, record, unchanged
from .ops.codebook_head import fold_head
from .ops.fused_linear import feed_forward, linear_add_layernorm, linear_gelu_layernorm
from .ops.frozen_weights import linear
from . import patching
from .patching import FusedLxmertAttention

__all__ = ["FastTables", "prepare", "extended_mask", "language", "layer", "x_layer", "visual_half",
           "language_half", "language_first_row", "vision", "head_transform", "prediction_transform"]


@dataclass
class FastTables:
    """What the loop precomputes once per model (all in the model's dtype and device).

    table:       [K, H]  LN(visn_fc(C)) / 2          the projected codebook
    mask_row:    [H]     LN(visn_fc(mask_feat)) / 2  the projected mask feature
    box:         [n, H]  LN(box_fc(visual_pos)) / 2  the constant box embedding of the model's
                                                     n = N² cells (``box_positions(model.grid)``)
    head_weight: [K, H], head_bias [K]               linear_feat → out_cluster, folded
    """

    table: torch.Tensor
    mask_row: torch.Tensor
    box: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    sources: Sources


def _sources(model):
    """The parameters the tables derive from, each once (out_cluster.weight is tied to the
    codebook in the authors' model: one snapshot serves both)."""
    enc = model.bert.encoder.visn_fc
    head = model.obj_predict_head
    seen, out = set(), []
    for p in _source_list(model, enc, head):
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _source_list(model, enc, head):
    return [model.vis_emb.weight, model.mask_feat, enc.visn_fc.weight, enc.visn_fc.bias,
            enc.visn_layer_norm.weight, enc.visn_layer_norm.bias, enc.box_fc.weight, enc.box_fc.bias,
            enc.box_layer_norm.weight, enc.box_layer_norm.bias, head.linear_feat.weight,
            head.linear_feat.bias, head.out_cluster.weight, head.out_cluster.bias]


@torch.no_grad()
def prepare(model) -> FastTables:
    """The model's :class:`FastTables`, built on first use and cached on the model.

    Never stale: each call checks the sources (codebook, mask feature, visn_fc, box_fc and
    their layer norms, linear_feat, out_cluster) against what the tables were built from, bit
    for bit unless the model is frozen (:mod:`xlx_fast.model_tables`), and rebuilds on any
    difference (0.5 s at the base size on a 2-core CPU).
    """
    cached = getattr(model, "_xlx_fast_tables", None)
    sources = _sources(model)
    if cached is not None and unchanged(cached.sources, model, sources):
        return cached
    rec = record(model, sources)
    enc = model.bert.encoder.visn_fc
    dtype, device = model.centroids.dtype, model.centroids.device

    def project(feats):  # the reference's visual branch, on codebook rows instead of cells
        return enc.visn_layer_norm(enc.visn_fc(feats)) / 2

    table = project(model.centroids)
    mask_row = project(model.mask_feat.to(dtype).view(1, -1)).view(-1)
    box = enc.box_layer_norm(enc.box_fc(box_positions(model.grid, dtype, device))) / 2
    w, b = fold_head(model.obj_predict_head.linear_feat, model.obj_predict_head.out_cluster)
    tables = FastTables(table.contiguous(), mask_row.contiguous(), box.contiguous(),
                        w.contiguous(), b.float().contiguous(), rec)
    model._xlx_fast_tables = tables
    return tables


def extended_mask(model, attention_mask):
    """HF's additive key mask [B, 1, 1, L], exactly as ``LxmertModel.forward`` builds it."""
    dtype = model.bert.dtype
    ext = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - ext) * torch.finfo(dtype).min


def language(model, input_ids, ext_mask):
    """Embeddings and the language layers: the part of the forward no step changes."""
    lang = model.bert.embeddings(input_ids, torch.zeros_like(input_ids))
    for layer in model.bert.encoder.layer:
        lang = _layer(layer, lang, ext_mask)
    return lang


# -- the step's layers, on the model's own parameters -------------------------------------------
#
# Each function below is the forward of one HF module (named in its docstring) for inference,
# with its linears and their epilogues fused (``ops.fused_linear``: dense + bias + GELU, or
# dense + bias + residual + LayerNorm, one op each) and its attention through the fused op.
# Weights are read from the modules on every call, never copied: the attentions' fused QKV
# matrices are the storage of their projections (``patching``), so an edit of any weight by any
# route is seen. Dropout is the identity (inference only). On a CPU the torch backend of
# ``fused_linear`` is HF's arithmetic bit for bit; the attention is SDPA.


def _fused(att) -> bool:
    return type(att) is FusedLxmertAttention


def _attention(att, x, mask):
    """``LxmertAttention`` over x attending to itself: one GEMM against [W_q; W_k; W_v]. Any
    other BERT-style self-attention (HF ``BertSelfAttention``, X-UNITER's layers: ``query``,
    ``key``, ``value``, ``num_attention_heads``, scores scaled by head_dim^-1/2, additive key
    mask) runs its three projections into the fused op."""
    if not _fused(att):
        if isinstance(att, LxmertAttention):
            return att(x, x, mask)[0]
        q, k, v = (linear(x, p.weight, p.bias) for p in (att.query, att.key, att.value))
        return patching.fused_attention(q, k, v, mask, att.num_attention_heads)
    w, b = att._fused_weights()
    q, k, v = linear(x, w, b).split(att.head_size, dim=-1)
    return patching.fused_attention(q, k, v, mask, att.num_attention_heads)


def _cross_attention(att, x, context, mask):
    """``LxmertAttention`` with queries from x, keys and values from context."""
    if not _fused(att):
        return att(x, context, mask)[0]
    w, b = att._fused_weights()
    width = att.head_size
    q = linear(x, w[:width], b[:width])
    k, v = linear(context, w[width:], b[width:]).split(width, dim=-1)
    return patching.fused_attention(q, k, v, mask, att.num_attention_heads)


def _add_norm(out, x, residual):
    """``LxmertAttentionOutput`` / ``LxmertOutput``: LayerNorm(dense(x) + residual)."""
    return linear_add_layernorm(x, out.dense.weight, out.dense.bias, residual, out.LayerNorm.weight,
                                out.LayerNorm.bias, out.LayerNorm.eps)


def _ffn(inter, out, x):
    """``LxmertIntermediate`` then ``LxmertOutput``."""
    act = inter.intermediate_act_fn
    if not isinstance(act, GELUActivation) or act.act is not F.gelu:  # HF's module: correct, slower
        return _add_norm(out, inter(x), x)
    return feed_forward(x, inter.dense.weight, inter.dense.bias, out.dense.weight, out.dense.bias,
                        out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps)


def _self_layer(sa, x, mask):
    """``LxmertSelfAttentionLayer``."""
    return _add_norm(sa.output, _attention(sa.self, x, mask), x)


def _layer(layer, x, mask):
    """``LxmertLayer`` (a language or relational layer), or HF's ``BertLayer`` (same module
    names: ``attention.self``, ``attention.output``, ``intermediate``, ``output``)."""
    x = _self_layer(layer.attention, x, mask)
    return _ffn(layer.intermediate, layer.output, x)


def _x_layer(xl, lang, ext_mask, visual):
    """``LxmertXLayer``: both streams. Its one cross-attention module serves both directions, so
    both streams' [Q; K; V] are one GEMM over their rows side by side (each stream's queries for
    its own attention, its keys and values for the other's): one GEMM of Lt + Lv rows runs
    faster than two of Lt and Lv (about 15% on a CPU at 20 + 64 rows)."""
    att, out = xl.visual_attention.att, xl.visual_attention.output
    if _fused(att) and att.query.in_features == att.key.in_features:
        w, b = att._fused_weights()
        qkv = linear(torch.cat((lang, visual), dim=1), w, b)
        n_lang = lang.shape[1]
        lq, lk, lv = qkv[:, :n_lang].split(att.head_size, dim=-1)
        vq, vk, vv = qkv[:, n_lang:].split(att.head_size, dim=-1)
        heads = att.num_attention_heads
        lang_ctx = patching.fused_attention(lq, vk, vv, None, heads)
        visual_ctx = patching.fused_attention(vq, lk, lv, ext_mask, heads)
    else:
        lang_ctx, visual_ctx = att(lang, visual, None)[0], att(visual, lang, ext_mask)[0]
    lang = _self_layer(xl.lang_self_att, _add_norm(out, lang_ctx, lang), ext_mask)
    visual = _self_layer(xl.visn_self_att, _add_norm(out, visual_ctx, visual), None)
    return _ffn(xl.lang_inter, xl.lang_output, lang), _ffn(xl.visn_inter, xl.visn_output, visual)


def language_half(x_layer, lang, ext_mask, visual):
    """``LxmertXLayer.forward`` restricted to its language output (the last cross layer when
    only the language stream is read: the pooled output of the answer tasks, the masked-LM
    head of captioning): the visual stream's half is never computed."""
    cross = x_layer.visual_attention
    lang = _add_norm(cross.output, _cross_attention(cross.att, lang, visual, None), lang)
    lang = _self_layer(x_layer.lang_self_att, lang, ext_mask)
    return _ffn(x_layer.lang_inter, x_layer.lang_output, lang)


def language_first_row(x_layer, lang, ext_mask, visual):
    """``LxmertXLayer.forward``'s language output at position 0 only, [B, 1, H] (the last cross
    layer, whose [CLS] row is all the pooler reads): the language cross-attention sublayer on
    every position (each one is a key and value of the self-attention after it), then the
    self-attention with the [CLS] query only, its output projection, LayerNorm and FFN on that
    one row. The visual half is never computed."""
    cross = x_layer.visual_attention
    lang = _add_norm(cross.output, _cross_attention(cross.att, lang, visual, None), lang)
    sa, first = x_layer.lang_self_att, lang[:, :1]
    first = _add_norm(sa.output, _cross_attention(sa.self, first, lang, ext_mask), first)
    return _ffn(x_layer.lang_inter, x_layer.lang_output, first)


# the layer functions under public names, for the other tasks' plans (answer, caption)
layer = _layer
x_layer = _x_layer


def visual_half(x_layer, lang, ext_mask, visual):
    """``LxmertXLayer.forward`` restricted to its visual output (the last cross layer): the
    language stream's half is never computed."""
    cross = x_layer.visual_attention
    visual = _add_norm(cross.output, _cross_attention(cross.att, visual, lang, ext_mask), visual)
    visual = _self_layer(x_layer.visn_self_att, visual, None)
    return _ffn(x_layer.visn_inter, x_layer.visn_output, visual)


def vision(model, lang, ext_mask, visual):
    """Relational and cross layers on one step's visual input; the vision output."""
    enc = model.bert.encoder
    for layer in enc.r_layers:
        visual = _layer(layer, visual, None)
    for x_layer in enc.x_layers[:-1]:
        lang, visual = _x_layer(x_layer, lang, ext_mask, visual)
    return visual_half(enc.x_layers[-1], lang, ext_mask, visual)


def prediction_transform(t, x):
    """An ``LxmertPredictionHeadTransform`` (dense, GELU, LayerNorm) as one fused op (HF's
    module itself when its activation is not the erf GELU)."""
    if not isinstance(t.transform_act_fn, GELUActivation) or t.transform_act_fn.act is not F.gelu:
        return t(x)
    return linear_gelu_layernorm(x, t.dense.weight, t.dense.bias, t.LayerNorm.weight,
                                 t.LayerNorm.bias, t.LayerNorm.eps)


def head_transform(model, visual):
    """The object head's transform: the features the folded codebook head scores."""
    return prediction_transform(model.obj_predict_head.transform, visual)
