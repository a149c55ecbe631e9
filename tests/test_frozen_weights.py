"""``xlx_fast.freeze``: packed CPU GEMMs (``ops.frozen_weights``) that equal what they replace.

The packed path must give F.linear's product (checked against float64 on awkward shapes), run
where it is meant to (counted: the packed copies a call built), follow every edit torch counts,
and leave alone what it is not for: unfrozen models, calls that need a gradient, other dtypes.
The task-level tests run ``answer``, ``generate`` and ``caption`` frozen against their eager
references, as the unfrozen tests do.
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xlx_fast
from xlx_fast.freezing import is_frozen
from xlx_fast.models import XLxmertForImageGeneration, XLxmertForQuestionAnswering
from xlx_fast.ops import frozen_weights
from xlx_fast.reference.answer import answer_logits

from test_answering import as_double, questions, sharpen, visual
from test_generation import assert_same, captions
from test_generation import sharpen as sharpen_image_head


def rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_packed_gemms_run_on_this_machine():
    # the x86 torch wheels carry MKL; without it freezing would change nothing at all
    assert frozen_weights.available()


@pytest.mark.parametrize("m,k,n", [(3, 33, 17), (7, 64, 130), (64, 96, 255), (130, 48, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear(m, k, n, bias):
    g = torch.Generator().manual_seed(m * 1000 + n)
    layer = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(n, generator=g))
    frozen_weights.register(layer)
    x = torch.randn(2, m, k, generator=g)  # a leading batch dimension, flattened inside
    with torch.no_grad():
        out = frozen_weights.linear(x, layer.weight, layer.bias)
    assert frozen_weights.packed_count(layer) == 1  # it ran packed
    want = F.linear(x.double(), layer.weight.double(), None if not bias else layer.bias.double())
    assert out.shape == (2, m, n) and out.dtype == torch.float32
    assert rel(out, want) <= 1e-6
    # a row slice of the weight (the fused [Q; K; V] matrix's [K; V]) is a view of its own
    with torch.no_grad():
        part = frozen_weights.linear(x, layer.weight[n // 2:], None if not bias else layer.bias[n // 2:])
    assert frozen_weights.packed_count(layer) == 2
    assert rel(part, want[..., n // 2:]) <= 1e-6


def test_unfrozen_other_dtype_and_gradients_run_unpacked():
    layer = nn.Linear(24, 40)
    x = torch.randn(5, 24)
    with torch.no_grad():
        frozen_weights.linear(x, layer.weight, layer.bias)
    assert frozen_weights.packed_count(layer) == 0 and not is_frozen(layer)
    frozen_weights.register(layer)
    with torch.no_grad():  # up to 4 rows: MKL's matrix-vector path, as fast on the plain weight
        frozen_weights.linear(x[:4], layer.weight, layer.bias)
    assert frozen_weights.packed_count(layer) == 0
    y = frozen_weights.linear(x.requires_grad_(), layer.weight, layer.bias)  # autograd needs F.linear
    y.sum().backward()
    assert frozen_weights.packed_count(layer) == 0 and x.grad is not None
    with torch.no_grad():
        frozen_weights.linear(x.double(), layer.weight.double(), layer.bias.double())  # a new tensor
    assert frozen_weights.packed_count(layer) == 0


def test_a_counted_edit_repacks_and_unfreeze_and_collection_drop_the_copies():
    layer = nn.Linear(16, 32)
    x = torch.randn(9, 16)
    xlx_fast.freeze(layer)
    with torch.no_grad():
        before = frozen_weights.linear(x, layer.weight, layer.bias)
        layer.weight.mul_(2.0)  # the version counter moves
        after = frozen_weights.linear(x, layer.weight, layer.bias)
    assert rel(after - layer.bias, 2.0 * (before - layer.bias)) <= 1e-6
    xlx_fast.unfreeze(layer)
    assert not is_frozen(layer) and frozen_weights.packed_count(layer) == 0
    n_tables, n_storages = len(frozen_weights._TABLES), len(frozen_weights._BY_STORAGE)
    xlx_fast.freeze(layer)
    xlx_fast.freeze(layer)  # again: replaces its table
    assert len(frozen_weights._TABLES) == n_tables + 1
    assert len(frozen_weights._BY_STORAGE) == n_storages + 2  # weight and bias
    del layer
    gc.collect()
    assert len(frozen_weights._TABLES) == n_tables  # weakly held: freed with the model
    assert len(frozen_weights._BY_STORAGE) == n_storages


def bf16_layer(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(k, n).bfloat16()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g))
        layer.bias.copy_(torch.randn(n, generator=g))
    return xlx_fast.freeze(layer), g


def bf16_bound(out, x, layer):
    """|out - x·Wᵀ - b| within the rounding of a bfloat16 result of an fp32 accumulation: half
    a bf16 ulp of the value (2^-9 relative) plus the fp32 sum's error (k·2^-24 of Σ|x||w|)."""
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    scale = F.linear(x.double().abs(), layer.weight.double().abs(), layer.bias.double().abs())
    return bool(((out.double() - exact).abs() <= 2.0 ** -8 * exact.abs()
                 + x.shape[-1] * 2.0 ** -23 * scale + 1e-30).all())


@pytest.mark.parametrize("rows", [1, 3, 20, 84, frozen_weights.BF16_MAX_ROWS])
def test_bf16_weights_run_packed_where_this_cpu_multiplies_bf16(rows):
    """bfloat16: packed (oneDNN) from 1 row up to BF16_MAX_ROWS where the CPU multiplies it
    natively, F.linear elsewhere; the product is F.linear's within bfloat16 rounding either way,
    and a counted edit is repacked."""
    layer, g = bf16_layer(72, 130, rows)
    x = torch.randn(rows, 72, generator=g).bfloat16()
    with torch.no_grad():
        out = frozen_weights.linear(x, layer.weight, layer.bias)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 130)
        assert bf16_bound(out, x, layer)
        assert frozen_weights.packed_count(layer) == int(frozen_weights.available(torch.bfloat16))
        assert frozen_weights.is_packed(layer.weight, rows) == frozen_weights.available(torch.bfloat16)
        layer.weight.mul_(-0.5)  # exact in bf16: a counted edit
        assert bf16_bound(frozen_weights.linear(x, layer.weight, layer.bias), x, layer)


def test_bf16_weights_beyond_the_packed_rows_or_without_native_bf16_run_f_linear(monkeypatch):
    layer, g = bf16_layer(40, 24, 7)
    x = torch.randn(frozen_weights.BF16_MAX_ROWS + 1, 40, generator=g).bfloat16()
    with torch.no_grad():
        assert torch.equal(frozen_weights.linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
        assert frozen_weights.packed_count(layer) == 0
        assert not frozen_weights.is_packed(layer.weight, x.shape[0])
        monkeypatch.setitem(frozen_weights._USABLE, torch.bfloat16, False)  # a CPU without AMX/AVX512-BF16
        assert torch.equal(frozen_weights.linear(x[:5], layer.weight, layer.bias),
                           F.linear(x[:5], layer.weight, layer.bias))
        assert frozen_weights.packed_count(layer) == 0 and not frozen_weights.is_packed(layer.weight)
        # a float32 input against bf16 weights is F.linear's error, not a packed call's
        with pytest.raises(RuntimeError):
            frozen_weights.linear(x.float(), layer.weight, layer.bias)


@pytest.fixture(scope="module")
def answer_models():
    """task -> (frozen fast model, float64 unfrozen reference copy)."""
    out = {}
    for seed, task in enumerate(("vqa", "nlvr2")):
        m = sharpen(XLxmertForQuestionAnswering.from_default(task, seed=seed + 3, size="tiny"))
        ref = copy.deepcopy(m).double()
        out[task] = (xlx_fast.freeze(m), ref)
    return out


def reference_logits(ref, ids, mask, kw):
    with torch.no_grad():
        return answer_logits(ref, ids, mask, **as_double(kw))


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
@pytest.mark.parametrize("b", [1, 5])
def test_frozen_answer_equals_reference(answer_models, task, b):
    model, ref = answer_models[task]
    ids, mask = questions(b, seed=b + 20)
    kw = visual(model, b, "features", seed=b + 20)
    got = xlx_fast.answer(model, ids, mask, top_k=2, **kw)
    want = reference_logits(ref, ids, mask, kw)
    assert rel(got.logits, want) <= 1e-5
    assert torch.equal(got.top_ids[:, 0], want.argmax(1))
    # every linear of the encoder, the cross layers' fused projections and the head ran packed
    enc = model.bert.encoder
    n_layers = len(enc.layer) + len(enc.r_layers) + len(enc.x_layers)
    assert frozen_weights.packed_count(model) >= 3 * n_layers


def test_frozen_answer_follows_counted_edits_and_a_refreeze_sees_the_rest():
    model = xlx_fast.freeze(sharpen(XLxmertForQuestionAnswering.from_default("vqa", seed=7, size="tiny")))
    ids, mask = questions(3, seed=5)
    kw = visual(model, 3, "cluster_ids", seed=5)
    xlx_fast.answer(model, ids, mask, **kw)  # packs
    att = model.bert.encoder.x_layers[-1].visual_attention.att
    with torch.no_grad():  # counted: in-place ops on the parameters (a fused view, a plain weight)
        att.key.weight.add_(0.25)
        model.bert.encoder.r_layers[0].intermediate.dense.weight.mul_(1.5)
    assert rel(xlx_fast.answer(model, ids, mask, **kw).logits,
               reference_logits(copy.deepcopy(model).double(), ids, mask, kw)) <= 1e-5
    other = sharpen(XLxmertForQuestionAnswering.from_default("vqa", seed=8, size="tiny"))
    model.load_state_dict(other.state_dict())  # counted: copy_ into every parameter
    assert rel(xlx_fast.answer(model, ids, mask, **kw).logits,
               reference_logits(copy.deepcopy(other).double(), ids, mask, kw)) <= 1e-5
    # not counted (the promise freezing asks for): freezing again repacks from the values
    model.bert.encoder.layer[0].output.dense.weight.data.mul_(-1.0)
    xlx_fast.freeze(model)
    assert rel(xlx_fast.answer(model, ids, mask, **kw).logits,
               reference_logits(copy.deepcopy(model).double(), ids, mask, kw)) <= 1e-5


@pytest.mark.parametrize("strategy,steps", [("mask_predict", 4), ("confidence", 7)])
def test_frozen_generate_equals_reference(strategy, steps):
    ref_model = sharpen_image_head(XLxmertForImageGeneration.from_default(seed=1, size="tiny"), 3.0)
    fast_model = xlx_fast.freeze(copy.deepcopy(ref_model))
    ids = captions(3)
    want = xlx_fast.reference.sample(ref_model, ids, steps=steps, strategy=strategy, seed=11)
    got = xlx_fast.generate(fast_model, ids, steps=steps, strategy=strategy, seed=11)
    assert_same(want, got)
    assert frozen_weights.packed_count(fast_model) > 0


@pytest.mark.parametrize("arch", ["xlxmert", "xuniter"])
def test_a_frozen_model_tables_follow_counted_edits_only_and_its_engine_head_runs_packed(arch):
    """A frozen model's derived tables (projected codebook, folded head) keep no bitwise copy:
    a counted edit of a source rebuilds them, an uncounted one is not seen until freeze() again
    (the promise), and the engine's head multiplies from a packed copy that dies with it."""
    from xlx_fast.models import from_default

    model = xlx_fast.freeze(sharpen_image_head(from_default(arch, seed=2, size="tiny"), 3.0))
    plans = {"xlxmert": "_xlx_fast_tables", "xuniter": "_xlx_xuniter_tables"}
    ids = captions(2)

    def run():
        return xlx_fast.generate(model, ids, steps=3, seed=5)

    first = run()
    tables = getattr(model, plans[arch])
    assert tables.sources.snapshot is None and tables.sources.frozen == 1
    (engine,) = model.__dict__["_xlx_engines"].values()
    assert frozen_weights.is_packed(engine.head_weight)
    codebook = model.vis_emb.weight
    codebook.data.copy_(torch.roll(codebook.data, 1, dims=0))  # uncounted: not seen while frozen
    assert torch.equal(run().ids, first.ids) and getattr(model, plans[arch]) is tables
    xlx_fast.freeze(model)  # a new promise: the tables are rebuilt from the values
    moved = run()
    assert getattr(model, plans[arch]) is not tables and not torch.equal(moved.ids, first.ids)
    tables = getattr(model, plans[arch])
    with torch.no_grad():
        codebook.copy_(torch.roll(codebook, -1, dims=0))  # counted: rebuilt at once
    assert torch.equal(run().ids, first.ids) and getattr(model, plans[arch]) is not tables
    ptr = engine.head_weight.untyped_storage().data_ptr()
    assert frozen_weights._BY_STORAGE.get(ptr) is not None
    del engine
    model.__dict__.pop("_xlx_engines").clear()
    gc.collect()
    assert frozen_weights._BY_STORAGE.get(ptr) is None  # gone with the engine: the address is free


def test_server_models_are_frozen():
    from xlx_fast.serving.model_spec import ModelSpec

    spec = ModelSpec(size="tiny", answer_task="vqa")
    model, _ = spec.build()
    assert is_frozen(model)
    assert is_frozen(spec.build_answer_model(model.centroids))


def test_a_frozen_question_runs_at_its_own_length(monkeypatch):
    """Unfrozen, a batch-1 question of 5..15 tokens is padded to 16 rows on a CPU (MKL's GEMM
    of fewer rows is slower, ``ops._common.cpu_gemm_rows``); against packed weights fewer rows
    cost less, so a frozen model runs the question as it is."""
    from xlx_fast import answering

    seen = []
    language = answering.step_plan.language
    monkeypatch.setattr(answering.step_plan, "language",
                        lambda model, ids, ext: seen.append(ids.shape[1]) or language(model, ids, ext))
    model = sharpen(XLxmertForQuestionAnswering.from_default("vqa", seed=9, size="tiny"))
    ids, mask = questions(1, length=20, seed=3)
    kw = visual(model, 1, "features", seed=3)
    n = int(mask.sum())
    assert 4 < n < 16
    unfrozen = xlx_fast.answer(copy.deepcopy(model), ids, mask, **kw).logits
    frozen = xlx_fast.answer(xlx_fast.freeze(model), ids, mask, **kw).logits
    assert seen == [16, n]
    assert rel(frozen, unfrozen) <= 1e-5


def test_the_compile_peer_of_a_frozen_row_compiles_with_freezing():
    """Where the fast row's weights are packed, its torch.compile peer gets the same promise
    (inductor's freezing=True during its calls, said in its note); elsewhere it does not."""
    import torch._inductor.config as inductor_config

    from xlx_fast.bench.cases import compiled, frozen
    from xlx_fast.bench.harness import Spec

    spec = Spec(device=torch.device("cpu"), dtypes=(torch.float32,), quick=False, size="tiny")
    assert frozen.peer_freezes(torch.device("cpu"), torch.float32)
    assert (frozen.peer_freezes(torch.device("cpu"), torch.bfloat16)
            == frozen_weights.available(torch.bfloat16))
    assert not frozen.peer_freezes(torch.device("cpu"), torch.float16)
    assert not frozen.peer_freezes(torch.device("meta"), torch.float32)  # not a CPU
    seen = []
    for freezing in (True, False):
        timer = compiled.FirstCallTimer(lambda: seen.append(inductor_config.freezing), spec,
                                        freezing=freezing)
        timer()
        timer()
        assert ("freezing=True" in timer.note()) == freezing
    assert seen == [True, True, False, False] and inductor_config.freezing is False
