"""``xlx_fast.answer`` against ``reference.answer.answer_logits``, and each saving it takes.

The fast path optimizes the model it is given (fused attention, in place): every comparison runs
the reference on an unoptimized copy, in float64, so the bound of SPEC §4 (fp32: ‖out − ref‖ /
‖ref‖ ≤ 1e-5) measures the fast path's own rounding. The heads are sharpened (the last linear
scaled up) so that the answers' logits spread over several units and the best answer stands
clear of the second by far more than fp32 rounding: then equal ids are a fair demand (SPEC §4).
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

import xlx_fast
from xlx_fast import step_plan
from xlx_fast.answering import AnswerResult, _kept_length, answer
from xlx_fast.step_plan import language_first_row
from xlx_fast.models import XLxmertForImageGeneration, XLxmertForQuestionAnswering
from xlx_fast.patching import FusedLxmertAttention
from xlx_fast.reference.answer import answer_logits

FP32_BOUND = 1e-5
GAP = 1e-4  # logits further apart than this are ordered the same by any fp32 rounding here


def sharpen(model, factor=8.0):
    with torch.no_grad():
        model.answer_head.logit_fc[3].weight.mul_(factor)
    return model


@pytest.fixture(scope="module")
def models():
    """task -> (fast model, float64 reference copy of the same weights)."""
    out = {}
    for seed, task in enumerate(("vqa", "gqa", "nlvr2")):
        m = sharpen(XLxmertForQuestionAnswering.from_default(task, seed=seed, size="tiny"))
        out[task] = (m, copy.deepcopy(m).double())
    return out


def questions(b, length=13, seed=0):
    """b questions of mixed lengths ([CLS] ... [SEP] then padding), the longest shorter than
    ``length`` so that every batch has trailing padding to cut."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (b, length), generator=g)
    ids[:, 0] = 101
    for row in range(b):
        n = 3 + (4 * row + 5) % (length - 4)
        ids[row, n - 1] = 102
        ids[row, n:] = 0
    return ids, ids > 0


def visual(model, b, kind, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    lead = (b, 2) if model.task.images == 2 else (b,)
    if kind == "features":
        return dict(features=torch.randn(*lead, 64, model.feat_dim, generator=g))
    return dict(cluster_ids=torch.randint(0, model.n_clusters, (*lead, 64), generator=g))


def as_double(kw):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}


def reference(ref, ids, mask, **kw):
    with torch.no_grad():
        return answer_logits(ref, ids, mask, **as_double(kw))


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def assert_matches(result: AnswerResult, want: torch.Tensor, model, k):
    assert result.logits.dtype == torch.float32 and result.logits.shape == want.shape
    assert rel(result.logits, want) <= FP32_BOUND
    # the ids are equal wherever the reference's next logit is further away than fp32 rounding
    # can move one (logits of a few units: errors ~1e-6); with 3,129 answers the top two are
    # close, but not that close
    n = want.shape[1]
    top, ids = want.topk(min(k + 1, n), dim=1)
    gaps = top[:, :-1] - top[:, 1:]  # below each of the first min(k, n - 1) answers
    assert (gaps[:, 0] > GAP).all(), "a near tie for the best answer: sharpen the head"
    decided = (gaps > GAP).cumprod(dim=1).bool()  # every gap down to this rank is clear
    if k == n:  # the whole ranking: its last place follows from the others
        decided = torch.cat([decided, decided[:, -1:]], dim=1)
    assert ((result.top_ids == ids[:, :k]) | ~decided[:, :k]).all()
    # the scores are the task's: sigmoid (BCE-trained) or softmax over the classes (NLVR2)
    scores = want.softmax(1) if model.task.loss == "ce" else want.sigmoid()
    torch.testing.assert_close(result.top_scores.double(), scores.gather(1, result.top_ids),
                               rtol=1e-5, atol=1e-6)
    assert (result.top_scores[:, :-1] >= result.top_scores[:, 1:]).all()
    assert result.answers == [[model.labels[i] for i in row] for row in result.top_ids.tolist()]


@pytest.mark.parametrize("task", ["vqa", "gqa", "nlvr2"])
@pytest.mark.parametrize("b", [1, 3, 5])
@pytest.mark.parametrize("kind", ["features", "cluster_ids"])
def test_answer_equals_reference(models, task, b, kind):
    model, ref = models[task]
    ids, mask = questions(b, seed=b)
    kw = visual(model, b, kind, seed=b)
    k = 2 if task == "nlvr2" else 4
    assert_matches(answer(model, ids, mask, top_k=k, **kw), reference(ref, ids, mask, **kw), model, k)


def test_default_mask_top_k_and_fused_attention(models):
    model, ref = models["vqa"]
    ids, mask = questions(3)
    kw = visual(model, 3, "features")
    out = answer(model, ids, **kw)  # the mask defaults to input_ids != 0, top_k to 5
    assert_matches(out, reference(ref, ids, mask, **kw), model, 5)
    assert all(type(m.att) is FusedLxmertAttention for m in
               (x.visual_attention for x in model.bert.encoder.x_layers))
    nlvr2 = models["nlvr2"][0]
    assert answer(nlvr2, ids[:1], **visual(nlvr2, 1, "features")).top_ids.shape == (1, 2)


def test_answers_read_the_model_labels(models):
    model = copy.deepcopy(models["gqa"][0])
    model.labels = [f"word{i}" for i in range(model.n_answers)]
    out = answer(model, *questions(2), **visual(model, 2, "features"), top_k=3)
    assert out.answers == [[f"word{i}" for i in row] for row in out.top_ids.tolist()]


def test_the_last_layer_shortcut_reads_every_position(models):
    # Two questions equal in their [CLS] row and length but for one word: only the other
    # positions can tell them apart, through the last layer's self-attention keys and values
    # (and every earlier layer). The reference answers them differently; so must the fast path,
    # each exactly as the reference.
    model, ref = models["vqa"]
    ids, mask = questions(1, seed=4)
    other = ids.clone()
    other[0, 2] = ids[0, 2] + 7
    both, both_mask = torch.cat([ids, other]), torch.cat([mask, mask])
    kw = {k: v.expand(2, *v.shape[1:]) for k, v in visual(model, 1, "features").items()}
    want = reference(ref, both, both_mask, **kw)
    gap = (want[0] - want[1]).norm() / want[0].norm()
    assert gap > 100 * FP32_BOUND
    got = answer(model, both, both_mask, **kw).logits.double()
    assert rel(got[0], want[0]) <= FP32_BOUND and rel(got[1], want[1]) <= FP32_BOUND


@torch.no_grad()
def test_first_row_is_the_cls_row_of_hf_cross_layer(models):
    model, _ = models["vqa"]
    fast = model
    plain = xlx_fast.patching.unoptimize(copy.deepcopy(model))
    g = torch.Generator().manual_seed(5)
    h = model.config.hidden_size
    lang, vis = torch.randn(3, 9, h, generator=g), torch.randn(3, 64, h, generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 4:] = False
    ext = step_plan.extended_mask(model, mask)
    xlx_fast.optimize(fast)
    want = plain.bert.encoder.x_layers[-1](lang, ext, vis, None)[0][:, :1]
    got = language_first_row(fast.bert.encoder.x_layers[-1], lang, ext, vis)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the whole language output would differ at the other rows: only row 0 is claimed
    assert got.shape == (3, 1, h)


def test_trailing_padding_is_cut_exactly(models):
    model, ref = models["nlvr2"]
    ids, mask = questions(3, length=12)
    padded = torch.cat([ids, torch.zeros(3, 8, dtype=ids.dtype)], dim=1)
    padded_mask = padded > 0
    kw = visual(model, 3, "features")
    assert rel(answer(model, padded, padded_mask, **kw).logits, reference(ref, ids, mask, **kw)) <= FP32_BOUND
    assert _kept_length(padded_mask) == int(mask.sum(1).max())


def test_masks_with_holes_and_a_row_that_attends_to_nothing(models):
    # a zero inside a row is not trailing padding (nothing cut there); a row with no token at
    # all is averaged by HF over every key, padded ones included: nothing may be cut then
    model, ref = models["vqa"]
    ids, mask = questions(3, length=12)
    mask[0, 2] = False
    kw = visual(model, 3, "features")
    assert_matches(answer(model, ids, mask, top_k=3, **kw), reference(ref, ids, mask, **kw), model, 3)
    empty = mask.clone()
    empty[2] = False
    assert _kept_length(empty) == ids.shape[1]
    want = reference(ref, ids, empty, **kw)
    assert rel(answer(model, ids, empty, **kw).logits, want) <= FP32_BOUND
    assert _kept_length(torch.tensor([[True, False, True, False, False]])) == 3


def test_nlvr2_sees_its_two_images_in_order(models):
    model, ref = models["nlvr2"]
    ids, mask = questions(2)
    feats = visual(model, 2, "features")["features"]
    swapped = feats.flip(1)
    a = answer(model, ids, mask, features=feats).logits
    b = answer(model, ids, mask, features=swapped).logits
    assert (a - b).abs().max() > 1e-3
    assert rel(b, reference(ref, ids, mask, features=swapped)) <= FP32_BOUND


def test_results_are_fresh_and_weights_are_read_live(models):
    model = copy.deepcopy(models["vqa"][0])
    ref = copy.deepcopy(models["vqa"][1])
    ids, mask = questions(3)
    kw = visual(model, 3, "features")
    first = answer(model, ids, mask, **kw)
    first.logits.fill_(float("nan"))  # poison what the first call returned
    first.top_ids.fill_(-1)
    second = answer(model, ids, mask, **kw)
    assert torch.isfinite(second.logits).all() and (second.top_ids >= 0).all()
    assert second.logits.untyped_storage().data_ptr() != first.logits.untyped_storage().data_ptr()
    # an in-place edit of a weight (an FFN of a relational layer, a cross-attention projection,
    # the head) changes the next call exactly as it changes the reference
    for m in (model, ref):
        with torch.no_grad():
            m.bert.encoder.r_layers[0].intermediate.dense.weight.data.mul_(1.5)
            m.bert.encoder.x_layers[-1].visual_attention.att.key.weight.data.add_(0.25)
            m.answer_head.logit_fc[0].bias.data.add_(0.5)
    assert rel(answer(model, ids, mask, **kw).logits, reference(ref, ids, mask, **kw)) <= FP32_BOUND


def test_bf16_model_is_within_the_half_precision_bound(models):
    model, ref = models["gqa"]
    half = copy.deepcopy(model).to(torch.bfloat16)
    ids, mask = questions(3)
    kw = visual(model, 3, "features")
    out = answer(half, ids, mask, **kw)
    assert out.logits.dtype == torch.float32
    assert rel(out.logits, reference(ref, ids, mask, **kw)) <= 2e-2


@torch.no_grad()
def test_paint_then_ask():
    # an image painted by the tiny image model, asked about by the tiny answer model through its
    # own codebook (the same K = 97 at the tiny size)
    painter = XLxmertForImageGeneration.from_default(seed=2, size="tiny", with_generator=False)
    ids, mask = questions(2)
    painted = xlx_fast.generate(painter, ids, mask, steps=4).ids
    model = sharpen(XLxmertForQuestionAnswering.from_default("vqa", seed=7, size="tiny"))
    ref = copy.deepcopy(model).double()
    assert painter.centroids.shape[0] == model.n_clusters == 97
    assert painted.shape == (2, 64) and 0 <= painted.min() and painted.max() < model.n_clusters
    question, q_mask = questions(2, seed=9)
    out = answer(model, question, q_mask, cluster_ids=painted, top_k=3)
    assert_matches(out, reference(ref, question, q_mask, cluster_ids=painted), model, 3)


# -- bad input ------------------------------------------------------------------------------

def _bad_cases(model, nlvr2, no_codebook):
    ids, mask = questions(2)
    feats = visual(model, 2, "features")["features"]
    cids = visual(model, 2, "cluster_ids")["cluster_ids"]
    pair = visual(nlvr2, 2, "features")["features"]
    f = model.feat_dim
    return [
        # (model, args, kwargs, exception, message fragment)
        (copy.deepcopy(model).train(), (ids,), dict(features=feats), ValueError, "eval"),
        (torch.nn.Linear(2, 2), (ids,), dict(features=feats), TypeError, "model"),
        (model, (ids.tolist(),), dict(features=feats), TypeError, "input_ids"),
        (model, (ids.float(),), dict(features=feats), TypeError, "input_ids"),
        (model, (ids[0],), dict(features=feats), ValueError, "input_ids"),
        (model, (ids[:, :0],), dict(features=feats[:, :0]), ValueError, "input_ids"),
        (model, (ids + 10 ** 6,), dict(features=feats), ValueError, "input_ids out of range"),
        (model, (torch.zeros(2, 80, dtype=torch.long),), dict(features=feats), ValueError,
         "max_position_embeddings"),
        (model, (ids, mask[:, :5]), dict(features=feats), ValueError, "attention_mask"),
        (model, (ids, mask.long() * 7), dict(features=feats), ValueError, "attention_mask"),
        (model, (ids, mask.tolist()), dict(features=feats), TypeError, "attention_mask"),
        (model, (ids,), {}, ValueError, "exactly one of features and cluster_ids"),
        (model, (ids,), dict(features=feats, cluster_ids=cids), ValueError, "exactly one"),
        (model, (ids,), dict(features=feats.numpy()), TypeError, "features"),
        (model, (ids,), dict(features=feats.long()), TypeError, "features"),
        (model, (ids,), dict(features=feats[:, :63]), ValueError,
         re.escape(f"features must have shape [2, 64, {f}]")),
        (model, (ids,), dict(features=feats[..., :-1]), ValueError, "features"),
        (model, (ids,), dict(features=feats[:1]), ValueError, "features"),
        (model, (ids,), dict(features=feats[:, None]), ValueError, "one image per example"),
        (nlvr2, (ids,), dict(features=pair[:, 0]), ValueError, "two images per example"),
        (nlvr2, (ids,), dict(features=pair[:, :1]), ValueError,
         re.escape("features must have shape [2, 2, 64")),
        (nlvr2, (ids,), dict(cluster_ids=cids), ValueError, "two images per example"),
        (model, (ids,), dict(cluster_ids=cids.float()), TypeError, "cluster_ids"),
        (model, (ids,), dict(cluster_ids=cids.bool()), TypeError, "cluster_ids"),
        (model, (ids,), dict(cluster_ids=cids[:, :10]), ValueError,
         re.escape("cluster_ids must have shape [2, 64]")),
        (model, (ids,), dict(cluster_ids=cids + model.n_clusters), ValueError, "cluster_ids out of range"),
        (model, (ids,), dict(cluster_ids=cids - 100), ValueError, "cluster_ids out of range"),
        (no_codebook, (ids,), dict(cluster_ids=cids), ValueError, "codebook"),
        (model, (ids,), dict(features=feats, top_k=0), ValueError, "top_k"),
        (model, (ids,), dict(features=feats, top_k=model.n_answers + 1), ValueError, "top_k"),
        (model, (ids,), dict(features=feats, top_k=2.0), TypeError, "top_k"),
        (model, (ids,), dict(features=feats, top_k=True), TypeError, "top_k"),
        (nlvr2, (ids,), dict(features=pair, top_k=3), ValueError, r"top_k must lie in \[1, 2\]"),
        (copy.deepcopy(model).double(), (ids,), dict(features=feats), TypeError, "float32"),
    ]


def test_bad_inputs_raise_naming_the_argument(models):
    model, nlvr2 = models["vqa"][0], models["nlvr2"][0]
    no_codebook = copy.deepcopy(model)
    no_codebook.vis_emb = None
    for m, args, kwargs, exc, match in _bad_cases(model, nlvr2, no_codebook):
        with pytest.raises(exc, match=match):
            answer(m, *args, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_is_refused(models):
    model = models["vqa"][0]
    ids, mask = questions(1)
    feats = visual(model, 1, "features")["features"]
    with pytest.raises(ValueError, match="input_ids is on"):
        answer(model, ids.cuda(), features=feats)
    with pytest.raises(ValueError, match="features is on"):
        answer(model, ids, features=feats.cuda())


def test_device_mismatch_is_refused_on_the_meta_device(models):
    # no GPU needed: a tensor on the meta device is on another device as much as a CUDA one
    model = models["vqa"][0]
    ids, mask = questions(1)
    feats = visual(model, 1, "features")["features"]
    cids = visual(model, 1, "cluster_ids")["cluster_ids"]
    with pytest.raises(ValueError, match="features is on meta"):
        answer(model, ids, features=feats.to("meta"))
    with pytest.raises(ValueError, match="cluster_ids is on meta"):
        answer(model, ids, cluster_ids=cids.to("meta"))
    with pytest.raises(ValueError, match="attention_mask is on meta"):
        answer(model, ids, mask.to("meta"), features=feats)


def test_non_finite_features_name_the_row(models):
    model = models["vqa"][0]
    ids, mask = questions(3)
    feats = visual(model, 3, "features")["features"]
    feats[1, 5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        answer(model, ids, mask, features=feats)


def test_the_head_takes_the_fused_op(models):
    # HF's GeLU in the head is torch's erf GELU, what fused_linear computes: the fused path is
    # taken (a changed head would run its own modules)
    from xlx_fast.answering import _erf_gelu

    assert _erf_gelu(models["vqa"][0].answer_head.logit_fc[1])
    assert _erf_gelu(torch.nn.GELU()) and not _erf_gelu(torch.nn.GELU(approximate="tanh"))
    assert not _erf_gelu(torch.nn.ReLU())


def test_strided_features_are_read_as_given(models):
    model, ref = models["vqa"]
    ids, mask = questions(2)
    feats = visual(model, 2, "features")["features"]
    strided = feats.transpose(1, 2).contiguous().transpose(1, 2)  # same values, last dim strided
    assert strided.stride(-1) != 1
    assert rel(answer(model, ids, mask, features=strided).logits,
               reference(ref, ids, mask, features=feats)) <= FP32_BOUND


def test_lazy_export():
    assert xlx_fast.answer is answer


def test_the_benchmark_case_agrees_at_tiny_size():
    from xlx_fast.bench import cases as bench_cases
    from xlx_fast.bench import harness

    spec = harness.Spec(device="cpu", dtypes=(torch.float32, torch.bfloat16), quick=True, size="tiny")
    try:
        found = bench_cases.cases("answer", spec)
        assert {c.shape.split()[0] for c in found} == {"vqa", "nlvr2"}
        for case in found:
            rows = harness.run_case(case, {}, {}, harness.SMOKE)
            (fast,) = [r for r in rows if r["backend"] == "xlx_fast.answer"]
            assert fast["agreement_ok"] and fast["fast_ms"] > 0
            assert fast["agreement_extra"]["top-1 agree"] >= 0.5
            if case.dtype != torch.float32:  # a half row is also measured against fp32
                assert {"fp32-ref err", "ref-vs-fp32 err"} <= set(fast["agreement_extra"])
            (peer,) = [r for r in rows if r["kind"] == harness.PEER]
            assert "--quick" in peer["note"]  # the compiled peer runs in the full sweep only
    finally:
        bench_cases.release("answer")
