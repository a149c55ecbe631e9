"""``xlx_fast.caption`` against ``reference.caption``, word for word, and the caption engine's
per-row contract (a caption depends only on its own image and parameters).

The masked-LM head of the random-weight model is nearly flat (every word ~1/30522), so words
would hang on float rounding; the tests sharpen it (the transform's LayerNorm scale) so that
the best word stands clear of the second, and then demand exact equality (SPEC §4).
"""
import copy

import pytest
import torch

import xlx_fast
from xlx_fast.caption_engine import CaptionEngine, CaptionRequest
from xlx_fast.caption_io import MASK_ID, MAX_WORDS, SPECIAL_IDS, layout
from xlx_fast.models import XLxmertForImageGeneration
from xlx_fast.reference.caption import caption as reference_caption
from xlx_fast.reference.grid import box_positions

STRATEGIES = ["mask_predict", "confidence", "tlbr", "random"]


def sharpen_words(model, factor=40.0):
    with torch.no_grad():
        model.cls.predictions.transform.LayerNorm.weight.mul_(factor)
    return model


@pytest.fixture(scope="module")
def tiny():
    """The reference's model: never optimized."""
    model = XLxmertForImageGeneration.from_default(seed=3, size="tiny", with_generator=False,
                                                   pretraining_heads=True)
    return sharpen_words(model).eval()


@pytest.fixture(scope="module")
def tiny_fast(tiny):
    return copy.deepcopy(tiny)


def images(b, seed=0, k=97):
    return torch.randint(0, k, (b, 64), generator=torch.Generator().manual_seed(seed))


def assert_same(ref, got):
    assert torch.equal(ref.ids, got.ids)
    assert torch.equal(ref.masks, got.masks)
    assert torch.equal(ref.lengths, got.lengths)
    torch.testing.assert_close(ref.probs, got.probs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("lengths", [[5], [7, 1, 13], [18, 4, 9, 2, 11]])
def test_fast_equals_reference(tiny, tiny_fast, strategy, lengths):
    b = len(lengths)
    ids = images(b, seed=len(lengths))
    seeds = [11 * r + 1 for r in range(b)]
    ref = reference_caption(tiny, cluster_ids=ids, length=lengths, strategy=strategy, seed=seeds)
    got = xlx_fast.caption(tiny_fast, cluster_ids=ids, length=lengths, strategy=strategy, seed=seeds)
    assert_same(ref, got)
    # every word was decided (default steps cover every word), and none is a special token
    assert bool((got.ids[got.ids >= 0] >= 0).all())
    for r, n in enumerate(lengths):
        assert not set(got.ids[r, :n].tolist()) & set(SPECIAL_IDS)


@pytest.mark.parametrize("strategy,steps", [("mask_predict", 1), ("mask_predict", 7),
                                            ("mask_predict", 30), ("confidence", 3),
                                            ("tlbr", 2), ("random", 25)])
def test_step_counts_including_fewer_and_more_steps_than_words(tiny, tiny_fast, strategy, steps):
    ids, lengths = images(3, seed=5), [6, 9, 4]
    if strategy in ("confidence", "tlbr"):
        lengths = [max(n, steps) for n in lengths]
    ref = reference_caption(tiny, cluster_ids=ids, length=lengths, steps=steps, strategy=strategy, seed=4)
    got = xlx_fast.caption(tiny_fast, cluster_ids=ids, length=lengths, steps=steps, strategy=strategy,
                           seed=4)
    assert_same(ref, got)
    if strategy in ("confidence", "tlbr") and steps < min(lengths):
        assert bool((got.ids[0, :lengths[0]] == -1).any())  # undecided words stay -1


def test_features_input_equals_reference(tiny, tiny_fast):
    feats = torch.randn(2, 64, tiny.feat_dim, generator=torch.Generator().manual_seed(9))
    ref = reference_caption(tiny, features=feats, length=[8, 5])
    got = xlx_fast.caption(tiny_fast, features=feats, length=[8, 5])
    assert_same(ref, got)


def test_the_image_matters(tiny_fast):
    a = xlx_fast.caption(tiny_fast, cluster_ids=images(1, seed=1), length=10)
    b = xlx_fast.caption(tiny_fast, cluster_ids=images(1, seed=2), length=10)
    assert not torch.equal(a.ids, b.ids)


def test_special_tokens_are_never_written_even_when_their_logits_lead(tiny, tiny_fast):
    ref_model, fast_model = copy.deepcopy(tiny), copy.deepcopy(tiny_fast)
    for m in (ref_model, fast_model):
        with torch.no_grad():
            m.cls.predictions.bias[list(SPECIAL_IDS)] = 1e4  # far above every word
    ids = images(2, seed=8)
    ref = reference_caption(ref_model, cluster_ids=ids, length=6)
    got = xlx_fast.caption(fast_model, cluster_ids=ids, length=6)
    assert_same(ref, got)
    assert not set(got.ids.flatten().tolist()) & set(SPECIAL_IDS)


def test_hf_stream_equals_the_reference_step(tiny):
    """The reference's forward is HF's: its first step's words are the argmax of
    cls.predictions over the language output of [CLS] [MASK]… [SEP]."""
    ids = images(1, seed=3)
    tokens, mask = layout([5])
    out = tiny.bert(input_ids=tokens, visual_feats=tiny.centroids[ids], attention_mask=mask,
                    visual_pos=box_positions(8).expand(1, -1, -1), return_dict=True)
    logits = tiny.cls.predictions(out.language_output)[:, 1:6]
    logits[..., list(SPECIAL_IDS)] = float("-inf")
    ref = reference_caption(tiny, cluster_ids=ids, length=5, steps=1)
    assert torch.equal(ref.ids, logits.argmax(-1))


def test_a_caption_does_not_depend_on_its_neighbours_or_when_it_joined(tiny_fast):
    model = tiny_fast
    alone = [xlx_fast.caption(model, cluster_ids=images(1, seed=s), length=n, seed=s,
                              strategy=st, temperature=t)
             for s, n, st, t in ((1, 7, "mask_predict", 0.0), (2, 12, "random", 0.0),
                                 (3, 5, "mask_predict", 0.7))]
    engine = CaptionEngine(model, slots=3)
    reqs = [CaptionRequest(cluster_ids=images(1, seed=s)[0], length=n, seed=s, strategy=st,
                           temperature=t)
            for s, n, st, t in ((1, 7, "mask_predict", 0.0), (2, 12, "random", 0.0),
                                (3, 5, "mask_predict", 0.7))]
    done = {}
    engine.admit(reqs[1:2])           # the long random one first
    for f in engine.step():
        done[f.request.seed] = f
    engine.admit([reqs[0], reqs[2]])  # two join one step later
    while engine.active():
        for f in engine.step():
            done[f.request.seed] = f
    for s, ref in zip((1, 2, 3), alone):
        n = int(ref.lengths[0])
        assert torch.equal(done[s].ids, ref.ids[0, :n])
        assert done[s].error is None


def test_temperature_samples_are_seeded_and_not_greedy(tiny_fast):
    ids = images(1, seed=6)
    greedy = xlx_fast.caption(tiny_fast, cluster_ids=ids, length=15)
    hot = [xlx_fast.caption(tiny_fast, cluster_ids=ids, length=15, temperature=50.0, seed=s)
           for s in (1, 1, 2)]
    assert torch.equal(hot[0].ids, hot[1].ids)
    assert not torch.equal(hot[0].ids, hot[2].ids)
    assert not torch.equal(hot[0].ids, greedy.ids)


def test_weights_are_read_live(tiny_fast):
    model = copy.deepcopy(tiny_fast)
    ids = images(1, seed=4)
    before = xlx_fast.caption(model, cluster_ids=ids, length=6)
    with torch.no_grad():
        model.cls.predictions.bias[1000] = 1e4  # one word outranks every other
    after = xlx_fast.caption(model, cluster_ids=ids, length=6)
    assert not torch.equal(before.ids, after.ids)
    assert set(after.ids[0].tolist()) == {1000}


def test_bad_inputs(tiny_fast):
    ids = images(2)
    with pytest.raises(ValueError, match="exactly one of features and cluster_ids"):
        xlx_fast.caption(tiny_fast)
    with pytest.raises(ValueError, match="exactly one of features and cluster_ids"):
        xlx_fast.caption(tiny_fast, cluster_ids=ids, features=torch.zeros(2, 64, tiny_fast.feat_dim))
    with pytest.raises(ValueError, match=r"cluster_ids must lie in \[0, 97\)"):
        xlx_fast.caption(tiny_fast, cluster_ids=ids + 97)
    with pytest.raises(ValueError, match=r"cluster_ids must be \[batch, 64\]"):
        xlx_fast.caption(tiny_fast, cluster_ids=ids[:, :10])
    with pytest.raises(ValueError, match="features must be"):
        xlx_fast.caption(tiny_fast, features=torch.zeros(2, 64, 7))
    with pytest.raises(ValueError, match="features contain NaN"):
        xlx_fast.caption(tiny_fast, features=torch.full((1, 64, tiny_fast.feat_dim), float("nan")))
    with pytest.raises(ValueError, match=f"length must be in \\[1, {MAX_WORDS}\\]"):
        xlx_fast.caption(tiny_fast, cluster_ids=ids, length=MAX_WORDS + 1)
    with pytest.raises(ValueError, match="length must be in"):
        xlx_fast.caption(tiny_fast, cluster_ids=ids, length=[3, 0])
    with pytest.raises(ValueError, match="steps"):
        xlx_fast.caption(tiny_fast, cluster_ids=ids, length=4, strategy="tlbr", steps=5)
    with pytest.raises(ValueError, match="temperature"):
        xlx_fast.caption(tiny_fast, cluster_ids=ids, temperature=-1.0)
    plain = XLxmertForImageGeneration.from_default(size="tiny", with_generator=False)
    with pytest.raises(ValueError, match="pretraining_heads=True"):
        xlx_fast.caption(plain, cluster_ids=ids)
    with pytest.raises(ValueError, match="pretraining_heads=True"):
        reference_caption(plain, cluster_ids=ids)


def test_undecided_words_read_mask_in_tokens(tiny_fast):
    got = xlx_fast.caption(tiny_fast, cluster_ids=images(1), length=6, strategy="tlbr", steps=2)
    assert got.tokens(0)[2:] == [MASK_ID] * 4
    assert MASK_ID not in got.tokens(0)[:2]


def test_the_text_is_as_wide_as_the_longest_caption(tiny_fast):
    """A wider text would run every layer over padding the reference never sees: the engine
    caption() drives holds the batch's longest caption, [CLS] and [SEP] included, no more."""
    model = copy.deepcopy(tiny_fast)
    model.__dict__.pop("_xlx_caption_engines", None)  # the copy's cache came with it
    xlx_fast.caption(model, cluster_ids=images(4), length=[5, 3, 5, 4])  # 4 x 5 = 20 rows
    (engine,) = model._xlx_caption_engines.values()
    assert engine.max_words == 5 and engine.tokens.shape[1] == 7


def test_at_batch_one_on_a_cpu_the_text_holds_sixteen_words(tiny, tiny_fast):
    """A CPU GEMM of 5..15 rows is slower than one of 16 (ops._common.cpu_gemm_rows): a lone
    short caption runs in a 16-word text, padded and masked, and writes the same words."""
    from xlx_fast.ops._common import cpu_gemm_rows

    assert cpu_gemm_rows(12, "cpu") == 16 and cpu_gemm_rows(3, "cpu") == 3
    assert cpu_gemm_rows(96, "cpu") == 96 and cpu_gemm_rows(12, "cuda") == 12
    model = copy.deepcopy(tiny_fast)
    model.__dict__.pop("_xlx_caption_engines", None)  # the copy's cache came with it
    got = xlx_fast.caption(model, cluster_ids=images(1, seed=7), length=6)
    (engine,) = model._xlx_caption_engines.values()
    assert engine.max_words == 16
    ref = reference_caption(tiny, cluster_ids=images(1, seed=7), length=6)
    assert_same(ref, got)
