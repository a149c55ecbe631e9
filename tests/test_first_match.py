"""``split_scan.row_best``: each row's min (max) and its FIRST column, on the CPU through
``_C.first_match_cpu``: the argmin/argmax of nearest's and codebook_head's CPU paths.

Checked against a plain Python scan of every row (awkward widths around the 16-column vector
step, ties planted at both ends of a row, NaN rows, infinities, strided blocks), and the
native scan on its own for the cases the wrapper never sends (no match, NaN values).
"""
from __future__ import annotations

import math

import pytest
import torch

from xlx_fast import native
from xlx_fast.ops.split_scan import row_best


def first_best(s: torch.Tensor, largest: bool):
    """(values, ids) by a scan in Python, float64 compares: NaN anywhere -> (nan, -1)."""
    values, ids = [], []
    for row in s.double().tolist():
        if any(math.isnan(v) for v in row):
            values.append(math.nan)
            ids.append(-1)
            continue
        best = max(row) if largest else min(row)
        values.append(best)
        ids.append(row.index(best))
    return torch.tensor(values, dtype=torch.float64), torch.tensor(ids, dtype=torch.int64)


@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 15), (5, 16), (7, 17), (9, 33), (4, 130), (2, 10007)])
def test_row_best_is_the_first_extremum_of_each_row(rows, cols, largest):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    s = torch.randint(-3, 4, (rows, cols), generator=g).float()  # small integers: many ties
    if cols > 1:
        s[0, -1] = s[0, 0] = 10.0 if largest else -10.0  # a tie at both ends: the first wins
    if rows > 2:
        s[1, cols // 2] = math.nan  # a NaN row
        s[2] = -math.inf if largest else math.inf  # a row of one infinite value
    values, ids = row_best(s, largest=largest)
    want_values, want_ids = first_best(s, largest)
    assert ids.dtype == torch.int64 and torch.equal(ids, want_ids)
    assert torch.equal(values.double().isnan(), want_values.isnan())
    finite = ~want_values.isnan()
    assert torch.equal(values.double()[finite], want_values[finite])


@pytest.mark.parametrize("largest", [False, True])
def test_row_best_reads_a_strided_block_and_random_values(largest):
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(37, 301, generator=g)
    s = wide[:, 3:250]  # rows 301 floats apart, as a column slice of a wider block
    values, ids = row_best(s, largest=largest)
    want_values, want_ids = first_best(s, largest)
    assert torch.equal(ids, want_ids) and torch.equal(values.double(), want_values)
    v, i = (s.max(1) if largest else s.min(1))  # torch's own, on values without ties
    assert torch.equal(ids, i) and torch.equal(values, v)


def test_the_native_scan_says_minus_one_for_no_match_and_for_nan():
    x = torch.arange(40, dtype=torch.float32).reshape(2, 20)
    values = torch.tensor([19.0, math.nan])
    ids = torch.full((2,), 123, dtype=torch.int64)  # poisoned
    native.load().first_match_cpu(x.data_ptr(), 2, 20, 20, values.data_ptr(), ids.data_ptr())
    assert ids.tolist() == [19, -1]
    values = torch.tensor([0.5, 39.0])  # not in row 0; the last column of row 1
    native.load().first_match_cpu(x.data_ptr(), 2, 20, 20, values.data_ptr(), ids.data_ptr())
    assert ids.tolist() == [-1, 19]
    v, i = row_best(torch.empty(0, 5), largest=False)  # no rows
    assert v.shape == (0,) and i.shape == (0,)
