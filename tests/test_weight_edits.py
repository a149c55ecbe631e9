"""Whatever route changes a weight, the next ``generate`` computes with the new weight.

``p.data.copy_`` and a numpy view bypass a parameter's version counter and data pointer, the
ones a cache keyed on those misses (a write through ``p.detach()`` bumps the shared counter in
torch 2.13, but nothing here relies on that); each route is applied to a source of every
derived table (codebook, out_cluster bias, mask feature) and to the fused attention
projections (q, k, v), after a first ``generate`` filled every cache.
"""
import copy

import pytest
import torch

import xlx_fast
from xlx_fast import reference
from xlx_fast.models import XLxmertForImageGeneration

from test_generation import captions, sharpen


def _data_copy(p, new):
    p.data.copy_(new)


def _detach_view(p, new):
    p.detach().copy_(new)


def _numpy_view(p, new):
    p.detach().numpy()[...] = new.numpy()


QKV = ("query", "key", "value")
ROUTES = {"data_copy": _data_copy, "detach_view": _detach_view, "numpy_view": _numpy_view}

PARAMS = {
    "centroids": lambda m: m.vis_emb.weight,
    "out_cluster_bias": lambda m: m.obj_predict_head.out_cluster.bias,
    "mask_feat": lambda m: m.mask_feat,
    "query": lambda m: m.bert.encoder.r_layers[0].attention.self.query.weight,
    "key": lambda m: m.bert.encoder.x_layers[0].visual_attention.att.key.weight,
    "value": lambda m: m.bert.encoder.layer[1].attention.self.value.weight,
}


def _new_value(p, seed, gain=2.0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(tuple(p.shape), generator=g)
    scale = float(p.detach().float().std()) or 1.0
    return (p.detach().float() + gain * scale * noise).to(p.dtype)


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("param", sorted(PARAMS))
def test_next_generate_sees_the_edit(route, param):
    model = sharpen(XLxmertForImageGeneration.from_default(seed=1, size="tiny"), 3.0).eval()
    fast = copy.deepcopy(model)
    ids = captions(2, seed=6)
    before = xlx_fast.generate(fast, ids, steps=4, strategy="mask_predict")
    # the tiny model's outputs move little with its projections and bias: large changes
    gain = 200.0 if param in QKV else 40.0 if param == "out_cluster_bias" else 2.0
    new = _new_value(PARAMS[param](model), seed=len(param), gain=gain)
    PARAMS[param](model).data.copy_(new)
    ROUTES[route](PARAMS[param](fast), new)
    ref = reference.sample(model, ids, steps=4, strategy="mask_predict")
    after = xlx_fast.generate(fast, ids, steps=4, strategy="mask_predict")
    # the edit matters: its effect on the probabilities is far above the tolerance below
    # (the fast loop rounds differently from the reference: about 1e-7 here)
    assert (before.probs - ref.probs).abs().max() > 1e-4
    assert torch.equal(after.ids, ref.ids) and torch.equal(after.masks, ref.masks)
    assert torch.equal(after.codes, ref.codes)
    torch.testing.assert_close(after.probs, ref.probs, rtol=1e-5, atol=1e-5)


def test_engine_snapshots_tables_until_reload():
    from xlx_fast.engine import Engine, Request

    model = sharpen(XLxmertForImageGeneration.from_default(seed=1, size="tiny"), 3.0).eval()
    fast = copy.deepcopy(model)
    ids = captions(1, seed=2)[0, :6]
    engine = Engine(fast, slots=1, max_length=6)

    def run():
        engine.admit([Request(input_ids=ids, steps=4)])
        return engine.step() or engine.step() or engine.step() or engine.step()

    first = run()[0]
    new = _new_value(model.vis_emb.weight, seed=1)
    model.vis_emb.weight.data.copy_(new)
    _numpy_view(fast.vis_emb.weight, new)
    ref = reference.sample(model, ids[None], steps=4)
    stale = run()[0]
    assert torch.equal(stale.masks, first.masks)  # the engine reads its snapshot: documented
    engine.reload()
    fresh = run()[0]
    assert torch.equal(fresh.ids, ref.ids[0]) and torch.equal(fresh.codes, ref.codes[0])


def test_attention_projections_are_views_of_the_fused_matrix():
    model = XLxmertForImageGeneration.from_default(seed=4, size="tiny").eval()
    xlx_fast.optimize(model)
    att = model.bert.encoder.layer[0].attention.self
    w, b = att._fused_weights()
    h = att.query.out_features
    att.key.weight.data.copy_(torch.ones_like(att.key.weight))
    assert torch.equal(w[h:2 * h], torch.ones_like(att.key.weight))
    # a parameter that stops being a view (a new tensor assigned) is re-fused on the next call
    att.value.weight.data = torch.full_like(att.value.weight, 2.0)
    w2, _ = att._fused_weights()
    assert torch.equal(w2[2 * h:], torch.full_like(att.value.weight, 2.0))
    assert att.value.weight.data_ptr() == w2[2 * h:].data_ptr()


@pytest.mark.parametrize("one_sync", [False, True])
def test_bitwise_comparison_both_ways(one_sync):
    """The staleness check's two forms (torch.equal per source on a CPU, one flag read back on a
    GPU) agree: equal bits pass, one flipped value, a -0 for a +0 fail, NaN equals itself."""
    from xlx_fast.model_tables import _bits, _same_bits

    g = torch.Generator().manual_seed(0)
    a = [torch.randn(37, 5, generator=g), torch.randn(11, generator=g).to(torch.bfloat16),
         torch.tensor([float("nan"), 0.0, 1.0])]
    snap = [_bits(t).clone() for t in a]  # as prepare() stores it
    assert _same_bits(list(zip(a, snap)), one_sync)
    for i, idx in ((0, (36, 4)), (1, (3,)), (2, (1,))):
        edited = [t.clone() for t in a]
        edited[i][idx] = -0.0 if i == 2 else edited[i][idx] + 1  # -0 differs from +0 in bits
        assert not _same_bits(list(zip(edited, snap)), one_sync), i


def test_a_replaced_parameter_gets_a_new_engine():
    """CUDA graphs hold parameter addresses: a Parameter assigned in place of another (new
    storage) must key a new engine, and the cached slot list must see the new tensor."""
    from xlx_fast.generation import storage_key

    model = XLxmertForImageGeneration.from_default(seed=0, size="tiny", with_generator=False).eval()
    ids = captions(1, seed=3)
    xlx_fast.generate(model, ids, steps=2)
    key, engines = storage_key(model), dict(model._xlx_engines)
    assert storage_key(model) == key  # stable while nothing changes
    dense = model.bert.encoder.x_layers[0].visn_output.dense
    dense.weight = torch.nn.Parameter(dense.weight.detach().clone() * 1.5)
    assert storage_key(model) != key
    xlx_fast.generate(model, ids, steps=2)
    assert set(model._xlx_engines) - set(engines)  # a new engine for the new storage
