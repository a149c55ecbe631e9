"""Painting: the generator ("Paint") on a grid of final codes, noise seeded as the authors'
sampler has it. One definition for the reference, single-caption and bulk generation.
"""
from __future__ import annotations

import numbers

import torch

__all__ = ["paint"]


@torch.no_grad()
def paint(model, codes: torch.Tensor, seed: int | None = 0) -> torch.Tensor:
    """The generator on the final codes: [B, N², F] → [B, 3, S, S] in [0, 1], N the model's
    grid, S the generator's picture size (256 at the base size, whatever the grid).

    Noise injection is on, as in the authors' sampler, drawn from a generator seeded with
    ``seed`` (``None`` turns the noise off). The generator paints the grid it was built for
    (``generator.config.init_size``): a model whose generator was built for another grid is
    refused with a ValueError naming both grids, never resized.
    """
    if model.generator is None:
        raise ValueError("the model has no generator: build it with a generator or load one "
                         "with from_checkpoint(..., generator_path=...)")
    grid, n_cells = model.grid, model.n_cells
    gen_grid = model.generator.config.init_size
    if grid != gen_grid:
        raise ValueError(f"cannot paint a {grid}×{grid} grid: the generator paints {gen_grid}×"
                         f"{gen_grid} codes (nothing is resized)")
    b = codes.shape[0]
    if codes.dim() != 3 or codes.shape[1] != n_cells:
        raise ValueError(f"codes must be [B, {n_cells}, F], got {tuple(codes.shape)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not -2 ** 63 <= seed < 2 ** 64):
        raise ValueError(f"seed must be None or an int in [-2**63, 2**64) (what torch.Generator "
                         f"takes), got {seed!r}")
    gen_param = next(model.generator.parameters())
    cells = codes.reshape(b, grid, grid, -1).to(gen_param.dtype)
    noise = None
    if seed is not None:
        noise = torch.Generator(device=gen_param.device).manual_seed(seed)
    return model.generator(cells, noise)
