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
  returns (max probability, argmax) without materialising [B, 64, K] (``codebook_head``);
- in the last cross layer only the visual stream feeds the head: its language half is skipped;
- the attention runs through the fused op (``optimize`` is applied to the model, idempotently);
- the loop runs on :class:`xlx_fast.engine.Engine` (one step = one forward over the rows,
  each row with its own steps, strategy, temperature and seed, all as data); on CUDA its step
  is a CUDA graph per batch shape. Engines are cached on the model, at most
  ``_ENGINE_CACHE`` of them (LRU), keyed by the batch shape, dtype, device and parameter
  addresses -- never by a seed or temperature.

The per-model tables are cached on the model and rebuilt when a parameter they derive from
changes, whatever the route (an exact comparison against a snapshot: ``prepare``).

Equality with the reference: the folded head and the projected table round differently from
the two-layer reference (GEMMs of other shapes), so logits agree to float rounding, not bit for
bit. Ids are equal wherever the best and second-best probabilities are further apart than that
rounding (SPEC §4); the tests sharpen the head to make that hold everywhere and then require
exact equality.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .models.xlxmert import GRID, N_CELLS
from .ops.codebook_head import fold_head
from .patching import optimize
from .reference.grid import box_positions
from .reference.sampler import SampleResult, check_inputs, check_steps, check_strategy

__all__ = ["generate", "prepare", "FastTables"]


@dataclass
class FastTables:
    """What the loop precomputes once per model (all in the model's dtype and device).

    table:       [K, H]  LN(visn_fc(C)) / 2          the projected codebook
    mask_row:    [H]     LN(visn_fc(mask_feat)) / 2  the projected mask feature
    box:         [64, H] LN(box_fc(visual_pos)) / 2  the constant box embedding
    head_weight: [K, H], head_bias [K]               linear_feat → out_cluster, folded
    """

    table: torch.Tensor
    mask_row: torch.Tensor
    box: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    key: tuple
    snapshot: list


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


def _key(model) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape)) for p in _sources(model))


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers: an exact comparison (NaN equals itself, -0 != +0)."""
    t = t.detach()
    return t.view(_BITS[t.element_size()]) if t.is_floating_point() else t


def _unchanged(tables: FastTables, model) -> bool:
    """Whether every source holds exactly the values the tables were built from."""
    if tables.key != _key(model):
        return False  # a new tensor, a dtype/device/shape change or a version bump: rebuild
    # same storage and version: compare contents, which routes that bypass the version counter
    # (p.data.copy_, a detached view, a numpy view) do change
    return _same_bits(list(zip(_sources(model), tables.snapshot)),
                      one_sync=model.centroids.device.type == "cuda")


def _same_bits(pairs, one_sync: bool) -> bool:
    """Whether each (tensor, snapshot) pair holds the same bits (shapes already equal).
    ``one_sync``: one "any difference" flag per pair, read back once -- on a GPU each
    ``torch.equal`` would wait for it; on a CPU ``torch.equal`` is faster (4.8 ms against 8 ms
    at the base size)."""
    if not one_sync:
        return all(torch.equal(_bits(p), snap) for p, snap in pairs)
    return not bool(torch.stack([(_bits(p) != snap).any() for p, snap in pairs]).any())


@torch.no_grad()
def prepare(model) -> FastTables:
    """The model's :class:`FastTables`, built on first use and cached on the model.

    Never stale: each call compares the sources (codebook, mask feature, visn_fc, box_fc and
    their layer norms, linear_feat, out_cluster) with a bitwise snapshot taken when the tables
    were built, and rebuilds on any difference. Version counters and data pointers alone miss
    edits made through ``p.data.copy_``, a ``p.detach()`` view or a numpy view. Cost: the
    snapshot doubles the sources' memory (94 MB fp32 at the base size, mostly the
    10,000 x 2048 codebook) and a check reads both: measured 5 ms at the base size on an idle
    2-core CPU, where the rebuild takes 0.5 s and one Mask-Predict-4 ``generate`` at batch 1
    about 0.42 s. On a GPU
    it is a bandwidth-bound compare (well under a ms) and one host sync.
    """
    cached = getattr(model, "_xlx_fast_tables", None)
    if cached is not None and _unchanged(cached, model):
        return cached
    key = _key(model)
    enc = model.bert.encoder.visn_fc
    dtype, device = model.centroids.dtype, model.centroids.device

    def project(feats):  # the reference's visual branch, on codebook rows instead of cells
        return enc.visn_layer_norm(enc.visn_fc(feats)) / 2

    table = project(model.centroids)
    mask_row = project(model.mask_feat.to(dtype).view(1, -1)).view(-1)
    box = enc.box_layer_norm(enc.box_fc(box_positions(GRID, dtype, device))) / 2
    w, b = fold_head(model.obj_predict_head.linear_feat, model.obj_predict_head.out_cluster)
    tables = FastTables(table.contiguous(), mask_row.contiguous(), box.contiguous(),
                        w.contiguous(), b.float().contiguous(), key,
                        [_bits(p).clone() for p in _sources(model)])
    model._xlx_fast_tables = tables
    return tables


def _extended_mask(model, attention_mask):
    """HF's additive key mask [B, 1, 1, L], exactly as ``LxmertModel.forward`` builds it."""
    dtype = model.bert.dtype
    ext = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - ext) * torch.finfo(dtype).min


def _language(model, input_ids, ext_mask):
    """Embeddings and the language layers: the part of the forward no step changes."""
    lang = model.bert.embeddings(input_ids, torch.zeros_like(input_ids))
    for layer in model.bert.encoder.layer:
        lang = layer(lang, ext_mask)[0]
    return lang


def _visual_half(x_layer, lang, ext_mask, visual):
    """``LxmertXLayer.forward`` restricted to its visual output (the last cross layer)."""
    visual = x_layer.visual_attention(visual, lang, ctx_att_mask=ext_mask)[0]
    visual = x_layer.visn_self_att(visual, None)[0]
    return x_layer.visn_output(x_layer.visn_inter(visual), visual)


def _vision(model, lang, ext_mask, visual):
    """Relational and cross layers on one step's visual input; the vision output."""
    enc = model.bert.encoder
    for layer in enc.r_layers:
        visual = layer(visual, None)[0]
    for x_layer in enc.x_layers[:-1]:
        lang, visual = x_layer(lang, ext_mask, visual, None)
    return _visual_half(enc.x_layers[-1], lang, ext_mask, visual)


_ENGINE_CACHE = 4  # engines kept per model (LRU): one per (batch, length, dtype, device, graph)


def _per_row(name: str, value, b: int, kind) -> list:
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


def _storage_key(model) -> tuple:
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


def _engine(model, b: int, length: int, cuda_graph: bool):
    """An engine for this batch shape, cached on the model (bounded LRU of ``_ENGINE_CACHE``),
    keyed by what fixes its buffers and graphs: never by a seed or a temperature (data)."""
    from .engine import Engine

    params = _storage_key(model)
    key = (b, length, bool(cuda_graph), model.centroids.dtype, str(model.centroids.device), params)
    cache = model.__dict__.setdefault("_xlx_engines", OrderedDict())
    engine = cache.pop(key, None)
    if engine is None:
        engine = Engine(model, slots=b, max_length=length, cuda_graph=cuda_graph, buckets=[b])
        engine.warmup()
    cache[key] = engine
    while len(cache) > _ENGINE_CACHE:
        cache.popitem(last=False)
    return engine


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             steps=None, strategy="mask_predict", temperature=0.0, seed=None,
             cuda_graph: bool | None = None, progress: bool = False) -> SampleResult:
    """Sample cluster ids for captions, fast; same arguments and result as ``reference.sample``.

    Runs the rows as requests of an :class:`xlx_fast.engine.Engine` with ``slots = B``: each
    row's result depends on that row's caption and parameters only.

    Args:
        model: ``XLxmertForImageGeneration`` (any dtype: fp32, bf16, fp16; CPU or CUDA).
            ``optimize(model)`` is applied (idempotent) so its attentions run fused: the model
            is changed in place, and ``reference.sample`` refuses it afterwards (keep a
            ``copy.deepcopy`` for the reference, or ``xlx_fast.patching.unoptimize`` it).
        input_ids: [B, L] int64 token ids; ``attention_mask`` defaults to ``input_ids > 0``.
        steps, strategy, temperature, seed: a scalar for every row, or one value per row (a
            list, tuple or 1-D tensor of length B).
        steps: sampling steps (default 4 for Mask-Predict, 64 for the AR orders; at most
            ``engine.MAX_STEPS``).
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
        the model's device. ``masks`` is [max steps, B, 64]; a row with fewer steps than the
        longest has all-False masks after its last step.

    Weights: the derived tables are checked against the weights they came from on every call
    (an exact comparison, see :func:`prepare`), so no edit of a weight is ever missed.
    """
    from .engine import Request

    attention_mask = check_inputs(model, input_ids, attention_mask)
    if model.training:
        raise ValueError("generate() runs inference only: call model.eval() first")
    b, length = input_ids.shape
    strategies = _per_row("strategy", strategy, b, str)
    for st in strategies:
        check_strategy(st)
    steps_ = _per_row("steps", steps, b, int)
    steps_ = [check_steps(st, k.item() if isinstance(k, torch.Tensor) else k)
              for st, k in zip(strategies, steps_)]
    temps = _per_row("temperature", temperature, b, float)
    seeds = [0 if x is None else x for x in _per_row("seed", seed, b, int)]
    for t in temps:
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"temperature must be a real number, got {type(t).__name__}")
        if not t >= 0 or t == float("inf"):
            raise ValueError(f"temperature must be finite and >= 0, got {t}")
    for x in seeds:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"seed must be an int (or None), got {type(x).__name__}")
    device = model.centroids.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs a model on a CUDA device")

    optimize(model)
    engine = _engine(model, b, length, cuda_graph)
    if engine._tables is not prepare(model):
        engine.reload()
    # the captions go to the host once, as a batch (the engine reads them there: per-row copies
    # from a GPU would each wait for it)
    input_ids, attention_mask = input_ids.to("cpu", torch.int64), attention_mask.to("cpu", torch.bool)
    requests = [Request(input_ids=input_ids[r], attention_mask=attention_mask[r],
                        seed=seeds[r], steps=steps_[r], strategy=strategies[r],
                        temperature=float(temps[r])) for r in range(b)]
    handles = engine.admit(requests)
    row_of = {id(q): r for r, q in enumerate(requests)}
    results = [None] * b
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max(steps_), desc="xlx_fast " + "/".join(sorted(set(strategies))), unit="step")
    try:
        while engine.active():
            for f in engine.step():
                results[row_of[id(f.request)]] = f
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        for h in handles:  # leave the cached engine empty even after an error
            engine.cancel(h)
        while engine.active():
            engine.step()
    k = max(steps_)
    masks = torch.zeros(k, b, N_CELLS, dtype=torch.bool)
    for r, f in enumerate(results):
        masks[:f.masks.shape[0], r] = f.masks
    return SampleResult(ids=torch.stack([f.ids for f in results]).to(device),
                        codes=torch.stack([f.codes for f in results]).to(device),
                        probs=torch.stack([f.probs for f in results]).to(device),
                        masks=masks.to(device))
