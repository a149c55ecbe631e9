"""The visual grid: its size and its cells' box positions (neutral ground: the reference, the
strategies and the fast path all read it).

The grid is a property of the image model (``XLxmertForImageGeneration(..., grid=N)``: an N×N
grid of N² cells, ``model.grid`` and ``model.n_cells``); everything that has a model reads the
cell count from it. ``GRID``/``N_CELLS`` are the default grid's (the paper's 8×8, 64 cells): plain
constants, importable without torch or transformers, for code that has no model (the CLI's
argument checks, the strategies' defaults).
"""
GRID = 8
N_CELLS = GRID * GRID
# The largest grid a model may have: the sampler step takes at most 1,024 cells a row
# (``ops.sampler_step.MAX_CELLS``). 8, 16 and 32 are the grids the tests cover.
MAX_GRID = 32


def check_grid(grid) -> int:
    """``grid`` as an int in 1..MAX_GRID (TypeError/ValueError naming it otherwise)."""
    if isinstance(grid, bool) or not isinstance(grid, int):
        raise TypeError(f"grid must be an int, got {type(grid).__name__}")
    if not 1 <= grid <= MAX_GRID:
        raise ValueError(f"grid must be in 1..{MAX_GRID} (an N×N grid of at most "
                         f"{MAX_GRID * MAX_GRID} cells, the sampler step's limit), got {grid}")
    return grid


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
