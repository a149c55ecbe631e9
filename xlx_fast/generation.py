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
- on CUDA the whole loop is captured once per (batch, caption length, steps, strategy, dtype,
  sampling mode) as a CUDA graph and replayed.

The per-model tables are cached on the model and rebuilt when a parameter they derive from
changes (tracked by the parameters' version counters, data pointers and dtype).

Equality with the reference: the folded head and the projected table round differently from
the two-layer reference (GEMMs of other shapes), so logits agree to float rounding, not bit for
bit. Ids are equal wherever the best and second-best probabilities are further apart than that
rounding (SPEC §4); the tests sharpen the head to make that hold everywhere and then require
exact equality.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.xlxmert import GRID, N_CELLS
from .ops.codebook_head import codebook_head, fold_head
from .ops.sampler_step import check_status, init_state, reset_state, sampler_step, schedule
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


def _sources(model):
    enc = model.bert.encoder.visn_fc
    head = model.obj_predict_head
    return [model.vis_emb.weight, model.mask_feat, enc.visn_fc.weight, enc.visn_fc.bias,
            enc.visn_layer_norm.weight, enc.visn_layer_norm.bias, enc.box_fc.weight, enc.box_fc.bias,
            enc.box_layer_norm.weight, enc.box_layer_norm.bias, head.linear_feat.weight,
            head.linear_feat.bias, head.out_cluster.bias]


def _key(model) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in _sources(model))


@torch.no_grad()
def prepare(model) -> FastTables:
    """The model's :class:`FastTables`, built on first use and cached on the model."""
    key = _key(model)
    cached = getattr(model, "_xlx_fast_tables", None)
    if cached is not None and cached.key == key:
        return cached
    enc = model.bert.encoder.visn_fc
    dtype, device = model.centroids.dtype, model.centroids.device

    def project(feats):  # the reference's visual branch, on codebook rows instead of cells
        return enc.visn_layer_norm(enc.visn_fc(feats)) / 2

    table = project(model.centroids)
    mask_row = project(model.mask_feat.to(dtype).view(1, -1)).view(-1)
    box = enc.box_layer_norm(enc.box_fc(box_positions(GRID, dtype, device))) / 2
    w, b = fold_head(model.obj_predict_head.linear_feat, model.obj_predict_head.out_cluster)
    tables = FastTables(table.contiguous(), mask_row.contiguous(), box.contiguous(),
                        w.contiguous(), b.float().contiguous(), key)
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


class _Loop:
    """One (batch, length, steps, strategy, ...) configuration of the loop with its buffers.

    ``run`` executes the whole loop on the buffers; it allocates only temporaries and never
    syncs with the host, so on CUDA it can be captured as a graph (``capture``).
    """

    def __init__(self, model, tables, batch, length, steps, strategy, seed, temperature):
        device = tables.table.device
        self.model, self.tables = model, tables
        self.steps, self.strategy, self.temperature = steps, strategy, temperature
        self.input_ids = torch.zeros(batch, length, dtype=torch.int64, device=device)
        self.attention_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.state = init_state(batch, tables.mask_row)
        self.masks = torch.zeros(steps, batch, N_CELLS, dtype=torch.bool, device=device)
        self.probs = torch.zeros(batch, N_CELLS, dtype=torch.float32, device=device)
        sched = schedule(strategy, steps, seed).tensors(batch, device)
        self.per_step = [{name: t[i] for name, t in sched.items()} for i in range(steps)]
        # Per-cell seeds for temperature sampling: a row's draws depend on its own seed only.
        rows = torch.arange(batch, dtype=torch.int64, device=device)
        cells = torch.arange(N_CELLS, dtype=torch.int64, device=device)
        self.seeds = (int(seed or 0) * 1_000_003 + rows[:, None] * N_CELLS + cells).contiguous()
        self.graph = None

    def run(self, on_step=None):
        model, tables, state = self.model, self.tables, self.state
        reset_state(state, tables.mask_row)
        ext_mask = _extended_mask(model, self.attention_mask)
        lang = _language(model, self.input_ids, ext_mask)
        transform = model.obj_predict_head.transform
        for i in range(self.steps):
            self.masks[i].copy_(state.mask)
            visual = _vision(model, lang, ext_mask, state.out + tables.box)
            prob, pred_id = codebook_head(transform(visual), tables.head_weight, tables.head_bias,
                                          temperature=self.temperature, seeds=self.seeds, step=i)
            sampler_step(prob, pred_id, state, tables.table, tables.mask_row, self.strategy,
                         **self.per_step[i])
            if on_step is not None:
                on_step()
        self.probs.copy_(prob)

    def capture(self):
        """Record ``run`` as a CUDA graph (after one eager warm-up run that also autotunes)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.run()

    def __call__(self, input_ids, attention_mask, progress=False):
        self.input_ids.copy_(input_ids)
        self.attention_mask.copy_(attention_mask)
        if self.graph is not None:
            self.graph.replay()  # one unit: no per-step progress to show
        elif progress:
            from tqdm.auto import tqdm

            with tqdm(total=self.steps, desc=f"xlx_fast {self.strategy}", unit="step") as bar:
                self.run(on_step=bar.update)
        else:
            self.run()
        return self.state, self.masks, self.probs


def _loop(model, tables, input_ids, steps, strategy, seed, temperature, use_graph):
    b, length = input_ids.shape
    key = (b, length, steps, strategy, seed if strategy == "random" or temperature > 0 else None,
           float(temperature), tables.table.dtype, str(tables.table.device), use_graph)
    loops = model.__dict__.setdefault("_xlx_loops", {})
    loop = loops.get(key)
    if loop is None or loop.tables is not tables:
        loop = _Loop(model, tables, b, length, steps, strategy, seed, temperature)
        if use_graph:
            loop.capture()
        loops[key] = loop
    return loop


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             steps: int | None = None, strategy: str = "mask_predict", temperature: float = 0.0,
             seed: int | None = None, cuda_graph: bool | None = None,
             progress: bool = False) -> SampleResult:
    """Sample cluster ids for captions, fast; same arguments and result as ``reference.sample``.

    Args:
        model: ``XLxmertForImageGeneration`` (any dtype: fp32, bf16, fp16; CPU or CUDA).
            ``optimize(model)`` is applied (idempotent) so its attentions run fused: the model
            is changed in place, and ``reference.sample`` refuses it afterwards (keep a
            ``copy.deepcopy`` for the reference, or ``xlx_fast.patching.unoptimize`` it).
        input_ids: [B, L] int64 token ids; ``attention_mask`` defaults to ``input_ids > 0``.
        steps: sampling steps (default 4 for Mask-Predict, 64 for the AR orders).
        strategy: ``mask_predict`` | ``confidence`` | ``tlbr`` | ``random``.
        temperature: 0 → the reference's greedy argmax; > 0 → each cell's id is a sample of
            softmax(logits / temperature) drawn from a counter-based RNG keyed by ``seed``, the
            row, the cell and the step (not part of the reference).
        seed: fixes the random order (``random``) and the sampling noise; ``None`` means 0.
        cuda_graph: capture the loop as a CUDA graph (default: on for CUDA models).
        progress: a progress bar over the steps of the eager loop (a graph replay runs as one
            unit and shows none).

    Returns:
        :class:`~xlx_fast.reference.SampleResult` (ids, codes, probs, masks), fresh tensors.
    """
    check_strategy(strategy)
    attention_mask = check_inputs(model, input_ids, attention_mask)
    steps = check_steps(strategy, steps)
    temperature = float(temperature)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if model.training:
        raise ValueError("generate() runs inference only: call model.eval() first")
    device = model.centroids.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs a model on a CUDA device")

    optimize(model)
    tables = prepare(model)
    loop = _loop(model, tables, input_ids.to(torch.int64), steps, strategy, seed, temperature,
                 cuda_graph)
    state, masks, probs = loop(input_ids, attention_mask, progress)
    check_status(state.status)

    ids = state.ids.clone()
    decided = ids >= 0
    codes = torch.where(decided.unsqueeze(-1), model.centroids[ids.clamp(min=0)],
                        model.mask_feat.to(model.centroids.dtype))
    return SampleResult(ids=ids, codes=codes, probs=probs.clone(), masks=masks.clone())
