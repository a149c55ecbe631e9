"""Reading the images a command describes by their grid: ``--cluster-ids ids.npy`` (int
[n], [N, N], [B, n] or [B, N, N]) or ``--features feats.npy`` (float [n, F] or [B, n, F]), n = N²
the cells of the model's N×N grid (``--grid N``; 64 on the default 8×8).

Each file is checked (a ``.npy``, its dtype, its shape, ids inside the codebook, features of the
model's width and finite) before any model is built: a mistake is one ``error:`` line.
"""
from __future__ import annotations

from ..grid import GRID
from . import UserError
from .paths import check_input


def read_npy(path: str, option: str):
    """The array in ``path`` (a readable .npy of numbers), or a UserError saying why it is not
    one. Grid files are small (512 KB an image at 2048 features): read whole."""
    import numpy as np

    check_input(path, option)
    with open(path, "rb") as f:
        head = f.read(6)
    if head != b"\x93NUMPY":
        raise UserError(f"{option} {path}: not a .npy file (it starts with {head!r}); save the "
                        "array with numpy.save")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refused
        raise UserError(f"{option} {path}: not an array of numbers ({e})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{option} {path}: damaged or truncated .npy ({e})") from None


def _on_grid(grid: int) -> str:
    return f"the model's {grid}×{grid} grid, --grid {grid}"


def read_cluster_ids(path: str, option: str, n_clusters: int, grid: int = GRID):
    """int64 [B, n] cluster ids from ``path``, n = grid²: [n], [grid, grid], [B, n] or
    [B, grid, grid]."""
    import numpy as np

    cells = grid * grid
    arr = read_npy(path, option)
    if not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{option} {path}: cluster ids must be integers, got dtype {arr.dtype}")
    if arr.ndim >= 2 and arr.shape[-2:] == (grid, grid):
        arr = arr.reshape(*arr.shape[:-2], cells)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != cells or arr.shape[0] < 1:
        raise UserError(f"{option} {path}: cluster ids must be [{cells}] or [images, {cells}] "
                        f"({_on_grid(grid)}), got shape {list(arr.shape)}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n_clusters:
        raise UserError(f"{option} {path}: cluster ids must lie in [0, {n_clusters}) (the "
                        f"codebook's size), got [{lo}, {hi}]")
    return np.ascontiguousarray(arr, dtype=np.int64)


def read_features(path: str, option: str, feat_dim: int, grid: int = GRID):
    """float32 [B, n, F] grid features from ``path``, n = grid²: [n, F] or [B, n, F]."""
    import numpy as np

    cells = grid * grid
    arr = read_npy(path, option)
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserError(f"{option} {path}: features must be floating point, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] != cells or arr.shape[0] < 1:
        raise UserError(f"{option} {path}: features must be [{cells}, {feat_dim}] or "
                        f"[images, {cells}, {feat_dim}] ({_on_grid(grid)}), got shape "
                        f"{list(arr.shape)}")
    if arr.shape[2] != feat_dim:
        raise UserError(f"{option} {path}: features are {arr.shape[2]} wide but the model reads "
                        f"{feat_dim}-wide grid features")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise UserError(f"{option} {path}: features contain NaN or inf")
    return arr


def codebook_shape(args, sizes) -> tuple[int, int]:
    """(clusters, feature width) of the model the options describe, without building it: the
    centroids file's header, or the embedded default's size."""
    if getattr(args, "centroids", None):
        arr = read_npy(args.centroids, "--centroids")
        if arr.ndim != 2:
            raise UserError(f"--centroids {args.centroids}: must be [clusters, dim], got shape "
                            f"{list(arr.shape)}")
        return int(arr.shape[0]), int(arr.shape[1])
    s = sizes[args.size]
    return s.n_clusters, s.lxmert.get("visual_feat_dim", 2048)
