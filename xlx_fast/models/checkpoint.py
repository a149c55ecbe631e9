"""Loading the authors' checkpoint files (SPEC §1).

- ``Epoch20_LXRT.pth``: a state dict saved from ``nn.DataParallel`` (keys prefixed
  ``module.``), HF ``LxmertModel`` names under ``bert.``, plus ``obj_predict_head.*``,
  ``mask_feat`` and the pre-training heads ``cls.*`` (reported, then ignored, unless the model
  is built with ``pretraining_heads=True`` to train it further).
- centroids: ``.npy`` float32 [10000, 2048]; they become ``vis_emb.weight`` and therefore the
  head's ``out_cluster.weight`` (tied), whatever the state dict says for those two keys.
- ``G_60.pth``: the generator's state dict (spectral-norm keys ``weight_orig/_u/_v``).

Loading never guesses: a key whose shape differs from the model's is an error naming the key
and both shapes; missing keys are an error (or a warning with ``strict=False``); unused keys
are reported by name.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import torch
from transformers import LxmertConfig

from ..grid import GRID, check_grid
from .sizes import SIZES

# Filled from the centroids file, not the state dict.
_FROM_CENTROIDS = {"vis_emb.weight", "obj_predict_head.out_cluster.weight"}
# HF buffers that older transformers saved and newer ones recompute.
IGNORED_BUFFERS = ("bert.embeddings.position_ids",)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (missing keys, shape mismatches, bad files)."""


def _require_file(path, what: str) -> str:
    if path is None:
        raise ValueError(f"{what} path is required")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{what} {path} is not readable (permissions)")
    return path


def _why_unreadable(path: str, error: Exception) -> str:
    """What is wrong with a file ``torch.load`` refused, in words (torch's own message for a
    text file is a bare opcode number)."""
    with open(path, "rb") as f:
        head = f.read(8)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
    if not head:
        return "the file is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        return f"a zip archive as torch.save writes, but damaged or truncated ({first_line})"
    if head[:1] == b"\x80":  # a pickle protocol header: the legacy torch.save format
        if "weights_only" in str(error) or "Weights only" in str(error):
            return ("a pickle holding objects other than tensors; it is not unpickled, for safety "
                    "(save a plain state dict: torch.save(model.state_dict(), path))")
        return f"a legacy (pickle) checkpoint, but damaged or truncated ({first_line})"
    return (f"not a PyTorch checkpoint (it starts with {head!r}, not a torch.save zip archive "
            f"or pickle)")


def read_state_dict(path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from ``path`` with any ``module.`` (DataParallel) prefix stripped."""
    path = _require_file(path, what)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for corrupt files
        raise CheckpointError(f"could not read {what} {path}: {_why_unreadable(path, e)}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{what} {path} does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse NaN or inf in any floating tensor, naming the first bad keys (one pass over the
    weights, ~0.2 s at base size on 2 CPU cores): a NaN weight would otherwise surface steps
    later as NaN hidden states, far from its cause."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} tensor(s) contain NaN or inf: "
                              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


def read_centroids(path) -> torch.Tensor:
    path = _require_file(path, "centroids")
    with open(path, "rb") as f:
        head = f.read(6)
    if head != b"\x93NUMPY":
        raise CheckpointError(f"could not read centroids {path}: not a .npy file (it starts with "
                              f"{head!r}); save them with numpy.save")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CheckpointError(f"could not read centroids {path}: damaged or truncated .npy ({e})") from e
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise CheckpointError(f"centroids {path} must be one .npy array, got {type(arr).__name__}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise CheckpointError(f"centroids {path} must hold numbers (float32 [clusters, dim]), "
                              f"got dtype {arr.dtype}")
    if arr.ndim != 2 or 0 in arr.shape:
        raise CheckpointError(f"centroids {path} must be a non-empty 2-D array [clusters, dim], "
                              f"got shape {arr.shape}")
    out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    bad = ~torch.isfinite(out).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:8].tolist()
        raise CheckpointError(f"centroids {path} contain NaN or inf (rows {rows})")
    return out


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, *,
              strict: bool, skip: set[str] = frozenset()) -> list[str]:
    """Copy ``state`` into ``module``; returns the unused keys. Raises on shape mismatches,
    and on missing keys when ``strict``."""
    own = module.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and k not in skip and v.shape != own[k].shape]
    if mismatched:
        raise CheckpointError(f"{what}: shape mismatch for {len(mismatched)} key(s):\n  "
                              + "\n  ".join(mismatched))
    missing = sorted(k for k in own if k not in state and k not in skip)
    if missing:
        msg = f"{what}: {len(missing)} key(s) missing from the checkpoint: {', '.join(missing)}"
        if strict:
            raise CheckpointError(msg)
        warnings.warn(msg + " (left at their initial values)", stacklevel=3)
    load = {k: v for k, v in state.items() if k in own and k not in skip}
    check_finite(load, what)
    module.load_state_dict(load, strict=False)
    return sorted(k for k in state if k not in own and k not in skip)


def load_xlxmert(cls, lxmert_path, centroids_path, generator_path=None, *, strict: bool = True,
                 size: str = "base", pretraining_heads: bool = False, grid: int = GRID):
    """Build an ``XLxmertForImageGeneration`` from the authors' files (see module docstring).

    The architecture is ``SIZES[size]`` (``"base"``: HF ``LxmertConfig`` defaults, the authors'
    model); the cluster count and feature size come from the centroids file.
    ``pretraining_heads=True`` builds the model with its ``cls.*`` heads (to resume
    pre-training); otherwise those keys are reported as unused.

    ``grid``: the model's N×N grid (no transformer weight depends on it). The generator is
    built for the grid (``GeneratorConfig.for_grid``: log2(S/N) upsampling blocks); a generator
    file records its grid only as its count of blocks (the authors' ``G_60.pth``: five, 8×8
    codes to 256×256), and a file whose count is not the grid's is refused
    (``CheckpointError`` naming both grids) before the model is built. Nothing is resized.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    grid = check_grid(grid)
    state = read_state_dict(lxmert_path, "X-LXMERT checkpoint")
    centroids = read_centroids(centroids_path)
    gen_state = read_state_dict(generator_path, "generator checkpoint") if generator_path else None

    n_clusters, feat_dim = centroids.shape
    config = LxmertConfig(**{**SIZES[size].lxmert, "visual_feat_dim": feat_dim})
    gen_config = None
    if gen_state is not None:
        gen_config = dataclasses.replace(SIZES[size].generator.for_grid(grid), emb_dim=feat_dim)
        _check_generator_grid(gen_state, gen_config, SIZES[size].generator.target_size)
    model = cls(config, n_clusters, gen_config, grid=grid)
    if pretraining_heads:  # then cls.* keys are loaded (and required when strict)
        model.add_pretraining_heads()

    for k in IGNORED_BUFFERS:
        state.pop(k, None)
    bias = state.get("obj_predict_head.out_cluster.bias")
    if bias is not None and bias.shape != (n_clusters,):
        raise CheckpointError(
            f"obj_predict_head.out_cluster.bias has {bias.shape[0]} entries but the centroids "
            f"file has {n_clusters} clusters")
    core = {k: v for k, v in state.items() if k not in _FROM_CENTROIDS}
    unused = load_into(model, core, "X-LXMERT checkpoint", strict=strict,
                       skip=_FROM_CENTROIDS | {k for k in model.state_dict() if k.startswith("generator.")})
    model.set_centroids(centroids)
    if unused:
        warnings.warn(f"X-LXMERT checkpoint: {len(unused)} unused key(s) (heads not used for "
                      f"generation): {', '.join(unused)}", stacklevel=2)
    if gen_state is not None:
        unused_g = load_into(model.generator, gen_state, "generator checkpoint", strict=strict)
        if unused_g:
            warnings.warn(f"generator checkpoint: unused key(s): {', '.join(unused_g)}", stacklevel=2)
    model.load_report = {"unused": unused}
    return model.eval()


def _check_generator_grid(gen_state: dict, gen_config, target_size: int) -> None:
    """Refuse a generator state dict whose count of upsampling blocks (``resblocks.<i>.*``) is
    not ``gen_config``'s, naming the grid the file was made for and the model's."""
    blocks = {int(k.split(".")[1]) for k in gen_state
              if k.startswith("resblocks.") and k.split(".")[1].isdigit()}
    n_file = max(blocks) + 1 if blocks else 0
    if n_file == gen_config.n_blocks:
        return
    grid = gen_config.init_size
    made_for = target_size >> n_file if n_file and target_size >> n_file << n_file == target_size else None
    what = (f"paints {made_for}×{made_for} codes" if made_for else "was made for another grid")
    raise CheckpointError(f"the generator checkpoint {what} ({_blocks(n_file)}) but the "
                          f"model's grid is {grid}×{grid} ({_blocks(gen_config.n_blocks)} to "
                          f"{gen_config.target_size}×{gen_config.target_size}): load it with "
                          f"grid={made_for if made_for else '<its grid>'} or without "
                          f"generator_path (nothing is resized)")


def _blocks(n: int) -> str:
    return f"{n} upsampling block{'' if n == 1 else 's'}"


def save_authors_format(model, lxmert_path, centroids_path, generator_path=None) -> None:
    """Write ``model`` in the authors' three-file format (``module.``-prefixed state dict,
    ``.npy`` centroids, generator state dict). Used by tests and for exporting."""
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.startswith("generator.")}
    torch.save(state, lxmert_path)
    np.save(centroids_path, model.centroids.detach().cpu().float().numpy())
    if generator_path is not None:
        if model.generator is None:
            raise ValueError("model has no generator to save")
        torch.save(model.generator.state_dict(), generator_path)

