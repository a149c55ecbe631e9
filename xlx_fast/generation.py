"""``xlx_fast.generate``: the fast sampling loop (SPEC §2), id for id the reference's.

Per call the loop does exactly the reference's arithmetic, minus the work that cannot change
the answer:

- the 9 language layers never see the image: run once per caption batch, not once per step;
- ``visual_pos`` is constant: ``LN(box_fc(pos))`` is computed once per model;
- a cell's visual input is ``mask_feat`` or a centroid, so ``LN(visn_fc(·))`` is applied to the
  codebook once (the *projected table*, [K, 768]) and gathered by the sampler-step op, instead of
  a 2048→768 GEMM per step; the tables hold halves so ``(x + y) / 2`` becomes ``x/2 + y/2``
  (halving is exact in binary floating point);
- ``linear_feat`` then ``out_cluster`` is one affine map (folded once, ``fold_head``) and the head
  returns (max probability, argmax) without materialising [B, n, K] (``codebook_head``);
- in the last cross layer only the visual stream feeds the head: its language half is skipped;
- the attention runs through the fused op (``optimize`` is applied to the model, idempotently);
- the loop runs on :class:`xlx_fast.engine.Engine` (one step = one forward over the rows,
  each row with its own steps, strategy, temperature and seed, all as data); on CUDA its step
  is a CUDA graph per batch shape. Engines are cached on the model, at most
  ``_ENGINE_CACHE`` of them (LRU), keyed by the batch shape, dtype, device and parameter
  addresses -- never by a seed or temperature.

The forward of a step (the tables, the language pass, the visual and cross layers) lives in
:mod:`xlx_fast.step_plan`; this module only validates a call, keeps the engines and collects
the rows. The per-model tables are cached on the model and rebuilt when a parameter they derive
from changes, whatever the route (an exact comparison against a snapshot: ``step_plan.prepare``).

Equality with the reference: the folded head and the projected table round differently from
the two-layer reference (GEMMs of other shapes), so logits agree to float rounding, not bit for
bit. Ids are equal wherever the best and second-best probabilities are further apart than that
rounding (SPEC §4); the tests sharpen the head to make that hold everywhere and then require
exact equality.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .engine import Request
from .models.xuniter import XUniterForImageGeneration
from .step_engine import run_requests
from .patching import ensure_optimized
from .sampler_io import SampleResult, check_inputs
from .sampling_params import check_params
from .step_plan import prepare
from .xuniter_engine import engine_class
from . import xuniter_plan

__all__ = ["generate"]


_ENGINE_CACHE = 4  # engines kept per model (LRU): one per (batch, length, dtype, device, graph)


def per_row(name: str, value, b: int, kind) -> list:
    """A scalar, or a sequence / 1-D tensor of one value per row -> a list of b values."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.item()
        elif value.dim() != 1:
            raise ValueError(f"{name} must be a scalar or 1-D with one value per row, got shape "
                             f"{tuple(value.shape)}")
        elif kind is int and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise TypeError(f"{name} must hold integers, got a {value.dtype} tensor")
        elif kind is float and value.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got a bool tensor")
        else:
            value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != b:
            raise ValueError(f"{name} must be a scalar or one value per row ({b}), got {len(value)} values")
        return list(value)
    return [value] * b


def storage_key(model) -> tuple:
    """The data pointers of every parameter and buffer: graphs hold these addresses, so a
    replaced tensor needs another engine. The (module, name) slots are listed once per model
    (walking the module tree took 0.7 ms a call at the base size); each call reads the slots
    again, so a Parameter assigned in place of another is seen."""
    slots = model.__dict__.get("_xlx_tensor_slots")
    if slots is None:
        slots = [(mod, name) for mod in model.modules()
                 for name in (*mod._parameters, *mod._buffers)]
        model.__dict__["_xlx_tensor_slots"] = slots
    out = []
    for mod, name in slots:
        t = getattr(mod, name)
        out.append(0 if t is None else t.data_ptr())
    return tuple(out)


def cached_engine(model, attr: str, shape: tuple, cuda_graph: bool, build):
    """The warmed-up engine ``build()`` makes for ``shape``, cached on the model under ``attr``
    (a bounded LRU of ``_ENGINE_CACHE``), keyed by what fixes its buffers and graphs (the
    shape, graphs or not, dtype, device, parameter addresses): never by a seed or a
    temperature (data)."""
    key = (*shape, bool(cuda_graph), model.centroids.dtype, str(model.centroids.device),
           storage_key(model))
    cache = model.__dict__.setdefault(attr, OrderedDict())
    engine = cache.pop(key, None)
    if engine is None:
        engine = build()
        engine.warmup()
    cache[key] = engine
    while len(cache) > _ENGINE_CACHE:
        cache.popitem(last=False)
    return engine


def _engine(model, b: int, length: int, cuda_graph: bool):
    """The paint engine for B captions of ``length`` tokens (``cached_engine``): the
    single-stream one (:class:`xlx_fast.xuniter_engine.XUniterEngine`) for an X-UNITER model."""
    cls = engine_class(model)
    return cached_engine(model, "_xlx_engines", (b, length), cuda_graph,
                         lambda: cls(model, slots=b, max_length=length, cuda_graph=cuda_graph,
                                     buckets=[b]))


def _tables(model):
    """The per-model tables the model's engine derives from (cached on the model)."""
    if isinstance(model, XUniterForImageGeneration):
        return xuniter_plan.prepare(model)
    return prepare(model)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             steps=None, strategy="mask_predict", temperature=0.0, seed=None,
             cuda_graph: bool | None = None, progress: bool = False) -> SampleResult:
    """Sample cluster ids for captions, fast; same arguments and result as ``reference.sample``.

    Runs the rows as requests of an :class:`xlx_fast.engine.Engine` with ``slots = B``: each
    row's result depends on that row's caption and parameters only.

    Args:
        model: ``XLxmertForImageGeneration`` (any dtype: fp32, bf16, fp16; CPU or CUDA), which
            paints its N×N grid of n = ``model.n_cells`` cells (64 on the 8×8 grid).
            An ``XUniterForImageGeneration`` (the single-stream model) runs on its own engine
            and equals ``reference.xuniter.sample``.
            ``optimize(model)`` is applied (idempotent) so its attentions run fused: the model
            is changed in place, and ``reference.sample`` refuses it afterwards (keep a
            ``copy.deepcopy`` for the reference, or ``xlx_fast.patching.unoptimize`` it).
        input_ids: [B, L] int64 token ids; ``attention_mask`` defaults to ``input_ids > 0``.
        steps, strategy, temperature, seed: a scalar for every row, or one value per row (a
            list, tuple or 1-D tensor of length B).
        steps: sampling steps (default 4 for Mask-Predict, n for the AR orders; at most
            ``strategies.MAX_STEPS``, and n for confidence and tlbr).
        strategy: ``mask_predict`` | ``confidence`` | ``tlbr`` | ``random``.
        temperature: 0 → the reference's greedy argmax; > 0 → each cell's id is a sample of
            softmax(logits / temperature) drawn from Philox keyed by a hash of (the row's seed,
            the step, the cell) (not part of the reference). Rows with equal captions and seeds
            give equal samples.
        seed: any int; fixes the random order (``random``) and the sampling noise; ``None``
            means 0.
        cuda_graph: capture the steps as CUDA graphs (default: on for CUDA models).
        progress: a progress bar over the steps.

    Returns:
        :class:`~xlx_fast.reference.SampleResult` (ids, codes, probs, masks), fresh tensors on
        the model's device: ``ids``, ``probs`` [B, n], ``codes`` [B, n, F]. ``masks`` is
        [max steps, B, n]; a row with fewer steps than the longest has all-False masks after
        its last step.

    Weights: the derived tables are checked against the weights they came from on every call
    (an exact comparison, see :func:`prepare`), so no edit of a weight is ever missed.

    Raises ValueError naming the row when the sampler flags one (NaN probabilities, e.g. from
    NaN weights) rather than return its meaningless ids.
    """
    attention_mask = check_inputs(model, input_ids, attention_mask)
    if model.training:
        raise ValueError("generate() runs inference only: call model.eval() first")
    b, length = input_ids.shape
    columns = [per_row(name, value, b, kind) for name, value, kind in (
        ("strategy", strategy, str), ("steps", steps, int), ("temperature", temperature, float),
        ("seed", seed, int))]
    params = [check_params(st, k.item() if isinstance(k, torch.Tensor) else k, t,
                           0 if x is None else x, model.n_cells) for st, k, t, x in zip(*columns)]
    steps_ = [p.steps for p in params]
    device = model.centroids.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs a model on a CUDA device")

    ensure_optimized(model)
    engine = _engine(model, b, length, cuda_graph)
    if engine._tables is not _tables(model):
        engine.reload()
    # the captions go to the host once, as a batch (the engine reads them there: per-row copies
    # from a GPU would each wait for it)
    input_ids, attention_mask = input_ids.to("cpu", torch.int64), attention_mask.to("cpu", torch.bool)
    requests = [Request(input_ids=input_ids[r], attention_mask=attention_mask[r], seed=p.seed,
                        steps=p.steps, strategy=p.strategy.name, temperature=p.temperature)
                for r, p in enumerate(params)]
    names = "/".join(sorted({p.strategy.name for p in params}))
    results = run_requests(engine, requests, max(steps_) if progress else None, f"xlx_fast {names}")
    k = max(steps_)
    masks = torch.zeros(k, b, model.n_cells, dtype=torch.bool)
    for r, f in enumerate(results):
        masks[:f.masks.shape[0], r] = f.masks
    return SampleResult(ids=torch.stack([f.ids for f in results]).to(device),
                        codes=torch.stack([f.codes for f in results]).to(device),
                        probs=torch.stack([f.probs for f in results]).to(device),
                        masks=masks.to(device))
