"""Batched painting whose noise belongs to each request: codes of many requests → images.

The generator adds one N(0, 1) noise map per sample at every noise injection (SPEC §1). Painted
in a batch from one ``torch.Generator``, a sample's noise would depend on its position in the
batch and on its neighbours. Here every row gets its own generator seeded with its request's
seed (the generator takes one per row and draws row r's maps from it, in the order painting
that row alone would draw them), so row r of a batch gets exactly the noise of
``reference.paint(model, codes[r:r+1], seed=seed_r)``. The rest of
the generator is per-sample already (convolutions, instance norm), so a request's image does not
depend on what it was painted with: exactly on a CPU, which paints one row per generator call
(below), and up to the float rounding of batched convolutions on a GPU.

Rows per generator call (:func:`rows_per_call`): one on a CPU, the whole batch on a GPU. On a
CPU the base generator's SPADE layers hold B · 128 · 256² floats (32 MB an image at 256×256):
one image's activations stay near the cache, a batch's do not, and a batch costs more per image
than one image alone (measured on a 2-core AMD EPYC, fp32: 0.096 s an image alone, 0.123 s in a
batch of 4, 0.154 s in a batch of 8). A GPU is under-filled by one grid of codes, so it paints batches.

Memory: one [B, 3, S, S] image batch plus the generator's activations (≈ C · 32 · S² values
per live layer at base width 32, C the rows per call); the per-row noise maps are C · S² floats
per injection.

Grid: the codes are the model's N×N grid (``model.grid``; N² rows of F), painted by a generator
built for that grid. A model whose grid no generator paints (none is built yet for 16×16 or
32×32, and nothing is resized) is served without painting: :func:`cannot_paint` says why.
"""
from __future__ import annotations

import torch

from ..grid import GRID


def rows_per_call(device: torch.device) -> int | None:
    """How many rows one generator call paints on ``device``: 1 on a CPU, all (None) elsewhere
    (see the module docstring)."""
    return 1 if torch.device(device).type == "cpu" else None


def cannot_paint(model) -> str | None:
    """Why ``model`` cannot paint (no generator, or one built for another grid), or None."""
    grid = model.grid
    if model.generator is None:
        return (f"the model ({grid}×{grid} grid) has no generator: no generator paints "
                f"{grid}×{grid} codes yet" if grid != GRID else "the model has no generator")
    gen_grid = model.generator.config.init_size
    if gen_grid != grid:
        return (f"the generator paints {gen_grid}×{gen_grid} codes but the model's grid is "
                f"{grid}×{grid} (nothing is resized)")
    return None


@torch.no_grad()
def paint(model, codes: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """``codes`` [B, N², F] (N the model's grid) with one seed per row → uint8 images
    [B, S, S, 3] on the CPU, painted :func:`rows_per_call` rows at a time."""
    reason = cannot_paint(model)
    if reason is not None:
        raise ValueError(f"the server cannot paint: {reason}")
    grid, n_cells = model.grid, model.n_cells
    if codes.dim() != 3 or codes.shape[0] != len(seeds) or codes.shape[1] != n_cells:
        raise ValueError(f"codes must be [B, {n_cells}, F] with one seed per row, got "
                         f"{tuple(codes.shape)} and {len(seeds)} seeds")
    param = next(model.generator.parameters())
    gens = [torch.Generator(device=param.device).manual_seed(int(s)) for s in seeds]
    grid = codes.to(device=param.device, dtype=param.dtype).reshape(codes.shape[0], grid, grid, -1)
    step = rows_per_call(param.device) or len(seeds)
    out = []
    for i in range(0, len(seeds), step):
        images = model.generator(grid[i:i + step], gens[i:i + step])
        out.append((images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out)


def png_bytes(image) -> bytes:
    """uint8 [S, S, 3] → PNG file bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.numpy() if isinstance(image, torch.Tensor) else image).save(buf, format="PNG")
    return buf.getvalue()
