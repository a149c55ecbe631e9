"""xlx_fast.vocab: k-means vs faiss.Kmeans, chunked assignment over .npy memory maps, the CLI."""
import json

import numpy as np
import pytest
import torch

from xlx_fast.cli import main as cli_main
from xlx_fast.ops.nearest import nearest
from xlx_fast.vocab import assign, kmeans

faiss = pytest.importorskip("faiss")


def gaussian(n=20000, d=32, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def blobs(n=20000, d=32, centers=100, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)) * 2
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_objective_within_1pct_of_faiss():
    x = gaussian()
    ours = kmeans(x, k=64, n_iter=20, seed=0, progress=False)
    km = faiss.Kmeans(32, 64, niter=20, seed=0)
    km.train(x)
    assert len(ours.objective) == 20 and ours.n_train == 64 * 256  # subsampled as FAISS does
    assert abs(ours.objective[-1] / km.obj[-1] - 1) < 0.01, (ours.objective[-1], km.obj[-1])
    assert ours.centroids.shape == (64, 32) and ours.centroids.dtype == torch.float32


def test_same_start_same_trajectory_as_faiss():
    """With the same initial centroids and no subsampling, every iteration's objective matches."""
    x = blobs()
    init = x[np.random.default_rng(1).permutation(len(x))[:64]]
    ours = kmeans(x, k=64, n_iter=10, max_points_per_centroid=1000, init_centroids=init, progress=False)
    km = faiss.Kmeans(32, 64, niter=10, max_points_per_centroid=1000)
    km.train(x, init_centroids=init)
    np.testing.assert_allclose(ours.objective, km.obj, rtol=1e-4)
    np.testing.assert_allclose(ours.centroids.numpy(), km.centroids, rtol=1e-3, atol=1e-3)


def test_objective_is_recorded_before_update_and_decreases():
    x = blobs(n=5000, d=8, centers=20)
    res = kmeans(x, k=20, n_iter=8, seed=3, progress=True)
    obj = np.array(res.objective)
    assert np.all(np.diff(obj) <= 1e-6 * obj[:-1])
    # objective[i] is the cost of the assignment made at iteration i; after the last update the
    # cost can only be lower
    _, d2 = nearest(torch.from_numpy(x), res.centroids, return_distance=True)
    assert float(d2.double().sum()) <= obj[-1] * (1 + 1e-6)


def test_empty_clusters_are_split():
    x = blobs(n=3000, d=6, centers=10, seed=2)
    init = x[:12].copy()
    init[5] = init[2]  # duplicates: the later copy gets no point (ties go to the lowest index)
    init[9] = init[2]
    res = kmeans(x, k=12, n_iter=5, init_centroids=init, progress=False)
    assert res.n_split[0] == 2
    ids = nearest(torch.from_numpy(x), res.centroids)
    assert len(np.unique(ids.numpy())) == 12  # every cluster in use at the end


def test_assign_memmap_in_chunks(tmp_path):
    x = blobs(n=3001, d=16)
    c = x[:50].copy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "c.npy", c)
    ids, dist = assign(tmp_path / "x.npy", tmp_path / "c.npy", chunk=700, return_distance=True,
                       progress=False)
    ref = ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    assert ids.dtype == np.int64 and ids.shape == (3001,)
    top2 = np.sort(ref, 1)[:, :2]
    ok = top2[:, 1] - top2[:, 0] > 1e-3
    assert ok.mean() > 0.95 and np.array_equal(ids[ok], ref.argmin(1)[ok])
    np.testing.assert_allclose(dist, ref.min(1), rtol=1e-4, atol=1e-3)
    # float16 features are widened chunk by chunk
    np.save(tmp_path / "x16.npy", x.astype(np.float16))
    ids16 = assign(str(tmp_path / "x16.npy"), c, chunk=1000, progress=False)
    assert (ids16 == ids).mean() > 0.95


def test_cli_fit_and_assign(tmp_path, capsys):
    x = blobs(n=2000, d=8, centers=12)
    np.save(tmp_path / "f.npy", x)
    rc = cli_main(["vocab", "fit", str(tmp_path / "f.npy"), "-o", str(tmp_path / "c.npy"), "-k", "12",
                   "--iters", "4", "--seed", "1", "--objective", str(tmp_path / "obj.json"), "--quiet"])
    assert rc == 0
    c = np.load(tmp_path / "c.npy")
    assert c.shape == (12, 8) and c.dtype == np.float32
    assert len(json.loads((tmp_path / "obj.json").read_text())["objective"]) == 4
    rc = cli_main(["vocab", "assign", str(tmp_path / "f.npy"), str(tmp_path / "c.npy"), "-o",
                   str(tmp_path / "ids.npy"), "--distances", str(tmp_path / "d.npy"), "--chunk", "333",
                   "--quiet"])
    assert rc == 0
    ids = np.load(tmp_path / "ids.npy")
    assert np.array_equal(ids, nearest(x, c))
    assert np.load(tmp_path / "d.npy").shape == (2000,)
    # bad input: clear message, exit code 2
    np.save(tmp_path / "bad.npy", np.zeros((5, 3), np.float32))
    rc = cli_main(["vocab", "assign", str(tmp_path / "bad.npy"), str(tmp_path / "c.npy"), "-o",
                   str(tmp_path / "x.npy"), "--quiet"])
    assert rc == 2 and "D = 3" in capsys.readouterr().err


@pytest.mark.parametrize("d", [48, 7])
def test_assign_65536_centroids_equals_fp64_brute_force(tmp_path, capsys, d):
    """A 65,536-entry vocabulary: every id is the float64 brute force's first minimal index, ties
    included (small-integer data: exact in fp32, duplicated centroids far apart), through the
    memory-mapped API in chunks and through ``xlx-fast vocab assign``."""
    k = 65_536
    rng = np.random.default_rng(d)
    c = rng.integers(-3, 4, size=(k, d)).astype(np.float32)
    pairs = ((3, k - 1), (70, 40_000), (2048 * 5 + 1, 2048 * 5 + 9))
    for first, copy in pairs:
        c[copy] = c[first]
    x = rng.integers(-3, 4, size=(37, d)).astype(np.float32)
    for r, (_, copy) in enumerate(pairs):
        x[r] = c[copy]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "c.npy", c)
    cd, xd = c.astype(np.float64), x.astype(np.float64)
    s = (cd * cd).sum(1)[None, :] - 2 * xd @ cd.T
    ref = s.argmin(1)  # the first minimal index
    ref_dist = (xd * xd).sum(1) + s.min(1)
    ids, dist = assign(tmp_path / "x.npy", tmp_path / "c.npy", chunk=16, return_distance=True,
                       progress=False)
    assert np.array_equal(ids, ref) and np.array_equal(dist.astype(np.float64), ref_dist)
    for r, (first, copy) in enumerate(pairs):
        assert ids[r] == int(np.flatnonzero((c == c[copy]).all(1))[0]) <= first
    rc = cli_main(["vocab", "assign", str(tmp_path / "x.npy"), str(tmp_path / "c.npy"), "-o",
                   str(tmp_path / "ids.npy"), "--chunk", "5", "--quiet"])
    assert rc == 0 and np.array_equal(np.load(tmp_path / "ids.npy"), ref)
    assert "assigned 37 rows" in capsys.readouterr().out


@pytest.mark.parametrize("features,kw,err,match", [
    (np.zeros((10, 3), np.float32), dict(k=11), ValueError, "fewer than k"),
    (np.zeros((10, 3), np.float32), dict(k=0), ValueError, "k must be"),
    (np.zeros(10, np.float32), dict(k=2), ValueError, "features must be 2-D"),
    (np.zeros((10, 3), np.int32), dict(k=2), TypeError, "features must be a floating"),
    ([[0.0, 1.0]], dict(k=1), TypeError, "features must be a path"),
    (np.zeros((10, 3), np.float32), dict(k=2, init_centroids=np.zeros((3, 3))), ValueError, "init_centroids"),
])
def test_kmeans_bad_input(features, kw, err, match):
    with pytest.raises(err, match=match):
        kmeans(features, progress=False, **kw)


def test_kmeans_nan_features():
    x = gaussian(n=100, d=4)
    x[7, 1] = np.nan
    x[42, 3] = -np.inf
    with pytest.raises(ValueError, match=r"features contain NaN or inf \(rows \[7, 42\]\)"):
        kmeans(x, k=4, progress=False)


def test_the_nan_check_passes_finite_rows_whose_sum_overflows():
    # the check sums the sample first and scans rows only when the sum is not finite: an
    # overflowing sum of finite values must come out clean
    from xlx_fast.vocab import _nonfinite_rows

    x = torch.full((8, 2), 3e38)
    assert _nonfinite_rows(x) == []
    x[5, 0] = float("nan")
    assert _nonfinite_rows(x, offset=10) == [15]


def test_assign_bad_input():
    with pytest.raises(ValueError, match="centroids have D = 4"):
        assign(np.zeros((5, 3), np.float32), np.zeros((2, 4), np.float32), progress=False)
    with pytest.raises(ValueError, match="centroids must be 2-D"):
        assign(np.zeros((5, 3), np.float32), np.zeros(3, np.float32), progress=False)


@pytest.mark.gpu
def test_gpu_kmeans_matches_cpu_objective():
    x = gaussian(n=50000, d=64)
    gpu = kmeans(x, k=128, n_iter=10, seed=0, progress=False, device="cuda")
    cpu = kmeans(x, k=128, n_iter=10, seed=0, progress=False)
    assert abs(gpu.objective[-1] / cpu.objective[-1] - 1) < 1e-3
