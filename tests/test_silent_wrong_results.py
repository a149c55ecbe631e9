"""Inputs that once gave a quietly wrong answer: each now gives the formula's answer or a
ValueError/TypeError naming the argument.

- ``vocab.assign(..., chunk=0 / -5)`` returned ids that were uninitialised memory;
- an inf feature row got id 0 with a NaN distance (``assign``) or blamed "the codebook" (``kmeans``);
- ``attention`` on the CPU returned 0.0 where NaN in q makes the formula NaN;
- a non-binary ``attention_mask`` gave NaN (reference) or "treated as 1" (fast);
- ``reference.sample`` ran a model in train mode (dropout on);
- a vocabulary whose ``[PAD]`` is not id 0 got ``attention_mask = input_ids > 0``, attending padding.
"""

import numpy as np
import pytest
import torch
from test_bad_inputs import attention_reference

import xlx_fast
from xlx_fast import reference
from xlx_fast.models import XLxmertForImageGeneration
from xlx_fast.ops.attention import attention
from xlx_fast.ops.nearest import nearest
from xlx_fast.text import CaptionTokenizer
from xlx_fast.vocab import assign, kmeans


def features(n=53, d=12, k=7, seed=0):
    rng = np.random.default_rng(seed)
    c = (rng.normal(size=(k, d)) * 4).astype(np.float32)  # well separated: exact ids
    x = (c[rng.integers(0, k, n)] + 0.1 * rng.normal(size=(n, d))).astype(np.float32)
    return x, c


def exact_ids(x, c):
    d2 = ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    return d2.argmin(1)


# -- vocab: counts, inf rows ---------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [0, -5, 2.0, True, None])
def test_assign_refuses_bad_chunk(chunk):
    x, c = features()
    with pytest.raises((ValueError, TypeError), match="chunk"):
        assign(x, c, chunk=chunk, progress=False)


@pytest.mark.parametrize("chunk", [1, 7, 53, 1000])
def test_assign_writes_every_row_for_any_valid_chunk(chunk):
    x, c = features()
    ids, dist = assign(x, c, chunk=chunk, return_distance=True, progress=False)
    np.testing.assert_array_equal(ids, exact_ids(x, c))
    ref = ((x.astype(np.float64) - c[ids].astype(np.float64)) ** 2).sum(1)
    np.testing.assert_allclose(dist, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(k=0), dict(k=-3), dict(n_iter=-1), dict(chunk=0),
                                    dict(max_points_per_centroid=0), dict(k=2.5), dict(seed=1.5)])
def test_kmeans_refuses_bad_counts(kwargs):
    x, _ = features()
    name = next(iter(kwargs))
    with pytest.raises((ValueError, TypeError), match=name):
        kmeans(x, **{"k": 4, "progress": False, **kwargs})


def test_nearest_refuses_bad_chunk():
    x, c = features()
    for chunk in (0, -1, 1.5):
        with pytest.raises(ValueError, match="chunk"):
            nearest(torch.from_numpy(x), torch.from_numpy(c), chunk=chunk)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_assign_refuses_non_finite_rows(value):
    x, c = features()
    x[31, 5] = value
    with pytest.raises(ValueError, match=r"features contain NaN or inf \(rows \[31\]\)"):
        assign(x, c, chunk=10, progress=False)


def test_nearest_refuses_inf_rows():
    x, c = features()
    x[4, 0] = np.inf
    with pytest.raises(ValueError, match=r"x contains inf.*\[4\]"):
        nearest(torch.from_numpy(x), torch.from_numpy(c), return_distance=True)


def test_kmeans_blames_the_features_for_inf():
    x, _ = features()
    x[17, 2] = np.inf
    with pytest.raises(ValueError, match=r"features contain NaN or inf \(rows \[17\]\)"):
        kmeans(x, k=4, progress=False)


def test_assign_refuses_nan_centroids_by_name():
    x, c = features()
    c[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"centroids contain NaN or inf \(rows \[3\]\)"):
        assign(x, c, progress=False)


# -- attention: NaN in q ---------------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True])
def test_attention_nan_in_q_gives_nan_like_the_formula(masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, l, 64, generator=g) for l in (5, 7, 7))
    q[1, 3, 40] = float("nan")  # head 1 of row (1, 3)
    mask = torch.ones(2, 7, dtype=torch.bool) if masked else None
    out = attention(q, k, v, mask, num_heads=2)
    ref = attention_reference(q, k, v, mask, 2)  # float64, NaN propagating as the math says
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[1, 3, 32:]).all() and not torch.isnan(out[1, 3, :32]).any()
    finite = ~torch.isnan(ref)
    torch.testing.assert_close(out.double()[finite], ref[finite], rtol=1e-5, atol=1e-5)


# -- attention_mask values, train mode, pad id ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return XLxmertForImageGeneration.from_default(seed=0, size="tiny")


def captions(b=2, pad=0):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (b, 12), generator=g)
    ids[:, 0] = 101
    ids[0, 6:] = pad
    ids[1, 9:] = pad
    return ids, ids != pad


@pytest.mark.parametrize("bad", [7, 0.5, -1])
def test_non_binary_attention_mask_is_refused_by_reference_and_generate(tiny, bad):
    import copy

    ids, mask = captions()
    bad_mask = mask.to(torch.float32 if isinstance(bad, float) else torch.int64)
    bad_mask[0, 2] = bad
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        reference.sample(tiny, ids, bad_mask, steps=2)
    fast = copy.deepcopy(tiny)
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        xlx_fast.generate(fast, ids, bad_mask, steps=2)


def test_binary_int_and_float_masks_equal_the_bool_mask(tiny):
    ids, mask = captions()
    want = reference.sample(tiny, ids, mask, steps=2)
    for m in (mask.long(), mask.float()):
        got = reference.sample(tiny, ids, m, steps=2)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.probs, want.probs)


def test_reference_refuses_train_mode(tiny):
    ids, mask = captions()
    tiny.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            reference.sample(tiny, ids, mask, steps=2)
    finally:
        tiny.eval()


def test_tokenizer_mask_follows_the_pad_id(tmp_path):
    """[PAD] at id 3 and a real word at id 0: the mask covers exactly [CLS] tokens [SEP]."""
    words = ["zebra", "[UNK]", "bus", "[PAD]", "[CLS]", "[SEP]", "a", "red"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tok = CaptionTokenizer.from_vocab(tmp_path)
    assert tok.pad_id == 3
    ids, mask = tok(["a red zebra", "bus"])
    assert ids[0, :5].tolist() == [4, 6, 7, 0, 5] and (ids[0, 5:] == 3).all()
    assert ids[1, :3].tolist() == [4, 2, 5] and (ids[1, 3:] == 3).all()
    assert mask[0].tolist() == [True] * 5 + [False] * 15  # "zebra" is id 0 and still attended
    assert mask[1].tolist() == [True] * 3 + [False] * 17


def test_default_mask_uses_the_models_pad_id(tiny):
    ids, mask = captions(pad=3)
    tiny.config.pad_token_id = 3
    try:
        default = reference.sample(tiny, ids, steps=2)
    finally:
        tiny.config.pad_token_id = None
    explicit = reference.sample(tiny, ids, mask, steps=2)
    assert torch.equal(default.ids, explicit.ids) and torch.equal(default.probs, explicit.probs)
    # and the padding does matter here: attending it changes the probabilities
    attending = reference.sample(tiny, ids, torch.ones_like(mask), steps=2)
    assert not torch.equal(attending.probs, explicit.probs)
