"""nearest(): Triton kernel (interpreter on the CPU) and blocked CPU path vs a float64 brute force."""
import numpy as np
import pytest
import torch

from xlx_fast.ops import nearest as nearest_module
from xlx_fast.ops.dot_error import gamma
from xlx_fast.ops.nearest import codebook_norms, error_bound, nearest, nearest_torch, nearest_triton
from xlx_fast.ops.registry import tolerance

U32 = 2.0 ** -24

# the Triton interpreter's own numpy warnings (scalar conversion, all-NaN reductions on purpose)
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN:RuntimeWarning")]


def make_data(n, k, d, dtype, seed=0, noise=0.05):
    """x = a random centroid + small noise, so the best/second-best gap is large on most rows."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(k, d, generator=g)
    x = c[torch.randint(0, k, (n,), generator=g)] + noise * torch.randn(n, d, generator=g)
    return x.to(dtype), c.to(dtype)


def exact_scores(x, c):
    """float64 ||c||^2 - 2 x·c of the given (already rounded) inputs."""
    x, c = x.double(), c.double()
    return (c * c).sum(1)[None, :] - 2 * x @ c.T


def bound(x, c, precision="ieee"):
    """Per-row worst-case score error of the fp32-accumulated expansion (see nearest.py), with
    gamma(D, precision) of the rounding model (checked by simulation in test_dot_error.py)."""
    x, c = x.double(), c.double()
    d = x.shape[1]
    g = gamma(d, precision)  # the rounding model, checked by simulation in test_dot_error.py
    cn = c.norm(dim=1)
    e = 2 * (g + U32) * x.norm(dim=1)[:, None] * cn[None, :] + (d + 1) * U32 * cn[None, :] ** 2
    return e.max(1).values


def distance_bound(x, c, precision="ieee"):
    """Per-row bound on |dist - ||x - c_id||^2| for the returned id: ||x||^2 summed in fp32, the
    score's error, and the final addition."""
    x, c = x.double(), c.double()
    xn2 = (x * x).sum(1)
    return x.shape[1] * U32 * xn2 + bound(x, c, precision) + 2 * U32 * (xn2 + (c * c).sum(1).max())


def check_ids(ids, scores, x, c, precision="ieee", min_share=0.5, backend="torch"):
    """ids must equal the exact argmin on every row whose top-2 gap exceeds twice the bound;
    scores within the bound everywhere and, but for tf32, within the tolerance ``backend``
    declares in the registry (relative to the float64 scores)."""
    s = exact_scores(x, c)
    ref = s.argmin(1)
    if c.shape[0] > 1:
        top2 = s.topk(2, dim=1, largest=False).values
        gap = top2[:, 1] - top2[:, 0]
    else:
        gap = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    ok = gap > 2 * bound(x, c, precision)
    assert ok.double().mean() >= min_share, f"only {ok.double().mean():.2f} of rows have a clear gap"
    assert torch.equal(ids[ok].cpu(), ref[ok]), "ids differ from the float64 argmin on clear rows"
    if scores is not None:
        best = s.min(1).values
        # the score of the returned id must be within the bound of the true minimum on every row
        got = s.gather(1, ids.cpu().clamp_min(0)[:, None])[:, 0]
        assert torch.all(got - best <= 2 * bound(x, c, precision) + 1e-12)
        err = (scores.cpu().double() - best).abs()
        assert torch.all(err <= bound(x, c, precision) + 1e-6)
        if precision != "tf32":
            assert err.norm() <= tolerance("nearest", backend, x.dtype) * best.norm()


# --- Triton kernel under the interpreter ------------------------------------------------------

INTERP_SHAPES = [(1, 1, 1), (3, 3, 3), (37, 127, 19), (127, 1000, 3), (33, 61, 127)]


@pytest.mark.parametrize("n,k,d", INTERP_SHAPES)
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.float32, "tf32"),
                                             (torch.float32, "tf32x3"), (torch.float16, "ieee"),
                                             (torch.bfloat16, "ieee")])
def test_triton_matches_fp64(n, k, d, dtype, precision, kernel_device):
    x, c = make_data(n, k, d, dtype, seed=n + k + d)
    x, c = x.to(kernel_device), c.to(kernel_device)
    # poison: every row must be written (N is not a multiple of the 16-row block)
    ids = torch.full((n,), -7, dtype=torch.int64, device=kernel_device)
    scores = torch.full((n,), float("nan"), device=kernel_device)
    nearest_triton(x, c, precision=precision, block_n=16, block_k=64, block_d=16, out=(ids, scores))
    assert (ids >= 0).all() and (ids < k).all()
    assert not torch.isnan(scores).any()
    # the interpreter computes tf32 and tf32x3 as IEEE fp32: there it must meet the IEEE bound
    check_ids(ids, scores, x.cpu(), c.cpu(),
              precision if x.is_cuda and dtype == torch.float32 else "ieee", backend="triton")


@pytest.mark.parametrize("splits", [1, 2, None])
def test_triton_ties_go_to_lowest_index(splits, kernel_device):
    g = torch.Generator().manual_seed(1)
    c = torch.randn(50, 7, generator=g)
    c[20] = c[3]    # duplicate in another 16-wide tile (another split unless splits = 1)
    c[5] = c[3]     # duplicate in the same tile
    c[49] = c[11]   # duplicate in the last, partial tile
    x = torch.stack([c[3], c[20], c[5], c[11], c[49]])
    ids, _ = nearest_triton(x.to(kernel_device), c.to(kernel_device), block_n=16, block_k=16,
                            block_d=16, splits=splits)
    assert ids.cpu().tolist() == [3, 3, 3, 11, 11]


@pytest.mark.parametrize("n,k,d,splits", [(1, 1, 1, None), (1, 70, 5, None), (37, 1, 3, None),
                                          (45, 333, 19, None), (45, 333, 19, 3),
                                          (20, 700, 6, 44)])  # 44 splits: merged in 2 chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_ids_equal_fp64_brute_force(n, k, d, splits, dtype, kernel_device):
    """Small-integer data: every product and sum is exact in fp32, so the kernel's scores are the
    float64 ones and its ids must equal torch's float64 argmin (first minimal index) on EVERY
    row, ties included (small integers tie often, across tiles and splits)."""
    g = torch.Generator().manual_seed(n * k + d)
    c = torch.randint(-3, 4, (k, d), generator=g).float()
    x = torch.randint(-3, 4, (n, d), generator=g).float()
    ref = exact_scores(x, c).argmin(1)
    dev = kernel_device
    ids = torch.full((n,), -7, dtype=torch.int64, device=dev)  # poisoned
    scores = torch.full((n,), float("nan"), device=dev)
    nearest_triton(x.to(dev, dtype), c.to(dev, dtype), block_n=16, block_k=16, block_d=16,
                   splits=splits, out=(ids, scores))
    assert torch.equal(ids.cpu(), ref)
    assert torch.equal(scores.cpu().double(), exact_scores(x, c).min(1).values)


def test_triton_flags_nan_rows(kernel_device):
    x, c = make_data(20, 30, 5, torch.float32)
    x[7, 2] = float("nan")
    ids, _ = nearest_triton(x.to(kernel_device), c.to(kernel_device), block_n=16, block_k=16, block_d=16)
    assert ids[7].item() == -1 and (ids.cpu()[torch.arange(20) != 7] >= 0).all()


def test_triton_nan_in_a_late_split_is_flagged(kernel_device):
    """A NaN centroid score only in the last split (norms given, so no refusal up front) still
    marks the row: the merge keeps the flag whichever split holds the minimum."""
    x, c = make_data(5, 64, 4, torch.float32)
    norms = (c.double() ** 2).sum(1).float()
    norms[60] = float("nan")
    ids, _ = nearest_triton(x.to(kernel_device), c.to(kernel_device), norms.to(kernel_device),
                            block_n=16, block_k=16, block_d=16, splits=4)
    assert ids.cpu().tolist() == [-1] * 5


# --- CPU path ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (3, 3, 3), (999, 10000, 127), (257, 10000, 2048), (1000, 1000, 1)])
def test_cpu_matches_fp64(n, k, d):
    x, c = make_data(n, k, d, torch.float32, seed=k + d)
    ids, dist = nearest(x, c, return_distance=True, chunk=100)
    assert ids.dtype == torch.int64 and ids.shape == (n,)
    check_ids(ids, None, x, c, min_share=0.5 if d > 1 else 0.3)
    ref = ((x.double() - c.double()[ids]) ** 2).sum(1)
    scale = (x.double().norm(dim=1) + c.double()[ids].norm(dim=1)) ** 2
    assert torch.all((dist.double() - ref).abs() <= 4 * d * U32 * scale + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_inputs(dtype):
    x, c = make_data(301, 1000, 64, dtype)
    check_ids(nearest(x, c), None, x, c)


def test_cpu_ties_go_to_lowest_index():
    c = torch.randn(5000, 16, generator=torch.Generator().manual_seed(2))
    c[4321] = c[17]
    c[4999] = c[17]
    ids = nearest(torch.stack([c[17], c[4321], c[4999]]), c)
    assert ids.tolist() == [17, 17, 17]


def test_numpy_memmap_streaming_matches_torch(tmp_path):
    x, c = make_data(1001, 300, 24, torch.float32)
    path = tmp_path / "x.npy"
    np.save(path, x.numpy())
    xm = np.load(path, mmap_mode="r")
    ids, dist = nearest(xm, c.numpy(), return_distance=True, chunk=128, progress=True)
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64
    ids_t, dist_t = nearest(x, c, return_distance=True)
    assert np.array_equal(ids, ids_t.numpy())
    np.testing.assert_allclose(dist, dist_t.numpy(), rtol=1e-6, atol=1e-5)


def test_leading_dims_flattened():
    x, c = make_data(2 * 64, 100, 8, torch.float32)
    ids = nearest(x.view(2, 64, 8), c)
    assert ids.shape == (2, 64) and torch.equal(ids.reshape(-1), nearest(x, c))


def test_agrees_with_faiss_flat_l2():
    faiss = pytest.importorskip("faiss")
    x, c = make_data(2000, 1000, 32, torch.float32)
    index = faiss.IndexFlatL2(32)
    index.add(c.numpy())
    _, fid = index.search(x.numpy(), 1)
    check_ids(torch.from_numpy(fid[:, 0]), None, x, c)  # faiss itself is exact on clear rows
    assert np.array_equal(nearest(x, c).numpy(), fid[:, 0])


def test_norm_cache_follows_in_place_updates():
    x, c = make_data(50, 40, 6, torch.float32)
    n0 = codebook_norms(c)
    assert codebook_norms(c) is n0  # cached
    assert torch.equal(nearest(x, c), exact_scores(x, c).argmin(1))
    c.mul_(3.0).add_(1.0)  # in-place edit bumps the version counter
    assert torch.equal(nearest(x, c), exact_scores(x, c).argmin(1))
    assert torch.allclose(codebook_norms(c), (c * c).sum(1))


def test_error_bound_helper_matches_docstring_formula():
    x, c = make_data(10, 20, 9, torch.float32)
    for precision in ("ieee", "tf32", "tf32x3"):
        assert torch.allclose(error_bound(x, c, precision=precision), bound(x, c, precision))
    assert torch.allclose(error_bound(x, c), bound(x, c, "tf32x3"))  # the default


def test_cpu_path_function_directly():
    x, c = make_data(70, 33, 5, torch.float32)
    ids, scores = nearest_torch(x, c, chunk=16)
    check_ids(ids, scores, x, c)


# --- K = 65,536 --------------------------------------------------------------------------------

BIG_K = 65_536
# (first, copy) codebook rows made equal; a row of x equal to them must get ``first``. The pairs
# straddle the default slices (2048 entries), the two merge chunks of 32 slices when a slice is
# 1024 entries (splits=100 below), share one 64-entry tile, and reach the very last entry.
BIG_DUPLICATES = ((3, BIG_K - 1), (70, 40_000), (2048 * 5 + 1, 2048 * 5 + 9), (1024 * 31 + 5, 1024 * 32 + 5))


@pytest.fixture(scope="module")
def big_codebooks():
    """Small-integer codebooks [65536, D] (every product, sum and norm exact in fp32, so the
    kernels' scores ARE the float64 ones and ties are exact ties), the duplicated rows set;
    built once per D (the D = 2048 one is 512 MB)."""
    books = {}

    def get(d):
        if d not in books:
            g = torch.Generator().manual_seed(d)
            c = torch.randint(-3, 4, (BIG_K, d), generator=g, dtype=torch.int8).float()
            for first, copy in BIG_DUPLICATES:
                c[copy] = c[first]
            books[d] = c
        return books[d]
    yield get
    books.clear()


def integer_queries(n, c, seed):
    """n rows of small integers; the first ones are the duplicated codebook rows (an exact tie
    at distance 0 between two entries far apart), the rest random (ties among entries too)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n, c.shape[1]), generator=g, dtype=torch.int8).float()
    for r, (_, copy) in enumerate(BIG_DUPLICATES[:n]):
        x[r] = c[copy]
    return x


def brute_force(x, c, block=8192):
    """float64 (first minimal index, minimum) of ||c_k||^2 - 2 x·c_k, in blocks of entries (no
    [K, D] float64 copy); a later block replaces the best only when strictly smaller."""
    xd = x.double()
    best = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    best_id = torch.zeros(x.shape[0], dtype=torch.int64)
    for k0 in range(0, c.shape[0], block):
        s = exact_scores(xd, c[k0:k0 + block])
        i = s.argmin(1)  # the first minimal index
        v = s.gather(1, i[:, None])[:, 0]
        better = v < best
        best, best_id = torch.where(better, v, best), torch.where(better, i + k0, best_id)
    return best_id, best


def poisoned(n, device="cpu"):
    return (torch.full((n,), -7, dtype=torch.int64, device=device),
            torch.full((n,), float("nan"), device=device))


def check_duplicates_resolved(ids, x, c):
    """Rows equal to duplicated entries get the lowest entry equal to them (with few columns,
    random entries may equal them too, below the planted pair): never the later copy."""
    for r, (first, copy) in enumerate(BIG_DUPLICATES[:len(ids)]):
        lowest = int((c == x[r]).all(1).nonzero()[0, 0])
        assert lowest <= first and ids[r] == lowest, f"row {r}: entry {copy}'s copies resolved to {int(ids[r])}"


@pytest.mark.parametrize("k_block", [1, 7, 16, 64])
def test_cpu_blocks_of_entries_merge_to_the_first_minimum(k_block, monkeypatch):
    """The CPU path's blocks of K_BLOCK entries, made small: a tie across a block boundary goes
    to the earlier entry, every row equals the float64 brute force, and a NaN score in a later
    block only (a NaN norm there) marks its rows -1 / NaN, as a NaN in the first block does."""
    monkeypatch.setattr(nearest_module, "K_BLOCK", k_block)
    g = torch.Generator().manual_seed(k_block)
    k, d = 101, 6
    c = torch.randint(-2, 3, (k, d), generator=g).float()
    c[k_block + 3] = c[2]  # the same entry in two blocks (one block apart at least)
    c[k - 1] = c[k_block - 1]  # and at the first block's last and the codebook's last entry
    x = torch.randint(-2, 3, (23, d), generator=g).float()
    x[0], x[1] = c[2], c[k - 1]
    ids, scores = poisoned(23)
    nearest_torch(x, c, chunk=5, out=(ids, scores))
    ref_ids, ref_scores = brute_force(x, c)
    assert torch.equal(ids, ref_ids) and torch.equal(scores.double(), ref_scores)
    assert ids[0] == 2 and ids[1] == k_block - 1
    for entry in (0, k - 2):  # the first block, or a later one
        norms = codebook_norms(c).clone()
        norms[entry] = float("nan")
        ids, scores = nearest_torch(x, c, norms, chunk=5)
        assert (ids == -1).all() and scores.isnan().all()


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The most elements any tensor made inside the block had (views included)."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("d", [48, 2048])
@pytest.mark.parametrize("n", [1, 3, 37])
def test_cpu_65536_entries_equal_fp64_brute_force(n, d, big_codebooks):
    c = big_codebooks(d)
    x = integer_queries(n, c, seed=n + d)
    ref_ids, ref_scores = brute_force(x, c)
    ids, scores = poisoned(n)
    nearest_torch(x, c, out=(ids, scores))
    assert torch.equal(ids, ref_ids)  # every row, ties included
    assert torch.equal(scores.double(), ref_scores)
    check_duplicates_resolved(ids, x, c)
    # the public entry point: the same ids, and exact distances
    got, dist = nearest(x, c, return_distance=True)
    assert torch.equal(got, ref_ids)
    assert torch.equal(dist.double(), (x.double() ** 2).sum(1) + ref_scores)


def test_cpu_65536_entries_half_inputs(big_codebooks):
    c = big_codebooks(48)
    x = integer_queries(37, c, seed=5)
    ref_ids, _ = brute_force(x, c)
    for dtype in (torch.bfloat16, torch.float16):  # small integers are exact in both
        assert torch.equal(nearest(x.to(dtype), c.to(dtype)), ref_ids)


def test_cpu_scratch_is_bounded_whatever_k(big_codebooks):
    """600 rows against 65,536 entries: the 2048-row chunk would hold 600 × 65,536 scores; the
    row budget cuts it to 512 rows (2^25 floats), and the two chunks give the brute force's ids."""
    from xlx_fast.ops import split_scan
    assert split_scan.cpu_rows(2048, 10_000) == 2048  # the measured K = 10,000 path is unchanged
    assert split_scan.cpu_rows(2048, BIG_K) == 512 and split_scan.cpu_rows(2048, 2 ** 30) == 1
    c = big_codebooks(48)[:, :4].contiguous()
    x = integer_queries(600, c, seed=9)
    with LargestTensor() as seen:
        ids, _ = nearest_torch(x, c)
    assert seen.largest <= split_scan.CPU_SCORES < 600 * BIG_K
    assert torch.equal(ids, brute_force(x, c)[0])


def test_error_bound_needs_no_n_by_k_table():
    x, c = make_data(37, 3000, 9, torch.float32)
    with LargestTensor() as seen:
        e = error_bound(x, c)
    assert seen.largest < 37 * 3000 and torch.allclose(e, bound(x, c, "tf32x3"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,splits", [(1, None), (37, 100)])  # 32 slices; 64 slices, 2 merge chunks
def test_triton_65536_entries_equal_fp64_brute_force(n, splits, dtype, big_codebooks, kernel_device):
    """Tiny D keeps the interpreter affordable; 512-entry tiles, 128 of them per row block."""
    c = big_codebooks(48)[:, :5].contiguous()
    x = integer_queries(n, c, seed=n)
    ref_ids, ref_scores = brute_force(x, c)
    ids, scores = poisoned(n, kernel_device)
    nearest_triton(x.to(kernel_device, dtype), c.to(kernel_device, dtype), block_n=16 if n < 16 else 64,
                   block_k=512, block_d=16, splits=splits, out=(ids, scores))
    assert torch.equal(ids.cpu(), ref_ids)
    assert torch.equal(scores.cpu().double(), ref_scores)
    check_duplicates_resolved(ids.cpu(), x, c)


def test_triton_65536_entries_with_the_launchers_own_tiles(big_codebooks, kernel_device):
    """The block sizes and split count the launcher picks at K = 65,536 (32 slices of 2048)."""
    c = big_codebooks(48)[:, :3].contiguous()
    x = integer_queries(3, c, seed=11)
    ids, scores = poisoned(3, kernel_device)
    nearest_triton(x.to(kernel_device), c.to(kernel_device), precision="ieee", out=(ids, scores))
    ref_ids, ref_scores = brute_force(x, c)
    assert torch.equal(ids.cpu(), ref_ids) and torch.equal(scores.cpu().double(), ref_scores)
    check_duplicates_resolved(ids.cpu(), x, c)


def test_odd_widths_take_smaller_row_tiles():
    """An odd D loses the vectorised loads: its row tile is 64, not 128 (128 spilled registers,
    tests/test_triton_compile.py); the results do not depend on it."""
    from xlx_fast.ops.nearest import _launches
    for d, block_n in ((2048, 128), (1024, 128), (768, 128), (777, 64), (1000, 64)):
        x, c = torch.empty(300, d), torch.empty(BIG_K, d)
        kw = _launches(x, c, torch.empty(BIG_K), *poisoned(300), "tf32x3", cuda=True)[0][3]
        assert kw["BLOCK_N"] == block_n, d
    strided = torch.empty(300, 2056)[:, :2048]  # row stride 2056 = 8 mod 16: not vectorised
    assert _launches(strided, torch.empty(10, 2048), torch.empty(10), *poisoned(300), "ieee")[0][3]["BLOCK_N"] == 64


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("x,c,err,match", [
    (torch.randn(4, 3), torch.randn(5, 4), ValueError, "feature dim"),
    (torch.randn(4, 3), torch.randn(0, 3), ValueError, "empty"),
    (torch.randn(4, 3), torch.randn(5), ValueError, "codebook must be 2-D"),
    (torch.randn(4, 3), torch.randn(2, 5, 3), ValueError, "codebook must be 2-D"),
    (torch.randn(4, 3).double(), torch.randn(5, 3).double(), TypeError, "x must be"),
    (torch.randn(4, 3), torch.randn(5, 3).half(), TypeError, "codebook dtype"),
    (torch.randint(0, 9, (4, 3)), torch.randn(5, 3), TypeError, "x must be"),
    (np.zeros((4, 3)), np.zeros((5, 3), np.float32), TypeError, "x must be"),
    ([[1.0, 2.0]], torch.randn(5, 2), TypeError, "x must be"),
    (torch.randn(4, 3, device="meta"), torch.randn(5, 3), ValueError, "x is on meta"),
])
def test_bad_input(x, c, err, match):
    with pytest.raises(err, match=match):
        nearest(x, c)


def test_nan_inputs_raise():
    x, c = make_data(30, 20, 4, torch.float32)
    xn = x.clone()
    xn[11, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x contains NaN \(rows \[11\]\)"):
        nearest(xn, c)
    cn = c.clone()
    cn[3, 1] = float("nan")
    with pytest.raises(ValueError, match="codebook contains NaN"):
        nearest(x, cn)


def test_bad_precision_and_norms():
    x, c = make_data(4, 5, 3, torch.float32)
    with pytest.raises(ValueError, match="precision"):
        nearest(x, c, precision="fast")
    with pytest.raises(ValueError, match="norms"):
        nearest(x, c, norms=torch.zeros(4))


# --- GPU (run by benchmarks/gpu_check.sh) -----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.float32, "tf32"),
                                             (torch.float32, "tf32x3"), (torch.float16, "ieee"),
                                             (torch.bfloat16, "ieee")])
def test_gpu_realistic(dtype, precision):
    n, k, d = 8192 + 3, 10000, 2048
    x, c = make_data(n, k, d, dtype, noise=0.2)
    x, c = x.cuda(), c.cuda()
    ids, dist = nearest(x, c, return_distance=True, precision=precision)
    xs, cs = x.double(), c.double()
    s = (cs * cs).sum(1)[None, :] - 2 * xs @ cs.T
    top2 = s.topk(2, dim=1, largest=False)
    gap = top2.values[:, 1] - top2.values[:, 0]
    prec = precision if dtype == torch.float32 else "ieee"
    ok = gap > 2 * bound(x, c, prec)
    assert ok.double().mean() > 0.9
    assert torch.equal(ids[ok], top2.indices[ok, 0])
    ref = ((xs - cs[ids]) ** 2).sum(1)
    assert torch.all((dist.double() - ref).abs().cpu() <= distance_bound(x.cpu(), c.cpu(), prec))
    # and the same ids as torch's own mm + argmin where the gap is clear
    t = torch.addmm((c.float() ** 2).sum(1), x.float(), c.float().T, alpha=-2).argmin(1)
    assert torch.equal(ids[ok], t[ok])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "tf32x3"), (torch.bfloat16, "ieee")])
@pytest.mark.parametrize("d", [2048, 777])
def test_gpu_65536_entries(dtype, precision, d):
    """The launcher's own tiles at K = 65,536 (odd D: 64-row tiles) against float64."""
    n, k = 4096 + 5, BIG_K
    x, c = make_data(n, k, d, dtype, noise=0.2)
    x, c = x.cuda(), c.cuda()
    ids, scores = poisoned(n, "cuda")
    nearest_triton(x, c, precision=precision, out=(ids, scores))
    s = exact_scores(x, c)  # float64 on the GPU: 4101 × 65536
    top2 = s.topk(2, dim=1, largest=False)
    gap = top2.values[:, 1] - top2.values[:, 0]
    ok = gap > 2 * bound(x, c, precision if dtype == torch.float32 else "ieee").cuda()
    assert ok.double().mean() > 0.9
    assert torch.equal(ids[ok], top2.indices[ok, 0])
    err = (scores.double() - top2.values[:, 0]).abs()
    assert torch.all(err <= bound(x, c, precision if dtype == torch.float32 else "ieee").cuda() + 1e-6)


@pytest.mark.gpu
def test_gpu_numpy_streaming_matches_resident():
    x, c = make_data(70000, 1000, 256, torch.float32, seed=5)
    ids_host = nearest(x.numpy(), c.cuda(), chunk=16384)
    assert np.array_equal(ids_host, nearest(x.cuda(), c.cuda()).cpu().numpy())
