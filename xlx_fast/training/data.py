"""Pre-training data on disk: captions plus grid features or cluster ids, and a synthetic set.

A data directory holds:

- ``captions.txt``: one caption per line, example ``i`` on line ``i``;
- ``cluster_ids.npy``: int ``[N, G²]`` cluster ids, or
- ``features.npy``: float32/float16 ``[N, G², F]`` or ``[N, G, G, F]`` grid features, opened
  memory-mapped and turned into ids once (nearest centroid, :func:`xlx_fast.ops.nearest.nearest`,
  chunk by chunk, so the features never need to fit in memory).

:func:`write_synthetic` makes a small such directory (features scattered around the model's own
centroids, captions from a short word list) so a new user can start a run at once.

G×G is the model's grid (``grid=``, 8 by default: 64 cells); a file of another cell count is
refused, naming the grid, never resized.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..grid import GRID, check_grid

__all__ = ["PretrainData", "load_data", "write_synthetic", "global_batch_indices"]


class PretrainData:
    """``captions`` int64 [N, 20] (token ids) and ``cluster_ids`` int64 [N, G²], on the host."""

    def __init__(self, captions: torch.Tensor, cluster_ids: torch.Tensor):
        if captions.shape[0] != cluster_ids.shape[0]:
            raise ValueError(f"{captions.shape[0]} captions but {cluster_ids.shape[0]} images "
                             f"(one caption per image, in the same order)")
        self.captions, self.cluster_ids = captions, cluster_ids

    def __len__(self) -> int:
        return self.captions.shape[0]


def load_data(directory, tokenizer, centroids: torch.Tensor, progress: bool = False,
              grid: int = GRID) -> PretrainData:
    """Read a data directory (see module docstring) for a model of a ``grid``×``grid`` grid.
    Raises ``ValueError`` for files of the wrong shape, width or range, ``FileNotFoundError`` for
    missing ones."""
    from xlx_fast.ops.nearest import nearest

    grid = check_grid(grid)
    cells = grid * grid

    directory = os.fspath(directory)
    cap_path = os.path.join(directory, "captions.txt")
    if not os.path.isfile(cap_path):
        raise FileNotFoundError(f"no captions.txt in {directory}")
    with open(cap_path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{cap_path} holds no caption")
    empty = [i for i, line in enumerate(lines) if not line.strip()]
    if empty:
        raise ValueError(f"{cap_path}: line {empty[0] + 1} is empty (one caption per line)")
    captions, _ = tokenizer(lines)
    k, width = centroids.shape
    ids_path, feat_path = os.path.join(directory, "cluster_ids.npy"), os.path.join(directory, "features.npy")
    if os.path.isfile(ids_path):
        ids = np.load(ids_path, mmap_mode="r")
        if ids.ndim != 2 or ids.shape[1] != cells or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{ids_path} must be an integer array [N, {cells}] ({grid}×{grid} grid), "
                             f"got {ids.dtype} {ids.shape}")
        ids = torch.from_numpy(np.array(ids, dtype=np.int64))  # a writable copy
        if int(ids.min()) < 0 or int(ids.max()) >= k:
            raise ValueError(f"{ids_path}: cluster ids must lie in [0, {k}), got {int(ids.min())}..{int(ids.max())}")
    elif os.path.isfile(feat_path):
        feats = np.load(feat_path, mmap_mode="r")
        if feats.ndim == 4 and feats.shape[1:3] == (grid, grid):
            feats = feats.reshape(feats.shape[0], cells, feats.shape[3])
        if feats.ndim != 3 or feats.shape[1] != cells:
            raise ValueError(f"{feat_path} must be [N, {cells}, F] or [N, {grid}, {grid}, F] ("
                             f"{grid}×{grid} grid), got {feats.shape}")
        if feats.shape[2] != width:
            raise ValueError(f"{feat_path}: features of width {feats.shape[2]} but the centroids are "
                             f"{width}-dimensional")
        if feats.dtype not in (np.float32, np.float16):
            raise ValueError(f"{feat_path} must hold float32 or float16 features, got {feats.dtype}")
        c = centroids.detach().to("cpu", torch.float32 if feats.dtype == np.float32 else torch.float16)
        ids = torch.from_numpy(np.asarray(nearest(feats.reshape(-1, width), c.numpy(), progress=progress)))
        ids = ids.reshape(-1, cells).long()
    else:
        raise FileNotFoundError(f"{directory} holds neither cluster_ids.npy nor features.npy")
    return PretrainData(captions, ids)


_WORDS = ("a man woman dog cat bus train plate pizza table street red blue green small large "
          "sitting standing on in with next to the of near field beach kitchen bird horse").split()


def write_synthetic(directory, centroids: torch.Tensor, n: int = 64, seed: int = 0,
                    noise: float = 0.05, grid: int = GRID) -> None:
    """Write a synthetic data directory: ``n`` captions of 4-12 words and ``features.npy``
    [n, grid², F], each cell a random centroid plus Gaussian noise (std ``noise``·RMS of C)."""
    cells = check_grid(grid) ** 2
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    with open(os.path.join(directory, "captions.txt"), "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) + "\n")
    g = torch.Generator().manual_seed(seed)
    c = centroids.detach().float().cpu()
    ids = torch.randint(0, c.shape[0], (n, cells), generator=g)
    feats = c[ids] + noise * c.pow(2).mean().sqrt() * torch.randn(n, cells, c.shape[1], generator=g)
    np.save(os.path.join(directory, "features.npy"), feats.numpy())


def global_batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The dataset indices of global batch ``step``: positions ``step·B .. step·B + B - 1`` of the
    endless sequence of epochs, each epoch a permutation drawn from (seed, epoch)."""
    out, perms = [], {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perms[epoch][j]))
    return torch.tensor(out)
