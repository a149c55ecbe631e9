"""The caption engine: images in, captions out, on the step-level slot engine.

:class:`CaptionEngine` is :class:`xlx_fast.step_engine.StepEngine` (slots, admission between
steps, batch buckets, CUDA graphs, per-row schedules, strategies, temperatures and seeds: see
there) with the hooks of captioning (:mod:`xlx_fast.reference.caption` is what it must equal):

- a request is an image on the model's grid (n = ``model.n_cells`` cluster ids, or features
  [n, F]: 64 on the 8×8 grid), a caption length L (words) and the sampling parameters; its
  schedule runs over its L words, which are the sampler's cells 0..L-1 (word i sits at text
  position i + 1, after ``[CLS]``); a row has ``WORD_CELLS`` (64) such cells whatever the
  image's grid;
- joining runs the image stream (visual encoder and relational layers,
  ``caption_plan.image_stream``) for the joiners only: it never sees the caption;
- a step embeds the caption, runs the language and cross layers (``caption_plan.language_step``)
  and scores the words with the masked-LM head through ``codebook_head`` over the word
  embeddings (the decoder is tied to them), special tokens at -inf;
- the sampler step is the image sampler's own op: its table is the word-embedding matrix and
  its mask row the ``[MASK]`` embedding, so the ``out`` it writes is next step's word
  embeddings, gathered once. Cells past a row's length are kept out of every rule: their
  probability reads 2 (above any probability: never among Mask-Predict's lowest) and they are
  marked visited (never ``confidence``'s pick); the schedules never name them.

Weights are read live (the word embeddings, the decoder's bias, the mask row is a view of the
``[MASK]`` embedding): an edit of any weight is seen at the next step. Moving or replacing
parameters needs a new engine, as for :class:`xlx_fast.engine.Engine`.

Memory per slot: the image stream (n x hidden), the caption layout (L_max + 2 tokens), besides
the base's sampler state (``WORD_CELLS`` x hidden) and mask history.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .caption_io import CLS_ID, MASK_ID, MAX_WORDS, PAD_ID, SEP_ID
from .caption_plan import image_stream, language_step, lm_transform, special_ids, text_embeddings, word_bias
from .ops.codebook_head import codebook_head
from .patching import optimize
from .step_engine import Row, StepEngine, check_model
from .step_plan import extended_mask

__all__ = ["CaptionEngine", "CaptionRequest", "CaptionFinished"]

_ABOVE_EVERY_PROB = 2.0  # what a cell past the caption's length reads as its probability
# The sampler's cells of a caption row: its words use the first L (at most MAX_WORDS), the rest
# are kept out of every rule. Word slots, not image cells: independent of the model's grid.
WORD_CELLS = 64


@dataclass
class CaptionRequest:
    """One image to caption: exactly one of ``cluster_ids`` [n] (int) or ``features``
    [n, F], n = the model's ``n_cells`` (its grid's cells); ``length`` words."""

    cluster_ids: torch.Tensor | None = None
    features: torch.Tensor | None = None
    length: int = 12
    seed: int = 0
    steps: int | None = None
    strategy: str = "mask_predict"
    temperature: float = 0.0
    tag: object = None


@dataclass
class CaptionFinished:
    """A finished caption: ``ids`` [L] word ids (-1 for a word no step decided), ``probs`` [L],
    ``masks`` [steps, L], on the host. ``error`` as for :class:`xlx_fast.engine.Finished`."""

    request: CaptionRequest
    ids: torch.Tensor
    probs: torch.Tensor
    masks: torch.Tensor
    cancelled: bool
    error: str | None = None


class CaptionEngine(StepEngine):
    """See the module docstring. ``model``: ``XLxmertForImageGeneration`` with its masked-LM
    head (``pretraining_heads=True``), in eval mode (``optimize``-d in place); ``slots``:
    capacity; ``max_words``: the longest caption (at most ``caption_io.MAX_WORDS``)."""

    request_type = CaptionRequest

    def __init__(self, model, slots: int = 8, *, max_words: int = MAX_WORDS,
                 cuda_graph: bool | None = None, buckets: Sequence[int] | None = None):
        self.device = check_model(model)
        if getattr(model, "cls", None) is None:
            raise ValueError("captioning needs the masked-LM head (cls.predictions): build the "
                             "model with pretraining_heads=True")
        if isinstance(max_words, bool) or not isinstance(max_words, int) or not 1 <= max_words <= MAX_WORDS:
            raise ValueError(f"max_words must be an int in [1, {MAX_WORDS}], got {max_words!r}")
        self.model, self.max_words = model, max_words
        optimize(model)
        self.dtype = model.centroids.dtype
        words = model.bert.embeddings.word_embeddings.weight
        super().__init__(slots, cuda_graph=cuda_graph, buckets=buckets, table=words,
                         mask_row=words[MASK_ID], cells=WORD_CELLS)
        self.image_cells = model.n_cells
        dev, rows, width = self.device, slots + 1, max_words + 2
        hidden = model.config.hidden_size
        self.special = special_ids(dev)
        self.vis = torch.zeros(rows, self.image_cells, hidden, dtype=self.dtype, device=dev)
        self.key_mask = torch.zeros(rows, width, dtype=torch.bool, device=dev)
        self.ext = extended_mask(model, self.key_mask).contiguous()
        self.tokens = torch.zeros(rows, width, dtype=torch.int64, device=dev)   # [CLS] … [SEP] [PAD]
        self.is_word = torch.zeros(rows, width, dtype=torch.bool, device=dev)
        self.word_cell = torch.zeros(rows, WORD_CELLS, dtype=torch.bool, device=dev)
        self.join_feats = torch.zeros(slots, self.image_cells, model.feat_dim, dtype=self.dtype,
                                      device=dev)
        self.join_key = torch.zeros(slots, width, dtype=torch.bool, device=dev)
        self.join_tokens = torch.zeros(slots, width, dtype=torch.int64, device=dev)
        self.join_word = torch.zeros(slots, width, dtype=torch.bool, device=dev)
        self.join_cell = torch.zeros(slots, WORD_CELLS, dtype=torch.bool, device=dev)

    # ---------------------------------------------------------------- the hooks
    def _check_input(self, where: str, r: CaptionRequest):
        n = r.length
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_words:
            raise ValueError(f"{where}.length must be an int in [1, {self.max_words}] words, got {n!r}")
        if (r.cluster_ids is None) == (r.features is None):
            raise ValueError(f"{where} must give exactly one of cluster_ids and features")
        centroids = self.model.centroids
        if r.cluster_ids is not None:
            ids = r.cluster_ids
            if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"{where}.cluster_ids must be an int64 (or int32) tensor")
            if tuple(ids.shape) != (self.image_cells,):
                raise ValueError(f"{where}.cluster_ids must be [{self.image_cells}] (the model's "
                                 f"{self.model.grid}×{self.model.grid} grid), got {tuple(ids.shape)}")
            ids = ids.cpu()
            k = centroids.shape[0]
            if int(ids.min()) < 0 or int(ids.max()) >= k:
                raise ValueError(f"{where}.cluster_ids must lie in [0, {k}), got "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
            return (ids, None, n), n
        f = r.features
        shape = (self.image_cells, centroids.shape[1])
        if not isinstance(f, torch.Tensor) or not f.is_floating_point():
            raise TypeError(f"{where}.features must be a floating-point tensor")
        if tuple(f.shape) != shape:
            raise ValueError(f"{where}.features must be {list(shape)} (the model's "
                             f"{self.model.grid}×{self.model.grid} grid), got {list(f.shape)}")
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"{where}.features contain NaN or inf")
        return (None, f, n), n

    def _stage(self, rows: list[Row]) -> None:
        j, width = len(rows), self.max_words + 2
        key = torch.zeros(j, width, dtype=torch.bool)
        tokens = torch.full((j, width), PAD_ID, dtype=torch.int64)
        cell = torch.zeros(j, WORD_CELLS, dtype=torch.bool)
        feats = []
        for n, row in enumerate(rows):
            ids, f, length = row.data
            key[n, :length + 2] = True
            tokens[n, 0], tokens[n, 1:length + 1], tokens[n, length + 1] = CLS_ID, MASK_ID, SEP_ID
            cell[n, :length] = True
            feats.append(self.model.centroids[ids.to(self.device)] if ids is not None
                         else f.to(self.device, self.dtype))
        word = torch.zeros(j, width, dtype=torch.bool)
        word[:, 1:WORD_CELLS + 1] = cell[:, :width - 1]
        for buf, host in ((self.join_key, key), (self.join_tokens, tokens), (self.join_word, word),
                          (self.join_cell, cell)):
            buf.zero_()
            buf[:j].copy_(host)
        self.join_feats.zero_()
        self.join_feats[:j].copy_(torch.stack(feats))

    def _join_rows(self, j: int, slot: torch.Tensor) -> None:
        """The image stream and the caption layout of the first j joiners, into their slots;
        cells past a caption's length marked visited."""
        self.vis.index_copy_(0, slot, image_stream(self.model, self.join_feats[:j]))
        self.key_mask.index_copy_(0, slot, self.join_key[:j])
        self.ext.index_copy_(0, slot, extended_mask(self.model, self.join_key[:j]))
        self.tokens.index_copy_(0, slot, self.join_tokens[:j])
        self.is_word.index_copy_(0, slot, self.join_word[:j])
        self.word_cell.index_copy_(0, slot, self.join_cell[:j])
        self.state.visited.index_copy_(0, slot, ~self.join_cell[:j])

    def _row_buffers(self):
        return self.vis, self.key_mask, self.ext, self.tokens, self.is_word, self.word_cell

    def _forward(self, b: int, sample: bool):
        model, w = self.model, self.max_words
        words = self.table
        fixed = F.embedding(self.tokens[:b], words)  # [CLS], [SEP], [PAD] (and [MASK] at words)
        # word i is cell i - 1: the sampler's out holds its embedding ([MASK]'s when masked)
        mid = torch.where(self.is_word[:b, 1:w + 1, None], self.state.out[:b, :w], fixed[:, 1:w + 1])
        lang = language_step(model, text_embeddings(model, torch.cat((fixed[:, :1], mid, fixed[:, w + 1:]), 1)),
                             self.ext[:b], self.vis[:b])
        h = lm_transform(model, lang[:, 1:w + 1])
        bias = word_bias(model, self.special)
        if sample:
            prob, pred_id = codebook_head(h, words, bias, temperature=self.temps[:b, :w],
                                          seeds=self.cell_seed[:b, :w], step=0, check_nan=False)
        else:
            prob, pred_id = codebook_head(h, words, bias, check_nan=False)
        prob = F.pad(prob, (0, WORD_CELLS - w), value=_ABOVE_EVERY_PROB)
        prob = torch.where(self.word_cell[:b], prob, _ABOVE_EVERY_PROB)
        return prob, F.pad(pred_id, (0, WORD_CELLS - w))

    def _finished(self, row: Row, ids, probs, masks, extra, error):
        n = row.data[2]
        return CaptionFinished(request=row.request, ids=ids[:n].clone(), probs=probs[:n].clone(),
                               masks=masks[:, :n].clone(), cancelled=row.cancelled, error=error)
