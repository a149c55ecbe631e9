"""The visual grid: its size and its cells' box positions (neutral ground: the reference, the
strategies and the fast path all read it).

Plain constants, importable without torch or transformers, so that argument checks (the CLI,
the strategies' step limits) read the cell count from here instead of repeating 64.
"""
GRID = 8
N_CELLS = GRID * GRID


def box_positions(grid: int = GRID, dtype=None, device=None):
    """[grid², 4] boxes, the model's constant ``visual_pos`` input: cell (row i, col j), index
    ``i·grid + j``, gets ``(x0, y0, x1, y1) = (j/grid, i/grid, (j+1)/grid, (i+1)/grid)``.
    ``dtype`` None means float32. (torch is imported here, not at the top: the constants above
    stay importable without it.)"""
    import torch

    if isinstance(grid, bool) or not isinstance(grid, int):
        raise TypeError(f"grid must be an int, got {type(grid).__name__}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    i, j = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                          torch.arange(grid, dtype=torch.float64), indexing="ij")
    boxes = torch.stack([j, i, j + 1, i + 1], dim=-1).reshape(grid * grid, 4) / grid
    return boxes.to(dtype=torch.float32 if dtype is None else dtype, device=device)
