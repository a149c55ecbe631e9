"""Visual vocabulary: k-means over grid features (the 10,000×2048 codebook) and assignment to it.

:func:`kmeans` follows FAISS ``Clustering`` (the tool the X-LXMERT authors used):

- at most ``k * max_points_per_centroid`` training points, a uniform sample without replacement
  (seeded) when there are more;
- centroids initialised from ``k`` distinct training points drawn at random (seeded);
- each iteration: assign every training point to its nearest centroid (:func:`xlx_fast.ops.
  nearest.nearest`, so the fused kernel on CUDA), record the objective (sum of squared distances
  to the centroids *before* the update, as FAISS's ``obj``), recompute each centroid as the mean of
  its points (segment reduction by ``index_add_``: each block of ``SUM_BLOCK`` points summed in
  float32, the blocks' partial sums accumulated in float64; FAISS sums each cluster in float32
  over all its points), then split clusters
  that came out empty exactly as FAISS does: pick a donor cluster cj, scanning j = 0, 1, ... with
  probability (size_j - 1) / (n - k) of stopping, copy it, move the two copies apart by a relative
  ±1/1024 on alternating coordinates, and give each half of the donor's count.

The random streams are numpy's (seeded from ``seed``), not FAISS's, so the same seed gives a
different but equally distributed run; objectives agree to well under 1% on non-degenerate data.

:func:`assign` maps a (possibly huge, memory-mapped) ``.npy`` of features to centroid ids chunk by
chunk.

Memory at large k (the same at k = 65,536 as at 10,000, per entry): :func:`kmeans` holds the
training sample (n × D fp32), the centroids (k × D fp32), one k × D float64 table of sums (divided
in place into the new centroids) and ``nearest``'s bounded scratch (at most 2^25 fp32 scores on
the CPU, at most 256 MB of per-split partials on a GPU); :func:`assign` one chunk of features, the
centroids and ``nearest``'s scratch. Nothing holds points × k. The FAISS sampling cap makes the
training sample k × 256 points: at k = 65,536 and D = 2048 that is 137 GB, so a vocabulary that
large needs a smaller ``max_points_per_centroid``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from xlx_fast.ops.nearest import nearest

__all__ = ["KMeansResult", "kmeans", "assign"]

_SPLIT_EPS = 1.0 / 1024  # FAISS's relative perturbation when splitting a cluster
# Points per float32 partial sum of the centroid update (kmeans's ``chunk``). A partial adds at
# most this many points, so its relative error stays below SUM_BLOCK * 2^-24 = 2.4e-4 in the
# worst case (~1e-6 typically); the partials then add in float64. Summing every point in float64
# instead needed a float64 copy of the training sample per iteration: 40 of 258 ms an iteration
# at 50,000 x 512 points and k = 1024 on a 2-core Xeon, where the update now takes 8 ms.
SUM_BLOCK = 4096


def _cluster_sums(x: torch.Tensor, ids: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """float64 [k, D]: the sum of the rows of ``x`` (float32 [n, D]) in each cluster of ``ids``,
    ``block`` rows at a time in float32."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    part = torch.empty(k, x.shape[1], dtype=torch.float32, device=x.device)
    for r0 in range(0, x.shape[0], block):
        sums += part.zero_().index_add_(0, ids[r0:r0 + block], x[r0:r0 + block])
    return sums


@dataclass
class KMeansResult:
    """centroids: float32 [k, d] on the compute device. objective[i]: sum of squared distances
    of the training points at iteration i (before that iteration's update). n_split[i]: empty
    clusters re-seeded at iteration i. n_train: training points used (after subsampling)."""
    centroids: torch.Tensor
    objective: list = field(default_factory=list)
    n_split: list = field(default_factory=list)
    n_train: int = 0


def _count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; bools, floats and strings are refused (a chunk of 0 or
    -5 once left most of an output array unwritten)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _device(device) -> torch.device:
    """A usable compute device: cpu, or cuda when a CUDA device is present."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available here; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def _nonfinite_rows(t: torch.Tensor, offset: int = 0) -> list[int]:
    """Indices (plus ``offset``) of the first rows of ``t`` holding NaN or inf; [] if none."""
    if bool(torch.isfinite(t.sum())):  # one fast pass: NaN and inf carry (an overflow only costs the scan)
        return []
    bad = ~torch.isfinite(t).all(dim=1)
    if not bool(bad.any()):
        return []
    return (torch.nonzero(bad).flatten()[:8] + offset).tolist()


def _load(features, name: str = "features"):
    """A path becomes a read-only memory map; arrays and tensors pass through."""
    if isinstance(features, (str, os.PathLike)):
        path = os.fspath(features)
        try:
            with open(path, "rb") as f:
                head = f.read(6)
        except FileNotFoundError:
            raise FileNotFoundError(f"{name} file not found: {path}") from None
        if head != b"\x93NUMPY":
            raise ValueError(f"{name} file {path} is not a .npy array (it starts with {head!r}); "
                             "save it with numpy.save")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError) as e:
            raise ValueError(f"{name} file {path} is a damaged or truncated .npy ({e})") from e
    if isinstance(features, (np.ndarray, torch.Tensor)):
        return features
    raise TypeError(f"{name} must be a path, numpy array or torch tensor, got {type(features).__name__}")


def _to_tensor(a) -> torch.Tensor:
    """Tensor view of an array; read-only memory maps (which cannot back a tensor) are copied."""
    if isinstance(a, torch.Tensor):
        return a
    return torch.from_numpy(np.ascontiguousarray(a) if a.flags.writeable else np.array(a))


def _check_2d(name: str, a) -> None:
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(a.shape)}")
    dtype = a.dtype
    ok = dtype.is_floating_point if isinstance(a, torch.Tensor) else np.issubdtype(dtype, np.floating)
    if not ok:
        raise TypeError(f"{name} must be a floating-point array, got {dtype}")


def _split_clusters(centroids: torch.Tensor, counts: np.ndarray, n: int, rng: np.random.Generator) -> int:
    """FAISS's empty-cluster handling, in place on float64 centroids; returns the number split."""
    k = len(counts)
    nsplit = 0
    sign = torch.ones(centroids.shape[1], dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1  # even coordinates grow in the new copy, odd ones shrink (and vice versa)
    for ci in np.flatnonzero(counts == 0):
        if counts[ci] != 0:  # pragma: no cover - cannot happen, kept for clarity
            continue
        # scan cj = 0, 1, ... (cyclically), stopping at cj with probability (counts[cj]-1)/(n-k)
        p = (counts - 1.0) / float(max(n - k, 1))
        while True:
            hit = np.flatnonzero(rng.random(k) < p)
            if len(hit):
                cj = int(hit[0])
                break
        centroids[ci] = centroids[cj] * (1 + _SPLIT_EPS * sign)
        centroids[cj] = centroids[cj] * (1 - _SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
        nsplit += 1
    return nsplit


def kmeans(features, k: int = 10000, n_iter: int = 20, seed: int = 0,
           max_points_per_centroid: int = 256, progress: bool = True, *,
           device: str | torch.device | None = None,
           init_centroids=None, chunk: int = SUM_BLOCK, precision: str = "tf32x3") -> KMeansResult:
    """Lloyd k-means with FAISS semantics (module docstring).

    Args:
        features: [N, D] float array, tensor, or path to a ``.npy`` (memory-mapped; only the
            training sample is read into memory).
        k: number of centroids (N ≥ k required).
        n_iter: Lloyd iterations (each: assign, record objective, update, split).
        seed: seeds the subsample, the initial centroids and the split draws.
        max_points_per_centroid: subsample to k × this many points when N is larger (FAISS's
            default 256; the full X-LXMERT vocabulary then trains on 2.56M points).
        progress: tqdm bar over iterations showing the objective.
        device: where to train; default the tensor's device, CPU for arrays and paths.
        init_centroids: [k, D] starting centroids instead of the random draw.
        chunk: points per float32 partial sum of the centroid update (``SUM_BLOCK``: its
            relative error stays below chunk · 2^-24; the partials add in float64).
        precision: "tf32x3", "ieee" or "tf32" for the assignment GEMM on CUDA (see ``nearest``).

    Returns:
        :class:`KMeansResult`.
    """
    k = _count("k", k)
    n_iter = _count("n_iter", n_iter, minimum=0)
    max_points_per_centroid = _count("max_points_per_centroid", max_points_per_centroid)
    chunk = _count("chunk", chunk)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    x = _load(features)
    _check_2d("features", x)
    n, d = x.shape
    if d < 1:
        raise ValueError(f"features have D = 0 columns, shape {tuple(x.shape)}")
    if n < k:
        raise ValueError(f"features has {n} points, fewer than k = {k}")
    if device is None:
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    device = _device(device)

    rng = np.random.default_rng(seed)
    n_max = k * max_points_per_centroid
    idx = None
    if n > n_max:
        # sorted indices: a memory map is then read front to back
        idx = np.sort(rng.choice(n, size=n_max, replace=False))
        x = x[torch.from_numpy(idx)] if isinstance(x, torch.Tensor) else x[idx]
        n = n_max
    xt = _to_tensor(x)
    xt = xt.to(device=device, dtype=torch.float32).contiguous()
    # only the training sample is read, so only it is checked; rows are reported as input rows
    bad = _nonfinite_rows(xt)
    if bad:
        bad = bad if idx is None else idx[bad].tolist()
        raise ValueError(f"features contain NaN or inf (rows {bad}): clean or drop those rows")

    if init_centroids is None:
        init = torch.from_numpy(rng.permutation(n)[:k]).to(device)
        centroids = xt[init].clone()
    else:
        centroids = torch.as_tensor(np.asarray(init_centroids) if not isinstance(init_centroids, torch.Tensor)
                                    else init_centroids).to(device, torch.float32).clone()
        if tuple(centroids.shape) != (k, d):
            raise ValueError(f"init_centroids must have shape [{k}, {d}], got {tuple(centroids.shape)}")
        bad = _nonfinite_rows(centroids)
        if bad:
            raise ValueError(f"init_centroids contain NaN or inf (rows {bad})")

    result = KMeansResult(centroids=centroids, n_train=n)
    iters = range(n_iter)
    if progress:
        from tqdm.auto import tqdm
        iters = tqdm(iters, desc=f"kmeans k={k}", unit="it")
    for _ in iters:
        ids, dist = nearest(xt, centroids, return_distance=True, precision=precision)
        result.objective.append(float(dist.double().sum()))
        counts = torch.bincount(ids, minlength=k)
        new = _cluster_sums(xt, ids, k, chunk).div_(counts.clamp_min(1).double()[:, None])  # the means
        counts_np = counts.cpu().numpy().astype(np.int64)
        result.n_split.append(_split_clusters(new, counts_np, n, rng))
        centroids = new.float()
        if progress:
            iters.set_postfix(obj=f"{result.objective[-1]:.6g}", split=result.n_split[-1])
    result.centroids = centroids
    return result


def assign(path_or_array, centroids, *, chunk: int = 65536, device: str | torch.device | None = None,
           return_distance: bool = False, progress: bool = True, precision: str = "tf32x3"):
    """Nearest-centroid id of every row of a features array, chunk by chunk.

    Args:
        path_or_array: [N, D] ``.npy`` path (memory-mapped), numpy array / memmap or tensor.
        centroids: [K, D] path, array or tensor.
        chunk: rows read, converted to float32 and searched per step.
        device: where to search (CUDA → the Triton kernel); default the centroids' device if a
            tensor, else the CPU.
        return_distance: also return squared distances.
        progress: tqdm bar over chunks.
        precision: "tf32x3", "ieee" or "tf32" (float32 on CUDA only; see ``nearest``).

    Returns:
        int64 numpy ids [N] (and float32 distances [N]).
    """
    chunk = _count("chunk", chunk)
    x = _load(path_or_array)
    c = _load(centroids, "centroids")
    _check_2d("features", x)
    _check_2d("centroids", c)
    if c.shape[0] < 1 or c.shape[1] < 1:
        raise ValueError(f"centroids must be a non-empty [K, D] array, got shape {tuple(c.shape)}")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"features have D = {x.shape[1]} but centroids have D = {c.shape[1]}")
    if device is None:
        device = c.device if isinstance(c, torch.Tensor) else torch.device("cpu")
    device = _device(device)
    ct = _to_tensor(c)
    ct = ct.to(device=device, dtype=torch.float32).contiguous()
    bad = _nonfinite_rows(ct)
    if bad:
        raise ValueError(f"centroids contain NaN or inf (rows {bad})")
    n = x.shape[0]
    ids = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32) if return_distance else None
    starts = range(0, n, chunk)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, total=(n + chunk - 1) // chunk, desc="assign", unit="chunk")
    written = 0
    for r0 in starts:
        xs = _to_tensor(x[r0:r0 + chunk]).to(device=device, dtype=torch.float32)
        # an inf row has no nearest centroid (every distance is inf): refuse it, as NaN is
        bad = _nonfinite_rows(xs, offset=r0)
        if bad:
            raise ValueError(f"features contain NaN or inf (rows {bad}): clean or drop those rows")
        out = nearest(xs, ct, return_distance=return_distance, precision=precision)
        if return_distance:
            ids[r0:r0 + len(xs)] = out[0].cpu().numpy()
            dist[r0:r0 + len(xs)] = out[1].cpu().numpy()
        else:
            ids[r0:r0 + len(xs)] = out.cpu().numpy()
        written += len(xs)
    if written != n:  # pragma: no cover - the loop covers [0, n) by construction; never return holes
        raise RuntimeError(f"assign wrote {written} of {n} rows")
    return (ids, dist) if return_distance else ids
