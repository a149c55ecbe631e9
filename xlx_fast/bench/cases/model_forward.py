"""Whole-model forward: HF ``LxmertModel`` as shipped vs the same model after ``xlx_fast.optimize``.

The model is the default ``LxmertConfig()`` (hidden 768, 12 heads, 9 language / 5 relational /
5 cross layers, 2048-d visual features) with seeded random weights; ``size="tiny"`` uses the tiny
model's config (``xlx_fast.models.xlxmert.SIZES``). Inputs: B captions of 20 token ids, each padded
after a seeded length of 5..16 tokens (``attention_mask = input_ids > 0``, so HF builds its
additive key mask), and the 64 grid cells: random visual features and the 8×8 box table of
``xlx_fast.reference.box_positions``.

Reference (the timed baseline): the plain HF model in the row's dtype ("same dtype", SPEC §6).
Fast: a deep copy of it after ``xlx_fast.optimize`` (every ``LxmertAttention`` fused, on the CPU
through SDPA; every output and intermediate block one ``fused_linear``), frozen as the other fast
rows are (:mod:`.frozen`). Both run under ``torch.no_grad()``, which the fused path requires.
Peer: a deep copy of the reference under ``torch.compile`` (see :mod:`.compiled`), with
``freezing=True`` where the fast row's weights are packed.

Agreement: the norm-wise relative error (SPEC §4 bound for the dtype) of each of the three
outputs — vision output, language output, pooled output — against the reference's; the row shows
the largest, the three are listed next to it.

FLOPs (:func:`forward_flops`, counted from the config): the forward's GEMMs only, i.e. every
``nn.Linear`` (visual feature and box encoders, Q/K/V and output projections, both FFN matrices,
the pooler) plus the two attention matmuls (QKᵀ and PV, over all key positions, padded ones
included, as both implementations compute them); embeddings, LayerNorm, softmax and GELU are left
out. 2 FLOPs per multiply-add.
"""
from __future__ import annotations

import copy

import torch

from ..harness import FAST, PEER, Agreement, Case, Prepared, Spec, TOLERANCE, rel_error
from . import compiled, frozen

TEXT_LENGTH, CELLS, GRID = 20, 64, 8
MIN_TOKENS, MAX_TOKENS = 5, 16  # caption lengths: every caption has some padding
BATCHES = {
    ("cpu", True): (1,),
    ("cpu", False): (1, 8),
    ("cuda", True): (1, 64),
    ("cuda", False): (1, 8, 64, 256),
}
OUTPUTS = ("vision_output", "language_output", "pooled_output")

_MODELS: dict = {}


def release() -> None:
    _MODELS.clear()


def config(size: str):
    from transformers import LxmertConfig

    from xlx_fast.models.xlxmert import SIZES

    return LxmertConfig(**SIZES[size].lxmert)


def forward_flops(cfg, batch: int, lt: int = TEXT_LENGTH, lv: int = CELLS) -> float:
    """GEMM FLOPs of one ``LxmertModel`` forward (see the module docstring for what counts)."""
    h, i = cfg.hidden_size, cfg.intermediate_size

    def self_attention(length):  # Q, K, V and output projections, QKᵀ, PV
        return 2 * length * 4 * h * h + 4 * length * length * h

    def cross_attention(lq, lk):  # Q and output projections on the queries, K and V on the keys
        return 2 * lq * 2 * h * h + 2 * lk * 2 * h * h + 4 * lq * lk * h

    def ffn(length):
        return 4 * length * h * i

    visual_encoder = 2 * lv * (cfg.visual_feat_dim + cfg.visual_pos_dim) * h
    language = cfg.l_layers * (self_attention(lt) + ffn(lt))
    relational = cfg.r_layers * (self_attention(lv) + ffn(lv))
    cross = cfg.x_layers * (cross_attention(lt, lv) + cross_attention(lv, lt)
                            + self_attention(lt) + self_attention(lv) + ffn(lt) + ffn(lv))
    pooler = 2 * h * h
    return float(batch * (visual_encoder + language + relational + cross + pooler))


def model(size: str, dtype: torch.dtype, device: torch.device, role: str):
    """The seeded model in ``dtype`` on ``device``; ``role`` "reference" (plain HF) or "fast"
    (a deep copy of the reference after ``xlx_fast.optimize``)."""
    key = (size, dtype, str(device), role)
    if key not in _MODELS:
        if role == "fast":
            import xlx_fast

            _MODELS[key] = xlx_fast.optimize(copy.deepcopy(model(size, dtype, device, "reference")))
        else:
            from transformers import LxmertModel

            base_key = (size, torch.float32, "cpu", "reference")
            if base_key not in _MODELS:
                state = torch.random.get_rng_state()
                torch.manual_seed(0)  # HF initialises from the global generator
                try:
                    _MODELS[base_key] = LxmertModel(config(size)).eval()
                finally:
                    torch.random.set_rng_state(state)
            if key != base_key:
                _MODELS[key] = copy.deepcopy(_MODELS[base_key]).to(device=device, dtype=dtype).eval()
    return _MODELS[key]


def make_inputs(cfg, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    from xlx_fast.reference import box_positions

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (batch, TEXT_LENGTH), generator=gen)
    lengths = torch.randint(MIN_TOKENS, MAX_TOKENS + 1, (batch,), generator=gen)
    ids[torch.arange(TEXT_LENGTH)[None, :] >= lengths[:, None]] = 0
    feats = torch.randn(batch, CELLS, cfg.visual_feat_dim, generator=gen)
    boxes = box_positions(GRID).expand(batch, CELLS, 4)
    return dict(input_ids=ids.to(device), attention_mask=(ids > 0).to(device),
                visual_feats=feats.to(device, dtype), visual_pos=boxes.to(device, dtype).contiguous())


def forward(m, inputs: dict):
    with torch.no_grad():
        out = m(**inputs, return_dict=True)
    return tuple(out[name] for name in OUTPUTS)


def make_case(spec: Spec, dtype: torch.dtype, batch: int) -> Case:
    device = spec.device
    cfg = config(spec.size)

    def build() -> Prepared:
        inputs = make_inputs(cfg, batch, dtype, device)
        ref_model = model(spec.size, dtype, device, "reference")
        fast_model, fast_note = frozen.freeze(model(spec.size, dtype, device, "fast"))

        def compare(ref, out, _name) -> Agreement:
            errors = {name: rel_error(o, r) for name, o, r in zip(OUTPUTS, out, ref)}
            worst = max(errors.values())
            limit = TOLERANCE[dtype]
            bad = [name for name, e in errors.items() if not e <= limit]
            return Agreement("rel err", worst, limit, not bad,
                             detail=f"{', '.join(bad)} outside the bound" if bad else "",
                             extra={f"{name.split('_')[0]} err": e for name, e in errors.items()})

        peer = compiled.unavailable(spec, "model_forward", dtype)
        notes = {"xlx_fast.optimize": fast_note}
        if peer is None:
            compiled_model = compiled.compiled_copy(ref_model, None, spec)
            peer = compiled.FirstCallTimer(lambda: forward(compiled_model, inputs), spec,
                                           freezing=frozen.peer_freezes(device, dtype))
            notes[compiled.NAME] = peer.note
        return Prepared(reference=lambda: forward(ref_model, inputs),
                        backends={"xlx_fast.optimize": lambda: forward(fast_model, inputs),
                                  compiled.NAME: peer},
                        compare=compare, notes=notes)

    return Case(op="model_forward",
                shape=f"B={batch} Lt={TEXT_LENGTH} Lv={CELLS} H={cfg.hidden_size} "
                      f"layers={cfg.l_layers}/{cfg.r_layers}/{cfg.x_layers}",
                dtype=dtype, device=device,
                backends={"xlx_fast.optimize": FAST, compiled.NAME: PEER}, build=build,
                flops=forward_flops(cfg, batch), bound="compute")


def cases(spec: Spec):
    batches = (1, 2) if spec.size == "tiny" else BATCHES[(spec.device.type, spec.quick)]
    for dtype in spec.dtypes:
        for batch in batches:
            yield make_case(spec, dtype, batch)
