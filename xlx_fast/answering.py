"""``xlx_fast.answer``: the fast forward of the answer tasks (VQA, GQA, NLVR2).

``answer(model, input_ids, features=...)`` gives the logits of
``xlx_fast.models.XLxmertForQuestionAnswering`` that the eager reference
(``xlx_fast.reference.answer.answer_logits``) gives, plus the top answers. Per call it does the
reference's arithmetic minus the work that cannot change the logits; each saving is exact
algebra (equal in exact arithmetic; in floating point the GEMMs of other shapes round
differently, within the SPEC §4 bound):

- the attentions run through the fused op (``optimize`` is applied to the model, idempotently)
  and every linear with its epilogue through ``ops.fused_linear`` (the step plan's layers:
  ``step_plan.language``, ``layer``, ``x_layer``); each cross layer's [Q; K; V] is one GEMM
  over both streams' rows;
- trailing padding is cut: the columns where every row's ``attention_mask`` is 0 are dropped
  before the forward. A padded key's softmax weight is exactly 0 (its score is shifted by
  ``finfo.min``, whose exponential underflows to 0), so it adds nothing to any attention; a
  padded query's row only feeds padded positions, and the pooler reads position 0. (When a row
  has no token at all, HF averages over every key, padded ones included: then nothing is cut.)
  A 9-token question in a 20-token batch of 8 runs its language stream on 9 rows, not 20 (at
  batch 1 on a CPU on 16: a GEMM of 5 to 15 rows is slower there than one of 16,
  ``ops._common.cpu_gemm_rows``; not for a frozen model, whose packed GEMMs are faster on 9);
- NLVR2: each sentence's language layers run once and their output is repeated for its two
  images (the reference runs the repeated sentence once per image: this is half its language
  work);
- ``visual_pos`` is the same for every row: ``LN(box_fc(pos))`` is computed once per call, on
  64 rows, and broadcast; ``LN(visn_fc(features))`` is one fused op;
- the last cross layer's visual half is never computed (only the language stream reaches the
  pooler), and of its language half only what position 0 needs after the cross-attention
  sublayer: the self-attention's query, output projection, LayerNorm and FFN run on the [CLS]
  row alone (its keys and values still come from every position);
- the pooler is HF's own module on that one row; the answer head's Linear + GeLU + LayerNorm is
  one fused op where the fused LayerNorm spans the width (``fused_linear.MAX_LAYERNORM_WIDTH``;
  at the base size the head is 1,536 wide, so there it is Linear + GELU fused, then LayerNorm);
- the top-k is ``torch.topk`` on the device, over the logits (the scores are monotone in
  them); only the k ids per row go to the host, for the answer strings.

Cluster-id input is looked up in the model's codebook (``vis_emb``) and takes the feature
path. (The generation loop's projected codebook, ``LN(visn_fc(C))`` built once, is not used:
building it is a [K, F] x [F, H] GEMM, K / 64 (156 at K = 10,000) single-image forwards' worth
of ``visn_fc``, and a cached one would need the step plan's staleness check on this model's
weights.)

Weights are read from the modules on every call, nothing derived is cached, so an edit of any
weight is seen by the next call.

What the savings are worth depends on the batch. At batch 1 on a CPU the forward streams every
weight (730 MB in fp32 at the base size) from memory once, and a GEMM of 8 rows costs what one
of 20 rows costs: there the savings count in bytes (the cross-attention projections read once
for both streams instead of twice, the last layer's visual half not read), about 8%, and cutting
the padding saves little. At batch 8 the GEMMs are compute-bound and the savings count in
FLOPs (padding, the last layer: 12-15% of the GEMM work; for NLVR2 half the language stream).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.lxmert import modeling_lxmert

from . import step_plan
from .ops._common import cpu_gemm_rows
from .grid import N_CELLS, box_positions
from .models.answering import XLxmertForQuestionAnswering
from .ops.fused_linear import MAX_LAYERNORM_WIDTH, fused_linear, linear_gelu, linear_gelu_layernorm
from .ops import frozen_weights
from .ops.frozen_weights import linear
from .patching import ensure_optimized
from .sampler_io import default_pad_id

__all__ = ["AnswerResult", "answer", "DEFAULT_TOP_K"]

DEFAULT_TOP_K = 5  # answers returned per row when top_k is not given (at most the head's count)


@dataclass
class AnswerResult:
    """What :func:`answer` returns (fresh tensors on the model's device).

    logits:     [B, n_answers] float32, the answer head's output
    top_ids:    [B, k] int64, the k highest logits' indices, best first
    top_scores: [B, k] float32, their scores: sigmoid of the logit for VQA and GQA (trained
                with binary cross-entropy over soft scores), softmax over the classes for NLVR2
    answers:    B lists of k strings, ``model.labels`` of ``top_ids``
    """

    logits: torch.Tensor
    top_ids: torch.Tensor
    top_scores: torch.Tensor
    answers: list


# -- checks ------------------------------------------------------------------------------------

def _check_model(model) -> torch.device:
    if not isinstance(model, XLxmertForQuestionAnswering):
        raise TypeError(f"model must be an XLxmertForQuestionAnswering, got {type(model).__name__}")
    if model.training:
        raise ValueError("answer() runs inference only: call model.eval() first")
    weight = model.bert.embeddings.word_embeddings.weight
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"model must be float32, bfloat16 or float16 (the fused ops' dtypes), got "
                        f"{weight.dtype}")
    return weight.device


def _check_question(model, input_ids, attention_mask, device):
    """``input_ids`` [B, L] and ``attention_mask`` (default ``input_ids != pad``); returns the
    mask as bool."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length], got shape "
                         f"{tuple(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    length, vocab = input_ids.shape[1], model.config.vocab_size
    if length > model.config.max_position_embeddings:
        raise ValueError(f"input_ids length {length} exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    lo, hi = torch.aminmax(input_ids)
    if lo.item() < 0 or hi.item() >= vocab:
        raise ValueError(f"input_ids out of range: values must lie in [0, {vocab}), got "
                         f"[{lo.item()}, {hi.item()}]")
    if attention_mask is None:
        return input_ids != default_pad_id(model)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool, integer or floating, got {attention_mask.dtype}")
    binary = (attention_mask == 0) | (attention_mask == 1)
    if not bool(binary.all()):
        bad = attention_mask[~binary].unique()[:5].tolist()
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token), got values {bad}")
    return attention_mask != 0


def _images_layout(model, b: int, trailing: str) -> str:
    images = model.task.images
    return f"[{b}, {images}, {N_CELLS}{trailing}]" if images > 1 else f"[{b}, {N_CELLS}{trailing}]"


def _check_image_shape(model, name, t, b, trailing_dims, trailing_text):
    """``t`` is [B, 64, ...] (NLVR2: [B, 2, 64, ...]) with ``trailing_dims`` after the cells."""
    images = model.task.images
    want = (b, images, N_CELLS, *trailing_dims) if images > 1 else (b, N_CELLS, *trailing_dims)
    if tuple(t.shape) == want:
        return
    layout = _images_layout(model, b, trailing_text)
    hint = ""
    if images > 1 and t.dim() == len(want) - 1:
        hint = f" (nlvr2 takes two images per example: stack them as {layout})"
    elif images == 1 and t.dim() == len(want) + 1:
        hint = f" ({model.task.name} takes one image per example)"
    raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}{hint}")


def _check_visual(model, features, cluster_ids, b: int, device) -> torch.Tensor:
    """The visual input as features [B·images, 64, F] in the model's dtype."""
    if (features is None) == (cluster_ids is None):
        raise ValueError("give exactly one of features and cluster_ids")
    dtype = model.bert.embeddings.word_embeddings.weight.dtype
    if features is not None:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if not features.is_floating_point():
            raise TypeError(f"features must be a floating-point tensor, got {features.dtype}")
        _check_image_shape(model, "features", features, b, (model.feat_dim,), f", {model.feat_dim}")
        if features.device != device:
            raise ValueError(f"features is on {features.device} but the model is on {device}")
        feats = features.to(dtype)
    else:
        if not isinstance(cluster_ids, torch.Tensor):
            raise TypeError(f"cluster_ids must be a torch.Tensor, got {type(cluster_ids).__name__}")
        if cluster_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"cluster_ids must be an integer tensor (int64, int32), got "
                            f"{cluster_ids.dtype}")
        if model.vis_emb is None:
            raise ValueError("cluster_ids need a codebook, and this model has none (vis_emb): "
                             "pass features, or give the model its centroids "
                             "(set_visual_embedding, or centroids_path when loading)")
        _check_image_shape(model, "cluster_ids", cluster_ids, b, (), "")
        if cluster_ids.device != device:
            raise ValueError(f"cluster_ids is on {cluster_ids.device} but the model is on {device}")
        k = model.n_clusters
        lo, hi = torch.aminmax(cluster_ids)
        if lo.item() < 0 or hi.item() >= k:
            raise ValueError(f"cluster_ids out of range: values must lie in [0, {k}) (the "
                             f"codebook's size), got [{lo.item()}, {hi.item()}]")
        feats = F.embedding(cluster_ids.long(), model.vis_emb.weight).to(dtype)
    return feats.reshape(-1, N_CELLS, model.feat_dim).contiguous()


def _check_top_k(model, top_k) -> int:
    n = model.n_answers
    if top_k is None:
        return min(DEFAULT_TOP_K, n)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k must lie in [1, {n}] (the head's answers), got {top_k}")
    return top_k


# -- the forward ------------------------------------------------------------------------------

def _kept_length(mask: torch.Tensor) -> int:
    """The columns to keep: up to the last one any row attends to; all of them when some row
    attends to nothing (HF then averages over every key, padded ones included)."""
    length = mask.shape[1]
    columns = mask.any(dim=0)
    last = torch.where(columns, torch.arange(1, length + 1, device=mask.device), 0).max()
    keep = torch.where(mask.any(dim=1).all(), last, length)
    return int(keep.item())


def _visual_input(model, feats: torch.Tensor) -> torch.Tensor:
    """``LxmertVisualFeatureEncoder``: ``(LN(visn_fc(feats)) + LN(box_fc(pos))) / 2``, the box
    half computed once for the 64 cells."""
    enc = model.bert.encoder.visn_fc
    x = fused_linear(feats, enc.visn_fc.weight, enc.visn_fc.bias, ln_weight=enc.visn_layer_norm.weight,
                     ln_bias=enc.visn_layer_norm.bias, eps=enc.visn_layer_norm.eps)
    box = enc.box_layer_norm(enc.box_fc(box_positions(dtype=feats.dtype, device=feats.device)))
    return (x + box) / 2


def _erf_gelu(module) -> bool:
    """Whether ``module`` is HF's GELU with torch's erf formula (what the fused op computes)."""
    if type(module) is modeling_lxmert.GeLU:
        act = modeling_lxmert.gelu
        return getattr(act, "act", None) is F.gelu
    return type(module) is nn.GELU and module.approximate == "none"


def _head(head, pooled: torch.Tensor) -> torch.Tensor:
    """``AnswerHead``: Linear, GeLU, LayerNorm, Linear, with the first three fused."""
    lin, act, norm, out = head.logit_fc
    if not (_erf_gelu(act) and type(norm) is nn.LayerNorm and norm.elementwise_affine
            and norm.bias is not None):
        return head(pooled)  # a head someone changed: its own modules, correct and slower
    if lin.out_features <= MAX_LAYERNORM_WIDTH:
        h = linear_gelu_layernorm(pooled, lin.weight, lin.bias, norm.weight, norm.bias, norm.eps)
    else:
        h = F.layer_norm(linear_gelu(pooled, lin.weight, lin.bias), norm.normalized_shape,
                         norm.weight, norm.bias, norm.eps)
    return linear(h, out.weight, out.bias)


def _logits(model, input_ids, mask, feats) -> torch.Tensor:
    images = model.task.images
    length = _kept_length(mask)
    # at batch 1 on a CPU keep 16 columns where there are: a GEMM of fewer rows is slower there
    # (ops._common.cpu_gemm_rows); the extra columns are padding, masked, changing nothing
    b = input_ids.shape[0]
    packed = frozen_weights.is_frozen(model)
    length = min(mask.shape[1], max(length, cpu_gemm_rows(b * length, mask.device, packed) // b))
    input_ids, mask = input_ids[:, :length], mask[:, :length]
    # no padded key left (a lone question, or a batch of one length): HF's mask adds 0.0 to
    # every score, which changes none, so the attentions take none (no bias to build and add)
    ext = None if bool(mask.all()) else step_plan.extended_mask(model, mask)
    lang = step_plan.language(model, input_ids, ext)
    if images > 1:  # one sentence per image, [s0, s0, s1, s1, ...]: its layers ran once
        lang = lang.repeat_interleave(images, dim=0)
        ext = None if ext is None else ext.repeat_interleave(images, dim=0)
    visual = _visual_input(model, feats)
    enc = model.bert.encoder
    for layer in enc.r_layers:
        visual = step_plan.layer(layer, visual, None)
    for x_layer in enc.x_layers[:-1]:
        lang, visual = step_plan.x_layer(x_layer, lang, ext, visual)
    first = step_plan.language_first_row(enc.x_layers[-1], lang, ext, visual)
    pooled = model.bert.pooler(first)
    return _head(model.answer_head, pooled.reshape(-1, images * model.config.hidden_size))


@torch.no_grad()
def answer(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
           features: torch.Tensor | None = None, cluster_ids: torch.Tensor | None = None,
           top_k: int | None = None) -> AnswerResult:
    """Answer questions about images, fast; the logits of ``reference.answer.answer_logits``.

    Args:
        model: ``XLxmertForQuestionAnswering`` in eval mode (any float dtype, CPU or CUDA).
            ``optimize(model)`` is applied (idempotent), which changes the model in place: keep
            a ``copy.deepcopy`` for the reference.
        input_ids: [B, L] int64/int32 question token ids; ``attention_mask`` [B, L] (bool or
            0/1) defaults to ``input_ids != pad`` (``model.config.pad_token_id``, else 0).
        features: [B, 64, F] grid features (F = ``model.feat_dim``; NLVR2: [B, 2, 64, F], two
            images per example), any float dtype (computed in the model's dtype); or
        cluster_ids: [B, 64] (NLVR2: [B, 2, 64]) integer ids into the model's codebook
            (``vis_emb``), in [0, K).
        top_k: answers per row, in [1, n_answers]; default ``min(5, n_answers)``.

    Returns:
        :class:`AnswerResult`.

    Raises ``TypeError``/``ValueError`` naming the argument for bad input (see the checks), and
    ``ValueError`` naming the rows whose logits are not finite (NaN or Inf in their features or
    in the weights) rather than rank meaningless numbers.
    """
    device = _check_model(model)
    mask = _check_question(model, input_ids, attention_mask, device)
    feats = _check_visual(model, features, cluster_ids, input_ids.shape[0], device)
    k = _check_top_k(model, top_k)
    ensure_optimized(model)
    logits = _logits(model, input_ids, mask, feats).float()
    top_logits, top_ids = torch.topk(logits, k, dim=1)
    if model.task.loss == "ce":
        top_scores = torch.softmax(logits, dim=1).gather(1, top_ids)
    else:
        top_scores = torch.sigmoid(top_logits)
    finite = torch.isfinite(logits).all(dim=1)
    ids_host, finite_host = top_ids.cpu(), finite.cpu()  # the one copy to the host
    if not bool(finite_host.all()):
        rows = (~finite_host).nonzero().flatten().tolist()
        raise ValueError(f"row(s) {rows[:10]}: the logits are not finite (NaN or Inf in the "
                         "features or the model's weights)")
    labels = model.labels
    answers = [[labels[i] for i in row] for row in ids_host.tolist()]
    return AnswerResult(logits=logits, top_ids=top_ids, top_scores=top_scores, answers=answers)
