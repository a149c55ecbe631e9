"""Batched painting whose noise belongs to each request: codes of many requests → images.

The generator adds one N(0, 1) noise map per sample at every noise injection (SPEC §1). Painted
in a batch from one ``torch.Generator``, a sample's noise would depend on its position in the
batch and on its neighbours. Here every row draws its maps from its own generator seeded with
its request's seed, in the order painting that row alone would draw them, so row r of a batch
gets exactly the noise of ``reference.paint(model, codes[r:r+1], seed=seed_r)``. The rest of
the generator is per-sample already (convolutions, instance norm), so a request's image does not
depend on what it was painted with (up to float rounding of batched convolutions).

Memory: one [B, 3, S, S] image batch plus the generator's activations (≈ B · 32 · S² values
per live layer at base width 32); the per-row noise maps are B · S² floats per injection.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..models.generator import NoiseInjection


@contextmanager
def _per_row_noise(model, generators: list[torch.Generator]):
    """Make every ``NoiseInjection`` of ``model.generator`` draw row r's map from
    ``generators[r]`` (instance-level ``forward`` override, restored on exit)."""
    injections = [m for m in model.generator.modules() if isinstance(m, NoiseInjection)]

    def make(module):
        def forward(x, _generator):
            b, _, h, w = x.shape
            noise = torch.cat([torch.randn(1, 1, h, w, generator=g, device=g.device,
                                           dtype=torch.float32) for g in generators])
            return x + module.weight * noise.to(device=x.device, dtype=x.dtype)
        return forward

    for m in injections:
        m.forward = make(m)
    try:
        yield
    finally:
        for m in injections:
            del m.forward


@torch.no_grad()
def paint(model, codes: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """``codes`` [B, 64, F] with one seed per row → uint8 images [B, S, S, 3] on the CPU.

    Not thread-safe for one model (the noise override is per model): one painter per replica.
    """
    if model.generator is None:
        raise ValueError("the model has no generator: the server needs one to paint")
    if codes.dim() != 3 or codes.shape[0] != len(seeds):
        raise ValueError(f"codes must be [B, 64, F] with one seed per row, got {tuple(codes.shape)} "
                         f"and {len(seeds)} seeds")
    param = next(model.generator.parameters())
    gens = [torch.Generator(device=param.device).manual_seed(int(s)) for s in seeds]
    grid = codes.to(device=param.device, dtype=param.dtype).reshape(codes.shape[0], 8, 8, -1)
    with _per_row_noise(model, gens):
        images = model.generator(grid, gens[0])  # a non-None generator switches the noise on
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def png_bytes(image) -> bytes:
    """uint8 [S, S, 3] → PNG file bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.numpy() if isinstance(image, torch.Tensor) else image).save(buf, format="PNG")
    return buf.getvalue()
