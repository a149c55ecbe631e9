"""The X-UNITER paint engine: captions in, cluster ids out, on the step-level slot engine.

:class:`XUniterEngine` is the paint engine (:class:`xlx_fast.engine.Engine`: its requests,
their checks and staging, and its finished rows) with the single-stream model's hooks
(:mod:`xlx_fast.xuniter_plan`; :mod:`xlx_fast.reference.xuniter` is what it must equal):

- joining computes the joiners' caption embeddings (BERT's, constant for a request) into their
  slots, and their key mask [caption; ones for the cells];
- a step embeds the cells from the sampler's ``out`` (rows of the projected codebook
  ``LN_img(img_linear(C))`` or the projected mask feature), adds the box and type embeddings,
  applies the shared LayerNorm, runs the BERT layers over [text; image] (``step_plan.layer``)
  and scores the image positions with the head's transform and ``codebook_head`` over the
  folded head;
- a finished row's codes are its cells' centroids (``mask_feat`` where undecided).

Captions are padded to ``max_length`` with a key padding mask (padded keys weigh exactly 0), so
a shorter caption attends to the same keys as alone. In a single stream every position is a
query of every layer, the caption's included: the text's layers run every step (unlike the
two-stream model's language layers, which run once per caption).

Weights: the derived tables (projected codebook and mask feature, box, type row, folded head)
are copied at construction and refreshed by ``reload()``; the encoder is read live. Moving or
replacing parameters needs a new engine.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .engine import Engine, Finished, Request
from .models.xuniter import XUniterForImageGeneration
from .ops import frozen_weights
from .ops.codebook_head import codebook_head
from .step_engine import StepEngine, check_model
from .step_plan import extended_mask, head_transform
from .xuniter_plan import encoder, image_embeddings, prepare, text_embeddings

__all__ = ["XUniterEngine", "Request", "Finished", "engine_class"]


def engine_class(model) -> type:
    """The paint engine class for ``model``: :class:`XUniterEngine` for an
    :class:`~xlx_fast.models.XUniterForImageGeneration`, :class:`xlx_fast.engine.Engine` (the
    two-stream X-LXMERT's) for any other. Both take the same arguments and requests."""
    return XUniterEngine if isinstance(model, XUniterForImageGeneration) else Engine


class XUniterEngine(Engine):
    """See the module docstring; arguments as :class:`xlx_fast.engine.Engine`'s, ``model`` an
    :class:`~xlx_fast.models.XUniterForImageGeneration` in eval mode."""

    def __init__(self, model, slots: int = 8, *, max_length: int = 20,
                 cuda_graph: bool | None = None, buckets: Sequence[int] | None = None):
        if not isinstance(model, XUniterForImageGeneration):
            raise TypeError(f"model must be an XUniterForImageGeneration, got {type(model).__name__}")
        self.device = check_model(model)
        n_cells = model.n_cells
        limit = model.config.max_position_embeddings
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= limit:
            raise ValueError(f"max_length must be an int in [1, {limit}], got {max_length!r}")
        self.model, self.max_length = model, max_length
        self.dtype = model.centroids.dtype
        t = self._tables = prepare(model)
        self.pos, self.type_row = t.pos.clone(), t.type_row.clone()
        self.head_weight, self.head_bias = t.head_weight.clone(), t.head_bias.clone()
        frozen_weights.adopt(model, self.head_weight)  # a frozen model's head GEMM: packed on a CPU
        # the base's constructor (the paint engine's builds the two-stream tables)
        StepEngine.__init__(self, slots, cuda_graph=cuda_graph, buckets=buckets,
                            table=t.table.clone(), mask_row=t.mask_row.clone(), cells=n_cells)
        dev, rows, hidden = self.device, slots + 1, model.config.hidden_size
        self.key_mask = torch.zeros(rows, max_length + n_cells, dtype=torch.bool, device=dev)
        self.key_mask[:, max_length:] = True  # every cell is a key of every query
        self.ext = extended_mask(model, self.key_mask).contiguous()
        self.text = torch.zeros(rows, max_length, hidden, dtype=self.dtype, device=dev)
        self.join_ids = torch.zeros(slots, max_length, dtype=torch.int64, device=dev)
        self.join_mask = torch.zeros(slots, max_length, dtype=torch.bool, device=dev)
        self.cell_keys = torch.ones(slots, n_cells, dtype=torch.bool, device=dev)

    @torch.no_grad()
    def reload(self) -> None:
        """Recompute the derived tables from the model's current weights, in place."""
        t = prepare(self.model)
        for dst, src in ((self.table, t.table), (self.mask_row, t.mask_row), (self.pos, t.pos),
                         (self.type_row, t.type_row), (self.head_weight, t.head_weight),
                         (self.head_bias, t.head_bias)):
            if dst.shape != src.shape or dst.dtype != src.dtype or dst.device != src.device:
                raise ValueError("the model's shapes, dtype or device changed: build a new engine")
            dst.copy_(src)
        self._tables = t

    # ---------------------------------------------------------------- the hooks
    def _join_rows(self, j: int, slot: torch.Tensor) -> None:
        """The joiners' caption embeddings and key masks, into their slots."""
        self.text.index_copy_(0, slot, text_embeddings(self.model, self.join_ids[:j]))
        keys = torch.cat((self.join_mask[:j], self.cell_keys[:j]), dim=1)
        self.key_mask.index_copy_(0, slot, keys)
        self.ext.index_copy_(0, slot, extended_mask(self.model, keys))

    def _row_buffers(self):
        return self.key_mask, self.ext, self.text

    def _forward(self, b: int, sample: bool):
        model = self.model
        image = image_embeddings(model, self.state.out[:b], self.pos, self.type_row)
        x = encoder(model, torch.cat((self.text[:b], image), dim=1), self.ext[:b])
        h = head_transform(model, x[:, self.max_length:])
        if sample:
            return codebook_head(h, self.head_weight, self.head_bias, temperature=self.temps[:b],
                                 seeds=self.cell_seed[:b], step=0, check_nan=False)
        return codebook_head(h, self.head_weight, self.head_bias, check_nan=False)
