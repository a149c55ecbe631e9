"""Painting: the generator ("Paint") on a grid of final codes, noise seeded as the authors'
sampler has it. One definition for the reference, single-caption and bulk generation.
"""
from __future__ import annotations

import numbers

import torch

from .xlxmert import GRID, N_CELLS

__all__ = ["paint"]


@torch.no_grad()
def paint(model, codes: torch.Tensor, seed: int | None = 0) -> torch.Tensor:
    """The generator on the final codes: [B, 64, F] → [B, 3, 256, 256] in [0, 1].

    Noise injection is on, as in the authors' sampler, drawn from a generator seeded with
    ``seed`` (``None`` turns the noise off).
    """
    if model.generator is None:
        raise ValueError("the model has no generator: build it with a generator or load one "
                         "with from_checkpoint(..., generator_path=...)")
    b = codes.shape[0]
    if codes.dim() != 3 or codes.shape[1] != N_CELLS:
        raise ValueError(f"codes must be [B, {N_CELLS}, F], got {tuple(codes.shape)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not -2 ** 63 <= seed < 2 ** 64):
        raise ValueError(f"seed must be None or an int in [-2**63, 2**64) (what torch.Generator "
                         f"takes), got {seed!r}")
    gen_param = next(model.generator.parameters())
    grid = codes.reshape(b, GRID, GRID, -1).to(gen_param.dtype)
    noise = None
    if seed is not None:
        noise = torch.Generator(device=gen_param.device).manual_seed(seed)
    return model.generator(grid, noise)
