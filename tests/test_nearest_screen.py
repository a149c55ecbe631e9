"""The CPU's bfloat16 nearest (ops/nearest_screen.py): a bfloat16 GEMM screens, fp32 rescoring
decides. Its ids must meet the fp32 path's contract against a float64 brute force, ties to the
lowest index, and every row it cannot certify must take the fp32 path."""
import pytest
import torch

from xlx_fast.ops import nearest_screen, registry
from xlx_fast.ops.nearest import codebook_norms, nearest, nearest_torch
from xlx_fast.ops.nearest_screen import BF16_DOT, MAX_CANDIDATES, MIN_DIM

from test_nearest import check_ids, exact_scores, make_data

BF16 = torch.bfloat16


def nearest_screened(x, c, fp32_path=nearest_torch, **kw):
    return nearest_screen.nearest_screened(x, c, codebook_norms(c), fp32_path=fp32_path, **kw)


def poisoned(n):
    return torch.full((n,), -7, dtype=torch.int64), torch.full((n,), float("nan"))


@pytest.mark.parametrize("n,k,d,noise", [(37, 1003, 300, 0.05), (130, 517, MIN_DIM, 1.0),
                                         (65, 4099, 777, 0.3), (1, 9, 2048, 0.05)])
def test_screened_meets_the_fp32_contract(n, k, d, noise):
    x, c = make_data(n, k, d, BF16, seed=n + k + d, noise=noise)
    ids, scores = poisoned(n)
    nearest_screened(x, c, out=(ids, scores))
    check_ids(ids, scores, x, c, backend="screened")


@pytest.mark.parametrize("k", [700, 3001])
def test_small_integers_give_the_exact_argmin_on_every_row_ties_included(k):
    """Small integers: every product and fp32 sum is exact, but the bfloat16 dot products (up to
    9·D, 12 bits) are rounded to 8: many entries of a row fall within its bound and tie, and the
    rescoring must still return the float64 argmin, lowest index first, with its exact score."""
    g = torch.Generator().manual_seed(k)
    d = 300
    c = torch.randint(-3, 4, (k, d), generator=g).float()
    x = torch.randint(-3, 4, (53, d), generator=g).float()
    c[k - 1] = c[5]  # a duplicate far from its twin
    x[0] = c[5]
    s = exact_scores(x, c)
    ids, scores = nearest_screened(x.to(BF16), c.to(BF16))
    assert torch.equal(ids, s.argmin(1)) and ids[0] == 5
    assert torch.equal(scores.double(), s.min(1).values)


def test_a_best_entry_the_rounding_ranks_second_is_still_found():
    """x = ones(300), so x·c is the sum of c. c0 sums to 2056, c1 to 2063, and ||c0||^2 is 21
    below ||c1||^2: exactly, s0 = 10086 < s1 = 10093. Rounded to bfloat16, 2056 -> 2048 and
    2063 -> 2064, so the screen's scores rank them the other way (10102 > 10091): only a bound
    that covers that rounding keeps c0 a candidate."""
    d = 300
    c0 = torch.full((d,), 7.0)
    c0[:44] = 6.0                          # sum 2100 - 44 = 2056
    c0[44:79], c0[79:114] = 6.0, 8.0       # 35 pairs (7, 7) -> (6, 8): the sum stays, ||.||^2 + 70
    c1 = torch.full((d,), 7.0)
    c1[:37] = 6.0                          # sum 2063
    assert (c0.sum(), c1.sum(), (c0 * c0).sum(), (c1 * c1).sum()) == (2056, 2063, 14198, 14219)
    far = torch.full((d,), 20.0)
    c = torch.stack([far, c1, far + 1, c0, far + 2])
    x = torch.ones(2, d)
    s = exact_scores(x, c)
    assert s[0, 3] < s[0, 1]
    ids, scores = nearest_screened(x.to(BF16), c.to(BF16))
    assert ids.tolist() == [3, 3] and torch.equal(scores.double(), s[:, 3])


def test_rows_it_cannot_certify_take_the_fp32_path():
    """A row with more than MAX_CANDIDATES entries within its bound (near duplicates of the
    codebook), and a row holding NaN or inf, are handed whole to the fp32 path."""
    g = torch.Generator().manual_seed(3)
    d = 512
    base = torch.randn(d, generator=g)
    c = torch.randn(400, d, generator=g)
    c[100:100 + 2 * MAX_CANDIDATES] = base + 1e-3 * torch.randn(2 * MAX_CANDIDATES, d, generator=g)
    x = torch.randn(6, d, generator=g)
    x[2] = base
    x[4, 7] = float("inf")
    handed = []
    xb, cb = x.to(BF16), c.to(BF16)
    def fp32_path(rows, *a, **kw):
        handed.append(rows.shape[0])
        return nearest_torch(rows, *a, **kw)

    ids, scores = nearest_screened(xb, cb, fp32_path=fp32_path)
    assert handed == [2]  # rows 2 and 4, together
    keep = torch.tensor([0, 1, 2, 3, 5])
    check_ids(ids[keep], scores[keep], xb[keep], cb, backend="screened")
    assert not torch.isfinite(scores[4])


def test_narrow_features_take_the_fp32_path(monkeypatch):
    screened = []
    monkeypatch.setattr(nearest_screen, "_screen", lambda *a: screened.append(1))
    x, c = make_data(20, 300, MIN_DIM - 1, BF16)
    ids, scores = nearest_screened(x, c)
    assert not screened
    check_ids(ids, scores, x, c, backend="screened")


def test_the_cpu_runs_it_for_bfloat16_where_the_cpu_multiplies_bfloat16(monkeypatch):
    """The registry's choice for CPU bfloat16 is the screen exactly where the CPU has a native
    bfloat16 dot product; float32 keeps the fp32 path; a NaN row still raises."""
    chosen = registry.select_impl("nearest", "cpu", BF16).backend
    assert chosen == ("screened" if BF16_DOT.available() else "torch")
    assert registry.select_impl("nearest", "cpu", torch.float32).backend == "torch"
    if chosen == "screened":
        blocks = []
        screen = nearest_screen._screen
        monkeypatch.setattr(nearest_screen, "_screen", lambda *a: blocks.append(1) or screen(*a))
        x, c = make_data(70, 600, 300, BF16, seed=9)
        ids, dist = nearest(x, c, return_distance=True)
        assert blocks and torch.equal(ids, exact_scores(x, c).argmin(1))
    x, c = make_data(5, 600, 300, BF16, seed=9)
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN \(rows \[3\]\)"):
        nearest(x, c)
