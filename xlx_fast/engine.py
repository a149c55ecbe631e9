"""The paint engine: captions in, cluster ids out, on the step-level slot engine.

:class:`Engine` is :class:`xlx_fast.step_engine.StepEngine` (slots, admission between steps,
batch buckets, CUDA graphs, per-row schedules, strategies, temperatures and seeds: see there)
with the image sampler's hooks:

- a request is a caption (``input_ids``, optional ``attention_mask``) and its sampling
  parameters; its schedule runs over the model's grid cells (``model.n_cells``: N² on its N×N
  grid, 64 on the paper's 8×8), which are the engine's ``cells``;
- joining runs the language layers for the joiners only, written into the slots' caption cache
  (``step_plan.language``): they never see the image;
- a step is the relational and cross layers over the visual input (``step_plan.vision``), the
  head's transform and ``codebook_head`` over the folded head; the sampler gathers the next
  visual input from the projected codebook;
- a finished row's codes are its cells' centroids (``mask_feat`` where undecided).

Captions are padded to ``max_length`` with a key padding mask (padded keys get the additive
``finfo.min``, so their softmax weight is exactly 0): a shorter caption attends to the same keys
as alone.

Weights. The derived tables (projected codebook, folded head, box) are copied into the engine
at construction: changing a weight of the model afterwards (by any route) is seen by the
engine after ``reload()``, which recomputes them in place (graphs stay valid). The transformer
itself is read live through the model's parameters; moving or replacing parameters (``.to()``,
assigning a new ``Parameter``) needs a new Engine, since graphs hold their addresses.

Memory: per slot the caption cache (max_length x hidden) besides the base's sampler state and
mask history.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .ops import frozen_weights
from .ops.codebook_head import codebook_head
from .patching import optimize
from .step_engine import MAX_STEPS, Row, StepEngine, check_model
from .step_plan import extended_mask, head_transform, language, prepare, vision

__all__ = ["Engine", "Request", "Finished", "MAX_STEPS"]


@dataclass
class Request:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    seed: int = 0
    steps: int | None = None
    strategy: str = "mask_predict"
    temperature: float = 0.0
    tag: object = None


@dataclass
class Finished:
    """A finished row. ``error`` is None for a good row; a row the sampler flagged (NaN in its
    probabilities, e.g. from bad weights) finishes with the reason instead, and its ids, codes and
    probs mean nothing: it fails alone, its neighbours' results are unaffected.
    ``ids`` [n], ``probs`` [n] and ``masks`` [steps, n] are on the host (n = the model's
    ``n_cells``); ``codes`` [n, feat_dim] stays on the engine's device: it is what the generator paints from
    there, and at feat_dim 2048 it is by far the largest part (512 KB a row in fp32), so a
    round trip through host memory would cost more than the step itself at batch 64."""

    request: Request
    ids: torch.Tensor
    codes: torch.Tensor
    probs: torch.Tensor
    masks: torch.Tensor
    cancelled: bool
    error: str | None = None  # why the row failed (the sampler flagged it); its results are void


class Engine(StepEngine):
    """See the module docstring. ``model``: ``XLxmertForImageGeneration`` in eval mode (it is
    ``optimize``-d in place); ``slots``: capacity; ``max_length``: longest caption;
    ``cuda_graph``: capture steps (default: on for CUDA models); ``buckets``: batch sizes the
    forward runs at (default 1, 2, 4, ..., slots; must end at ``slots``)."""

    request_type = Request

    def __init__(self, model, slots: int = 8, *, max_length: int = 20,
                 cuda_graph: bool | None = None, buckets: Sequence[int] | None = None):
        self.device = check_model(model)
        limit = model.config.max_position_embeddings
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= limit:
            raise ValueError(f"max_length must be an int in [1, {limit}], got {max_length!r}")
        self.model, self.max_length = model, max_length
        optimize(model)
        self.dtype = model.centroids.dtype
        t = self._tables = prepare(model)
        # Own copies: reload() rewrites them in place, so captured graphs stay valid.
        self.box = t.box.clone()
        self.head_weight, self.head_bias = t.head_weight.clone(), t.head_bias.clone()
        frozen_weights.adopt(model, self.head_weight)  # a frozen model's head GEMM: packed on a CPU
        super().__init__(slots, cuda_graph=cuda_graph, buckets=buckets, table=t.table.clone(),
                         mask_row=t.mask_row.clone(), cells=model.n_cells)
        dev, rows, hidden = self.device, slots + 1, model.config.hidden_size
        self.key_mask = torch.zeros(rows, max_length, dtype=torch.bool, device=dev)
        self.ext = extended_mask(model, self.key_mask).contiguous()
        self.lang = torch.zeros(rows, max_length, hidden, dtype=self.dtype, device=dev)
        self.join_ids = torch.zeros(slots, max_length, dtype=torch.int64, device=dev)
        self.join_mask = torch.zeros(slots, max_length, dtype=torch.bool, device=dev)

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def reload(self) -> None:
        """Recompute the derived tables from the model's current weights, in place."""
        t = prepare(self.model)
        for dst, src in ((self.table, t.table), (self.mask_row, t.mask_row), (self.box, t.box),
                         (self.head_weight, t.head_weight), (self.head_bias, t.head_bias)):
            if dst.shape != src.shape or dst.dtype != src.dtype or dst.device != src.device:
                raise ValueError("the model's shapes, dtype or device changed: build a new Engine")
            dst.copy_(src)
        self._tables = t

    # ---------------------------------------------------------------- the hooks
    def _check_input(self, where: str, r: Request):
        ids = r.input_ids
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{where}.input_ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{where}.input_ids must be int64 (or int32), got {ids.dtype}")
        if ids.dim() != 1 or ids.shape[0] < 1:
            raise ValueError(f"{where}.input_ids must be a non-empty 1-D tensor [L], got shape "
                             f"{tuple(ids.shape)}")
        if ids.shape[0] > self.max_length:
            raise ValueError(f"{where}.input_ids has {ids.shape[0]} tokens, more than the engine's "
                             f"max_length {self.max_length}")
        if ids.device.type not in ("cpu", self.device.type):
            raise ValueError(f"{where}.input_ids is on {ids.device}, the model on {self.device}")
        vocab = self.model.config.vocab_size
        ids = ids.cpu()  # one copy per caption; every check below reads the host copy (no syncs)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{where}.input_ids must lie in [0, {vocab}), got [{lo}, {hi}]")
        mask = r.attention_mask
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"{where}.attention_mask must be a torch.Tensor or None, got "
                                f"{type(mask).__name__}")
            if mask.dtype != torch.bool and mask.dtype not in (torch.int64, torch.int32, torch.uint8):
                raise TypeError(f"{where}.attention_mask must be bool (or 0/1 integers), got {mask.dtype}")
            if tuple(mask.shape) != tuple(ids.shape):
                raise ValueError(f"{where}.attention_mask must have input_ids' shape "
                                 f"{tuple(ids.shape)}, got {tuple(mask.shape)}")
            mask = mask.cpu()
            if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"{where}.attention_mask must hold only 0 and 1")
            mask = mask.bool()
        else:
            mask = ids != 0
        return (ids, mask), self.cells

    def _stage(self, rows: list[Row]) -> None:
        j = len(rows)
        ids = torch.zeros(j, self.max_length, dtype=torch.int64)
        mask = torch.zeros(j, self.max_length, dtype=torch.bool)
        for n, row in enumerate(rows):
            row_ids, row_mask = row.data
            ids[n, :row_ids.shape[0]] = row_ids
            mask[n, :row_ids.shape[0]] = row_mask
        self.join_ids.zero_()
        self.join_mask.zero_()
        self.join_ids[:j].copy_(ids)
        self.join_mask[:j].copy_(mask)

    def _join_rows(self, j: int, slot: torch.Tensor) -> None:
        """Language layers for the first j joiners, written into their slots."""
        ext = extended_mask(self.model, self.join_mask[:j])
        lang = language(self.model, self.join_ids[:j], ext)
        self.lang.index_copy_(0, slot, lang)
        self.ext.index_copy_(0, slot, ext)
        self.key_mask.index_copy_(0, slot, self.join_mask[:j])

    def _row_buffers(self):
        return self.key_mask, self.ext, self.lang

    def _forward(self, b: int, sample: bool):
        model = self.model
        visual = vision(model, self.lang[:b], self.ext[:b], self.state.out[:b] + self.box)
        h = head_transform(model, visual)
        if sample:
            return codebook_head(h, self.head_weight, self.head_bias, temperature=self.temps[:b],
                                 seeds=self.cell_seed[:b], step=0, check_nan=False)
        return codebook_head(h, self.head_weight, self.head_bias, check_nan=False)

    def _finish_extra(self, idx, ids):
        return torch.where((ids >= 0).unsqueeze(-1), self.model.centroids[ids.clamp(min=0)],
                           self.model.mask_feat.to(self.dtype))

    def _finished(self, row: Row, ids, probs, masks, codes, error):
        return Finished(request=row.request, ids=ids.clone(), codes=codes.clone(),
                        probs=probs.clone(), masks=masks.clone(), cancelled=row.cancelled,
                        error=error)
