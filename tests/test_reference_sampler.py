"""The reference sampler against an independent statement of SPEC §1's rules.

The head is replaced by a scripted one that returns chosen logits at each step, so the test
knows every step's probabilities and can replay the rules in NumPy: which cells each forward
saw masked, which cells took which id, what the final codes are.
"""
import numpy as np
import pytest
import torch

from xlx_fast import reference
from xlx_fast.models import XLxmertForImageGeneration
from xlx_fast.reference import mask_counts, random_order


class ScriptedHead(torch.nn.Module):
    """Returns logits[step] at the step-th call, whatever the hidden states."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.calls = 0

    def forward(self, hidden):
        out = self.logits[self.calls].to(hidden.dtype)
        self.calls += 1
        return out


@pytest.fixture(scope="module")
def tiny():
    return XLxmertForImageGeneration.from_default(seed=0, size="tiny")


def captions(b, vocab=30522, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (b, 20), generator=g)
    for row in range(b):
        ids[row, 5 + 3 * row:] = 0  # padded captions of different lengths
    ids[:, 0] = 101
    return ids


def scripted_run(model, strategy, steps, b, seed=0, tie_levels=None):
    g = torch.Generator().manual_seed(100 + steps)
    logits = torch.randn(steps, b, 64, model.n_clusters, generator=g) * 4
    if tie_levels:  # quantise so many cells share a max probability: ties must go to the lowest index
        top = torch.randint(0, tie_levels, (steps, b, 64), generator=g).float()
        logits = torch.zeros_like(logits)
        logits[..., 0] = 1 + top  # id 0 wins, with one of tie_levels probabilities
    saved = model.obj_predict_head
    model.obj_predict_head = ScriptedHead(logits)
    try:
        result = reference.sample(model, captions(b), steps=steps, strategy=strategy, seed=seed)
    finally:
        model.obj_predict_head = saved
    return logits, result


def replay(logits, strategy, steps, seed):
    """SPEC §1 in NumPy: returns (masks [K,B,64], ids [B,64])."""
    prob = torch.softmax(logits.double(), dim=-1).numpy()
    pred_prob, pred_id = prob.max(-1), prob.argmax(-1)
    _, b, n = pred_prob.shape
    ids = np.full((b, n), -1)
    mask = np.ones((b, n), bool)
    visited = np.zeros((b, n), bool)
    counts = mask_counts(steps)
    order = random_order(steps, seed) if strategy == "random" else list(range(steps))
    masks = []
    for i in range(steps):
        if strategy == "mask_predict" and i > 0:
            mask = np.zeros((b, n), bool)
            for r in range(b):
                mask[r, np.argsort(pred_prob[i - 1, r], kind="stable")[: counts[i]]] = True
        if strategy == "random":
            mask[:, order[i]] = True
        masks.append(mask.copy())
        update = np.zeros((b, n), bool)
        if strategy == "mask_predict":
            update = mask.copy()
        elif strategy == "confidence":
            for r in range(b):
                cand = np.where(visited[r], -np.inf, pred_prob[i, r])
                update[r, int(np.argmax(cand))] = True
        else:
            update[:, order[i]] = True
        if strategy != "mask_predict":
            mask &= ~update
            visited |= update
        ids = np.where(update, pred_id[i], ids)
    return np.stack(masks), ids


@pytest.mark.parametrize("strategy,steps", [("mask_predict", 4), ("mask_predict", 10),
                                            ("mask_predict", 70), ("confidence", 64),
                                            ("confidence", 9), ("tlbr", 64), ("tlbr", 7),
                                            ("random", 64), ("random", 80)])
def test_reference_follows_the_rules(tiny, strategy, steps):
    b = 3
    logits, result = scripted_run(tiny, strategy, steps, b, seed=5)
    masks, ids = replay(logits, strategy, steps, seed=5)
    np.testing.assert_array_equal(result.masks.numpy(), masks)
    np.testing.assert_array_equal(result.ids.numpy(), ids)
    # Codes: the centroid of each decided cell, mask_feat where no step decided the cell.
    expected_codes = torch.where(torch.from_numpy(ids >= 0).unsqueeze(-1),
                                 tiny.centroids[torch.from_numpy(ids).clamp(min=0)],
                                 tiny.mask_feat.detach().expand(b, 64, -1))
    torch.testing.assert_close(result.codes, expected_codes, rtol=0, atol=0)
    last = torch.softmax(logits[-1].double(), -1).max(-1).values.float()
    torch.testing.assert_close(result.probs, last)


def test_mask_predict_remasks_over_all_cells_not_only_previously_masked(tiny):
    # Steps 1.. choose their masks among all 64 cells: with random probabilities some cell
    # unmasked at step i is masked again at step i+1.
    logits, result = scripted_run(tiny, "mask_predict", 10, 2)
    m = result.masks.numpy()
    assert any((m[i + 1] & ~m[i]).any() for i in range(1, 9))
    assert [int(x) for x in m.sum(-1)[:, 0]] == mask_counts(10)


@pytest.mark.parametrize("strategy", ["mask_predict", "confidence"])
def test_ties_go_to_the_lowest_index(tiny, strategy):
    steps = 6
    logits, result = scripted_run(tiny, strategy, steps, 2, tie_levels=3)
    masks, ids = replay(logits, strategy, steps, seed=0)
    np.testing.assert_array_equal(result.masks.numpy(), masks)
    np.testing.assert_array_equal(result.ids.numpy(), ids)


def test_sampling_is_deterministic_and_seeded(tiny):
    ids = captions(2)
    a = reference.sample(tiny, ids, steps=6, strategy="random", seed=1)
    b = reference.sample(tiny, ids, steps=6, strategy="random", seed=1)
    c = reference.sample(tiny, ids, steps=6, strategy="random", seed=2)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.codes, b.codes)
    assert not torch.equal(a.masks, c.masks)
    d = reference.sample(tiny, ids, steps=4)
    e = reference.sample(tiny, ids, steps=4)
    assert torch.equal(d.ids, e.ids) and torch.equal(d.probs, e.probs)


def test_result_shapes_and_types(tiny):
    r = reference.sample(tiny, captions(2), steps=4)
    assert r.ids.shape == (2, 64) and r.ids.dtype == torch.int64
    assert ((r.ids >= 0) & (r.ids < tiny.n_clusters)).all()
    assert r.codes.shape == (2, 64, tiny.feat_dim)
    assert r.probs.shape == (2, 64) and ((r.probs > 0) & (r.probs <= 1)).all()
    assert r.masks.shape == (4, 2, 64) and r.masks.dtype == torch.bool


def test_default_attention_mask_is_nonzero_ids(tiny):
    ids = captions(2)
    a = reference.sample(tiny, ids, steps=2)
    b = reference.sample(tiny, ids, ids > 0, steps=2)
    c = reference.sample(tiny, ids, torch.ones_like(ids), steps=2)
    assert torch.equal(a.probs, b.probs)
    assert not torch.equal(a.probs, c.probs)  # padding really is masked out


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=-1), ValueError, "steps"),
    (dict(strategy="greedy"), ValueError, "strategy"),
    (dict(strategy="tlbr", steps=65), ValueError, "steps"),
    (dict(strategy="confidence", steps=100), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"),
])
def test_bad_arguments(tiny, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        reference.sample(tiny, captions(1), **kwargs)


def test_bad_inputs(tiny):
    ids = captions(2)
    with pytest.raises(ValueError, match="input_ids"):
        reference.sample(tiny, ids[0])
    with pytest.raises(ValueError, match="out of range"):
        reference.sample(tiny, ids.clone().fill_(30522))
    with pytest.raises(ValueError, match="out of range"):
        reference.sample(tiny, ids.clone().fill_(-1))
    with pytest.raises(TypeError, match="input_ids"):
        reference.sample(tiny, ids.float())
    with pytest.raises(TypeError, match="input_ids"):
        reference.sample(tiny, ids.tolist())
    with pytest.raises(ValueError, match="attention_mask"):
        reference.sample(tiny, ids, attention_mask=ids[:, :5] > 0)
    with pytest.raises(ValueError, match="non-empty"):
        reference.sample(tiny, ids[:0])


def test_paint_shape_range_and_seeded_noise(tiny):
    r = reference.sample(tiny, captions(2), steps=2)
    img = reference.paint(tiny, r.codes, seed=0)
    assert img.shape == (2, 3, 32, 32)
    assert img.min() >= 0 and img.max() <= 1
    assert torch.equal(img, reference.paint(tiny, r.codes, seed=0))
    assert not torch.equal(img, reference.paint(tiny, r.codes, seed=1))
    with pytest.raises(ValueError, match="codes"):
        reference.paint(tiny, r.codes[:, :10])
