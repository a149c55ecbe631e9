"""A training run's files on disk: written so that a kill at any moment leaves the old file or the
new one (never a torn or empty one), and read back so that a damaged file is named, not loaded.

``last.pt`` holds ``{"format", "step", "hparams", "model", "optimizer", "scheduler", "digest"}``:
``hparams`` are the run's hyper-parameters (a resumed run keeps them), ``digest`` a CRC-32 of
everything else. torch's own loader does not check its archive's checksums, so a flipped bit in
a weight would otherwise load without complaint.

Imports nothing of the model, so a command line can check a run before building one.
"""
from __future__ import annotations

import contextlib
import os
import zlib

import numpy as np
import torch

__all__ = ["FORMAT", "CheckpointError", "atomic_write", "save_torch", "save_npy", "save_run_state",
           "load_run_state", "digest"]

FORMAT = "xlx_fast.train/1"
RUN_KEYS = ("model", "optimizer", "scheduler", "step")


class CheckpointError(ValueError):
    """A run file that cannot be used: damaged, truncated, or not one of ours."""


@contextlib.contextmanager
def atomic_write(path):
    """Yield a binary file in ``path``'s directory; on success it is flushed, fsynced and renamed
    onto ``path`` (and the directory fsynced), on any exception (or a kill) ``path`` is untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_torch(obj, path) -> None:
    with atomic_write(path) as f:
        torch.save(obj, f)


def save_npy(array, path) -> None:
    with atomic_write(path) as f:
        np.save(f, array)


def digest(obj, crc: int = 0) -> int:
    """CRC-32 of a state (nested dicts, lists, tensors, numbers, strings), equal before saving and
    after loading: tensors by dtype, shape and bytes, everything else by ``repr``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(f"T{t.dtype}{tuple(obj.shape)}".encode(), crc)
        return zlib.crc32(t.view(torch.uint8).numpy(), crc)
    if isinstance(obj, dict):
        crc = zlib.crc32(b"{", crc)
        for k, v in obj.items():
            crc = digest(v, digest(k, crc))
        return zlib.crc32(b"}", crc)
    if isinstance(obj, (list, tuple)):
        crc = zlib.crc32(b"[", crc)
        for v in obj:
            crc = digest(v, crc)
        return zlib.crc32(b"]", crc)
    return zlib.crc32(repr(obj).encode(), crc)


def save_run_state(path, *, model, optimizer, scheduler, step: int, hparams: dict) -> None:
    state = {"format": FORMAT, "step": int(step), "hparams": dict(hparams),
             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict()}
    state["digest"] = digest(state)
    save_torch(state, path)


def load_run_state(path) -> dict:
    """The state saved by :func:`save_run_state`, on the CPU. A ``last.pt`` from before hyper-
    parameters and digests were stored loads with ``hparams`` None. Raises
    :class:`CheckpointError` naming ``path`` for anything else."""
    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch reports a torn archive in many ways: all mean the same here
        raise CheckpointError(f"{path} is damaged or not a training checkpoint: torch cannot read it "
                              f"({type(e).__name__})") from None
    if not isinstance(state, dict) or any(k not in state for k in RUN_KEYS):
        raise CheckpointError(f"{path} is not a training checkpoint (it lacks "
                              f"{', '.join(k for k in RUN_KEYS if not isinstance(state, dict) or k not in state)})")
    if "format" not in state:
        state["hparams"] = None
        return state
    stored = state.pop("digest", None)
    if stored is None or digest(state) != stored:  # checked first: the format string may be the damage
        raise CheckpointError(f"{path} is damaged: its contents do not match the checksum written with them")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path} is a checkpoint of format {state['format']!r}, not {FORMAT!r}")
    return state
