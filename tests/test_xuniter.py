"""X-UNITER: the fast ``generate`` (``XUniterEngine``) against ``reference.xuniter.sample``, id
for id in fp32 under a sharpened head; the engine's batch invariance; bad inputs."""
import copy

import pytest
import torch

import xlx_fast
from xlx_fast.engine import Request
from xlx_fast.models import XLxmertForImageGeneration, XUniterForImageGeneration
from xlx_fast.models.xuniter import box7
from xlx_fast.reference import xuniter as ref_xuniter
from xlx_fast.xuniter_engine import XUniterEngine
from xlx_fast.xuniter_plan import encoder, image_embeddings, prepare, text_embeddings

MAXLEN = 20


def captions(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (b, MAXLEN), generator=g)
    for row in range(b):
        ids[row, 6 + 5 * row:] = 0
    ids[:, 0] = 101
    return ids


def sharpen(model, factor):
    with torch.no_grad():
        model.obj_predict_head.linear_feat.weight.mul_(factor)
        model.obj_predict_head.linear_feat.bias.mul_(factor)
    return model


@pytest.fixture(scope="module")
def tiny():
    return sharpen(XUniterForImageGeneration.from_default(seed=5, size="tiny",
                                                          with_generator=False), 4.0)


@pytest.fixture(scope="module")
def tiny_fast(tiny):
    return copy.deepcopy(tiny)


def assert_same(a, b):
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.masks, b.masks)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-3, atol=1e-6)


def test_model_shapes_and_box7():
    m = XUniterForImageGeneration.from_default(seed=0, size="tiny", with_generator=False)
    assert (m.grid, m.n_cells, m.feat_dim, m.config.num_hidden_layers) == (8, 64, 48, 2)
    assert m.obj_predict_head.out_cluster.weight is m.vis_emb.weight
    b = box7(8)[0]
    assert b.shape == (64, 7)
    torch.testing.assert_close(b[9], torch.tensor([1 / 8, 1 / 8, 2 / 8, 2 / 8, 1 / 8, 1 / 8, 1 / 64]))
    out = m(captions(2), captions(2) > 0, torch.randn(2, 64, 48))
    assert out.shape == (2, 64, 64)
    again = XUniterForImageGeneration.from_default(seed=0, size="tiny", with_generator=False)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), again.parameters()))


@pytest.mark.parametrize("strategy,steps,seed", [("mask_predict", 1, 3), ("mask_predict", 4, 8),
                                                 ("mask_predict", 10, 21), ("confidence", 6, 4),
                                                 ("random", 70, 13)])
def test_generate_equals_reference(tiny, tiny_fast, strategy, steps, seed):
    ids = captions(3, seed=seed)
    ref = ref_xuniter.sample(tiny, ids, steps=steps, strategy=strategy, seed=seed)
    assert ref.probs.max() < 0.999  # the premise: no saturated, tied cells
    fast = xlx_fast.generate(tiny_fast, ids, steps=steps, strategy=strategy, seed=seed)
    assert_same(ref, fast)


def test_generate_batch_one_and_explicit_mask(tiny, tiny_fast):
    ids = captions(1, seed=17)
    mask = ids > 0
    for strategy, steps in (("mask_predict", 4), ("tlbr", 9)):
        assert_same(ref_xuniter.sample(tiny, ids, mask, steps=steps, strategy=strategy),
                    xlx_fast.generate(tiny_fast, ids, mask, steps=steps, strategy=strategy))


@torch.no_grad()
def test_plan_pieces_equal_the_model(tiny):
    """The table gather + box + shared LayerNorm is the UNITER image embedding; the layers
    through step_plan.layer are HF's BertEncoder."""
    t = prepare(tiny)
    g = torch.Generator().manual_seed(2)
    pick = torch.randint(0, tiny.n_clusters, (2, 64), generator=g)
    masked = torch.rand(2, 64, generator=g) < 0.3
    feats = torch.where(masked[..., None], tiny.mask_feat.view(1, 1, -1), tiny.centroids[pick])
    gathered = torch.where(masked[..., None], t.mask_row.view(1, 1, -1), t.table[pick])
    image = image_embeddings(tiny, gathered, t.pos, t.type_row)
    torch.testing.assert_close(image, tiny.image_embeddings(feats), rtol=1e-5, atol=1e-5)
    ids = captions(2)
    x = torch.cat((text_embeddings(tiny, ids), image), dim=1)
    keys = torch.cat((ids > 0, torch.ones(2, 64, dtype=torch.bool)), dim=1)
    ext = (1.0 - keys[:, None, None, :].float()) * torch.finfo(torch.float32).min
    hf = tiny.bert.encoder(x, attention_mask=ext, return_dict=True).last_hidden_state
    torch.testing.assert_close(encoder(tiny, x, ext), hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny(ids, ids > 0, feats), hf[:, MAXLEN:], rtol=1e-5, atol=1e-5)


MIX = [("mask_predict", 4, 0, 0), ("confidence", 5, 1, 1), ("random", 7, 2, 2),
       ("tlbr", 3, 3, 1), ("mask_predict", 10, 4, 0)]


def request(i):
    strategy, steps, seed, cap = MIX[i]
    ids = captions(3, seed=40 + cap)[cap]
    return Request(input_ids=ids, seed=seed, steps=steps, strategy=strategy, tag=i)


def run_all(engine, joins):
    out, t = {}, 0
    while engine.active() or any(k >= t for k in joins):
        if t in joins:
            engine.admit(joins[t])
        for f in engine.step():
            out[f.request.tag] = f
        t += 1
        assert t < 200
    return out


def test_engine_batch_invariance(tiny, tiny_fast):
    alone = [run_all(XUniterEngine(tiny_fast, slots=1, max_length=MAXLEN),
                     {0: [request(i)]})[i] for i in range(len(MIX))]
    e = XUniterEngine(tiny_fast, slots=3, max_length=MAXLEN)
    e.warmup()
    together = run_all(e, {0: [request(0), request(1)], 2: [request(2)], 5: [request(3)],
                           11: [request(4)]})
    assert sorted(together) == list(range(len(MIX)))
    for i, f in together.items():
        assert f.error is None and not f.cancelled
        assert torch.equal(f.ids, alone[i].ids)
        assert torch.equal(f.masks, alone[i].masks)
        assert torch.equal(f.codes, alone[i].codes)
        torch.testing.assert_close(f.probs, alone[i].probs, rtol=1e-3, atol=1e-6)
    # and alone equals the reference (a row whose caption is shorter than max_length included)
    strategy, steps, seed, cap = MIX[1]
    ref = ref_xuniter.sample(tiny, captions(3, seed=40 + cap)[cap:cap + 1], steps=steps,
                             strategy=strategy, seed=seed)
    assert torch.equal(ref.ids[0], alone[1].ids)


def test_temperature_sampling_is_seeded(tiny_fast):
    ids = captions(2, seed=9)
    a = xlx_fast.generate(tiny_fast, ids, steps=3, temperature=1.0, seed=5)
    b = xlx_fast.generate(tiny_fast, ids, steps=3, temperature=1.0, seed=5)
    assert torch.equal(a.ids, b.ids)


def test_tables_follow_weight_changes():
    model = sharpen(XUniterForImageGeneration.from_default(seed=6, size="tiny",
                                                           with_generator=False), 4.0)
    fast_model = copy.deepcopy(model)
    ids = captions(2, seed=1)
    first = xlx_fast.generate(fast_model, ids, steps=3)
    new = torch.randn(tuple(model.centroids.shape), generator=torch.Generator().manual_seed(9))
    for m in (model, fast_model):
        m.set_centroids(new)
    fast = xlx_fast.generate(fast_model, ids, steps=3)
    assert_same(ref_xuniter.sample(model, ids, steps=3), fast)
    assert not torch.equal(first.ids, fast.ids)


def test_bad_inputs(tiny, tiny_fast):
    lxmert = XLxmertForImageGeneration.from_default(seed=0, size="tiny", with_generator=False)
    with pytest.raises(TypeError, match="XUniterForImageGeneration"):
        XUniterEngine(lxmert, slots=1)
    with pytest.raises(TypeError, match="XUniterForImageGeneration"):
        ref_xuniter.sample(lxmert, captions(1), steps=1)
    with pytest.raises(ValueError, match="size"):
        XUniterForImageGeneration.from_default(size="huge")
    with pytest.raises(ValueError, match="max_length"):
        XUniterEngine(tiny_fast, slots=1, max_length=65)
    with pytest.raises(ValueError, match="out of range"):
        xlx_fast.generate(tiny_fast, torch.full((1, 5), 10 ** 6), steps=1)
    with pytest.raises(ValueError, match="out of range"):
        ref_xuniter.sample(tiny, torch.full((1, 5), -1), steps=1)
    e = XUniterEngine(tiny_fast, slots=2, max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        e.admit([Request(input_ids=captions(1)[0])])
    with pytest.raises(ValueError):
        e.admit([Request(input_ids=captions(1)[0, :8], strategy="tlbr", steps=65)])
    assert e.active() == 0
    with pytest.raises(ValueError, match="eval"):
        train = copy.deepcopy(tiny).train()
        ref_xuniter.sample(train, captions(1), steps=1)


def test_grid_16_generate_equals_reference():
    model = sharpen(XUniterForImageGeneration.from_default(seed=2, size="tiny", grid=16), 4.0)
    assert model.n_cells == 256 and model.generator.config.init_size == 16
    fast_model = copy.deepcopy(model)
    ids = captions(2, seed=33)
    ref = ref_xuniter.sample(model, ids, steps=4, seed=3)
    assert ref.ids.shape == (2, 256)
    assert_same(ref, xlx_fast.generate(fast_model, ids, steps=4, seed=3))


def test_bf16_runs_and_mostly_agrees_with_bf16_reference(tiny):
    model = copy.deepcopy(tiny).to(torch.bfloat16)
    ids = captions(2, seed=12)
    ref = ref_xuniter.sample(model, ids, steps=4)
    fast = xlx_fast.generate(copy.deepcopy(model), ids, steps=4)
    assert fast.codes.dtype == torch.bfloat16 and (fast.ids >= 0).all()
    assert (ref.ids == fast.ids).float().mean() > 0.7
