"""``xlx_fast.generate`` against ``reference.sample``, id for id, and each saving of SPEC §2 alone.

``generate`` optimizes the model it is given (fused attention), and the reference refuses such a
model: every comparison runs the reference on one model and the fast loop on a deep copy.
"""
import copy

import pytest
import torch

import xlx_fast
from xlx_fast import reference
from xlx_fast.step_plan import extended_mask, language, prepare, vision, visual_half
from xlx_fast.models import XLxmertForImageGeneration


def captions(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (b, 20), generator=g)
    for row in range(b):
        ids[row, 6 + 4 * row:] = 0
    ids[:, 0] = 101
    return ids


def sharpen(model, factor):
    """Scale the head's features so the top logit of each cell stands further above the second:
    ids become insensitive to float rounding, and exact equality is a fair demand (SPEC §4).
    Not so far that max probabilities saturate at 1.0: saturated cells tie with each other, and
    which of them Mask-Predict or confidence picks would hang on rounding again."""
    with torch.no_grad():
        model.obj_predict_head.linear_feat.weight.mul_(factor)
        model.obj_predict_head.linear_feat.bias.mul_(factor)
    return model


@pytest.fixture(scope="module")
def tiny():
    """The reference's model: never optimized."""
    return sharpen(XLxmertForImageGeneration.from_default(seed=1, size="tiny"), 3.0)


@pytest.fixture(scope="module")
def tiny_fast(tiny):
    """The same weights for the fast loop."""
    return copy.deepcopy(tiny)


def assert_same(a, b):
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.masks, b.masks)
    assert torch.equal(a.codes, b.codes)
    # Probabilities come from logits whose fp32 rounding grows with their size (the sharpened
    # full-size head has logits in the hundreds): relative 1e-3 on exp(z - logsumexp).
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("strategy,steps", [("mask_predict", 1), ("mask_predict", 4),
                                            ("mask_predict", 10), ("mask_predict", 70),
                                            ("confidence", 64), ("confidence", 5),
                                            ("tlbr", 64), ("tlbr", 9), ("random", 64),
                                            ("random", 90)])
def test_generate_equals_reference_tiny(tiny, tiny_fast, strategy, steps):
    ids = captions(3)
    ref = reference.sample(tiny, ids, steps=steps, strategy=strategy, seed=11)
    fast = xlx_fast.generate(tiny_fast, ids, steps=steps, strategy=strategy, seed=11)
    assert_same(ref, fast)


def test_generate_batch_one_and_explicit_mask(tiny, tiny_fast):
    ids = captions(1)
    mask = ids > 0
    assert_same(reference.sample(tiny, ids, mask, steps=4),
                xlx_fast.generate(tiny_fast, ids, mask, steps=4))


def test_reference_refuses_an_optimized_model(tiny, tiny_fast):
    xlx_fast.generate(tiny_fast, captions(1), steps=1)
    with pytest.raises(ValueError, match="optimized"):
        reference.sample(tiny_fast, captions(1), steps=1)


@pytest.mark.slow
def test_generate_equals_reference_full_size():
    model = sharpen(XLxmertForImageGeneration.from_default(seed=0, with_generator=False), 1.5)
    fast_model = copy.deepcopy(model)
    ids = captions(2, seed=3)
    for strategy in ("mask_predict", "confidence", "tlbr", "random"):
        steps = 4 if strategy == "mask_predict" else 6
        ref = reference.sample(model, ids, steps=steps, strategy=strategy, seed=2)
        assert ref.probs.max() < 0.999  # the premise: no saturated, tied cells
        assert_same(ref, xlx_fast.generate(fast_model, ids, steps=steps, strategy=strategy, seed=2))


def test_tables_follow_weight_changes():
    model = sharpen(XLxmertForImageGeneration.from_default(seed=2, size="tiny"), 3.0)
    fast_model = copy.deepcopy(model)
    ids = captions(2)
    first = xlx_fast.generate(fast_model, ids, steps=3)
    new = torch.randn(tuple(model.centroids.shape), generator=torch.Generator().manual_seed(9))
    for m in (model, fast_model):
        m.set_centroids(new)  # an in-place change: the cached tables must notice
    ref = reference.sample(model, ids, steps=3)
    fast = xlx_fast.generate(fast_model, ids, steps=3)
    assert_same(ref, fast)
    assert not torch.equal(first.ids, fast.ids)


# -- each saving of SPEC §2 on its own ----------------------------------------------------------

def hf_forward(model, ids, visual_feats):
    b = ids.shape[0]
    pos = reference.box_positions(8).expand(b, -1, -1)
    return model.bert(input_ids=ids, visual_feats=visual_feats, visual_pos=pos,
                      attention_mask=ids > 0, output_hidden_states=True, return_dict=True)


@torch.no_grad()
def test_language_layers_once_equal_hf_language_stream(tiny):
    ids = captions(2)
    feats = torch.randn(2, 64, tiny.feat_dim)
    out = hf_forward(tiny, ids, feats)
    n_l = tiny.config.l_layers
    lang = language(tiny, ids, extended_mask(tiny, ids > 0))
    torch.testing.assert_close(lang, out.language_hidden_states[n_l - 1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_box_and_projected_codebook_tables(tiny):
    t = prepare(tiny)
    enc = tiny.bert.encoder.visn_fc
    pos = reference.box_positions(8)
    torch.testing.assert_close(t.box * 2, enc.box_layer_norm(enc.box_fc(pos)), rtol=0, atol=0)
    rows = torch.tensor([0, 5, tiny.n_clusters - 1])
    want = enc.visn_layer_norm(enc.visn_fc(tiny.centroids[rows]))
    torch.testing.assert_close(t.table[rows] * 2, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.mask_row * 2, enc.visn_layer_norm(enc.visn_fc(tiny.mask_feat)),
                               rtol=1e-5, atol=1e-5)
    # (x + y) / 2 == x/2 + y/2 exactly: the visual embedding from the tables is the HF one.
    codes = tiny.centroids[torch.randint(0, tiny.n_clusters, (2, 64))]
    hf = enc(codes, pos.expand(2, -1, -1))
    ids_idx = torch.cdist(codes.reshape(-1, codes.shape[-1]), tiny.centroids).argmin(-1).view(2, 64)
    torch.testing.assert_close(t.table[ids_idx] + t.box, hf, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_folded_head_equals_two_layers(tiny):
    t = prepare(tiny)
    h = torch.randn(5, 64, tiny.config.hidden_size)
    head = tiny.obj_predict_head
    want = head.out_cluster(head.linear_feat(h)).double()
    got = h.double() @ t.head_weight.double().T + t.head_bias.double()
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@torch.no_grad()
def test_last_cross_layer_visual_half_and_vision_stream(tiny):
    ids = captions(2)
    feats = torch.randn(2, 64, tiny.feat_dim)
    out = hf_forward(tiny, ids, feats)
    ext = extended_mask(tiny, ids > 0)
    lang = language(tiny, ids, ext)
    x_last = tiny.bert.encoder.x_layers[-1]
    v_in = torch.randn(2, 64, tiny.config.hidden_size)
    assert torch.equal(visual_half(x_last, lang, ext, v_in), x_last(lang, ext, v_in, None)[1])
    emb = tiny.bert.encoder.visn_fc(feats, reference.box_positions(8).expand(2, -1, -1))
    torch.testing.assert_close(vision(tiny, lang, ext, emb), out.vision_output, rtol=1e-5, atol=1e-5)


# -- sampling mode, dtypes, errors --------------------------------------------------------------

def test_temperature_sampling_is_seeded(tiny_fast):
    ids = captions(2)
    a = xlx_fast.generate(tiny_fast, ids, steps=3, temperature=1.0, seed=1)
    b = xlx_fast.generate(tiny_fast, ids, steps=3, temperature=1.0, seed=1)
    c = xlx_fast.generate(tiny_fast, ids, steps=3, temperature=1.0, seed=2)
    greedy = xlx_fast.generate(tiny_fast, ids, steps=3)
    assert torch.equal(a.ids, b.ids)
    assert not torch.equal(a.ids, c.ids)
    assert not torch.equal(a.ids, greedy.ids)
    assert ((a.ids >= 0) & (a.ids < tiny_fast.n_clusters)).all()


def test_bf16_runs_and_mostly_agrees_with_bf16_reference():
    model = sharpen(XLxmertForImageGeneration.from_default(seed=1, size="tiny"), 3.0).to(torch.bfloat16)
    ids = captions(3)
    ref = reference.sample(model, ids, steps=4)
    fast = xlx_fast.generate(copy.deepcopy(model), ids, steps=4)
    assert fast.codes.dtype == torch.bfloat16
    assert (ref.ids == fast.ids).float().mean() >= 0.9


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(steps=0), ValueError, "steps"),
    (dict(strategy="beam"), ValueError, "strategy"),
    (dict(strategy="tlbr", steps=65), ValueError, "steps"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(cuda_graph=True), ValueError, "cuda_graph"),
])
def test_bad_arguments(tiny_fast, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        xlx_fast.generate(tiny_fast, captions(1), **kwargs)


def test_bad_inputs(tiny_fast):
    ids = captions(2)
    with pytest.raises(ValueError, match="input_ids"):
        xlx_fast.generate(tiny_fast, ids[0])
    with pytest.raises(ValueError, match="out of range"):
        xlx_fast.generate(tiny_fast, ids + 40000)
    with pytest.raises(ValueError, match="attention_mask"):
        xlx_fast.generate(tiny_fast, ids, ids[:1] > 0)
    tiny_fast.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            xlx_fast.generate(tiny_fast, ids)
    finally:
        tiny_fast.eval()


# -- CUDA: graph-captured loop vs eager loop vs reference ----------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["mask_predict", "confidence", "random"])
def test_cuda_graph_loop_equals_eager_and_reference(strategy, dtype):
    model = sharpen(XLxmertForImageGeneration.from_default(seed=0, with_generator=False), 1.5)
    model = model.to("cuda", dtype)
    fast_model = copy.deepcopy(model)
    ids = captions(4, seed=5).cuda()
    steps = 4 if strategy == "mask_predict" else 8
    graphed = xlx_fast.generate(fast_model, ids, steps=steps, strategy=strategy, seed=3)
    replay = xlx_fast.generate(fast_model, ids, steps=steps, strategy=strategy, seed=3)
    eager = xlx_fast.generate(fast_model, ids, steps=steps, strategy=strategy, seed=3,
                              cuda_graph=False)
    assert torch.equal(graphed.ids, replay.ids) and torch.equal(graphed.ids, eager.ids)
    assert torch.equal(graphed.masks, eager.masks)
    ref = reference.sample(model, ids, steps=steps, strategy=strategy, seed=3)
    agreement = (ref.ids == graphed.ids).float().mean().item()
    if dtype == torch.float32:
        assert agreement == 1.0
    else:
        assert agreement >= 0.9
