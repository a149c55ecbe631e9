"""The reference's schedules and grid, pinned to SPEC §1."""
import random
import subprocess
import sys

import pytest
import torch

from xlx_fast.reference import box_positions, mask_counts, random_order, tlbr_order


@pytest.mark.parametrize("k", [1, 4, 10, 64, 100])
def test_mask_predict_counts_follow_linear_decay(k):
    counts = mask_counts(k)
    # Exact integer form of int((K - i) / K * 64).
    assert counts == [(k - i) * 64 // k for i in range(k)]
    assert counts[0] == 64
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_mask_predict_counts_known_values():
    assert mask_counts(1) == [64]
    assert mask_counts(4) == [64, 48, 32, 16]
    assert mask_counts(10) == [64, 57, 51, 44, 38, 32, 25, 19, 12, 6]
    assert mask_counts(64) == list(range(64, 0, -1))
    assert mask_counts(100)[-1] == 0 and mask_counts(100)[98] == 1


def test_tlbr_order_and_limit():
    assert tlbr_order(64) == list(range(64))
    assert tlbr_order(5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="steps"):
        tlbr_order(65)


def test_random_order_is_a_seeded_permutation_popped_from_the_end():
    order = random_order(64, seed=3)
    assert sorted(order) == list(range(64))
    perm = list(range(64))
    random.Random(3).shuffle(perm)
    assert order == perm[::-1]
    assert random_order(64, seed=3) == order
    assert random_order(64, seed=4) != order


def test_random_order_beyond_64_revisits_after_a_full_pass():
    order = random_order(100, seed=1)
    assert sorted(order[:64]) == list(range(64))
    extra = list(range(36))
    random.Random(1).shuffle(extra)
    assert order[64:] == [e % 64 for e in extra[::-1]]


@pytest.mark.parametrize("bad", [0, -3])
def test_schedules_reject_bad_steps(bad):
    for fn in (mask_counts, tlbr_order, lambda s: random_order(s, 0)):
        with pytest.raises(ValueError, match="steps"):
            fn(bad)
    with pytest.raises(TypeError, match="steps"):
        mask_counts(2.0)


def test_box_table():
    boxes = box_positions()
    assert boxes.shape == (64, 4) and boxes.dtype == torch.float32
    for i in range(8):
        for j in range(8):
            assert boxes[i * 8 + j].tolist() == [j / 8, i / 8, (j + 1) / 8, (i + 1) / 8]
    assert boxes[9].tolist() == [0.125, 0.125, 0.25, 0.25]


def test_reference_imports_nothing_fast():
    # The reference is what every fast path is checked against: it must not run any of them.
    code = ("import sys, xlx_fast.reference, xlx_fast.reference.pretrain\n"
            "fast = ('xlx_fast.ops', 'xlx_fast.patching', 'xlx_fast.generation', 'xlx_fast._C',\n"
            "        'xlx_fast.native', 'xlx_fast.bench', 'xlx_fast.training', 'xlx_fast.engine',\n"
            "        'xlx_fast.step_plan')\n"
            "bad = sorted(m for m in sys.modules if m.startswith(fast))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
