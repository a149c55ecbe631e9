"""The 8×8 grid's box positions, the model's constant ``visual_pos`` input."""
from __future__ import annotations

import torch


def box_positions(grid: int = 8, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[grid², 4] boxes: cell (row i, col j), index ``i·grid + j``, gets
    ``(x0, y0, x1, y1) = (j/grid, i/grid, (j+1)/grid, (i+1)/grid)``."""
    if isinstance(grid, bool) or not isinstance(grid, int):
        raise TypeError(f"grid must be an int, got {type(grid).__name__}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    i, j = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                          torch.arange(grid, dtype=torch.float64), indexing="ij")
    boxes = torch.stack([j, i, j + 1, i + 1], dim=-1).reshape(grid * grid, 4) / grid
    return boxes.to(dtype=dtype, device=device)
