"""The SPADE generator on N×N grids (8, 16, 32): N×N codes to the same picture, log2(S/N)
upsampling blocks (models/generator.py), seeded, each cell painting its own square, the 8×8
generator unchanged, and a generator file of another grid refused by name.
"""
import dataclasses

import pytest
import torch

from xlx_fast import reference
from xlx_fast.models import SIZES, Generator, GeneratorConfig, XLxmertForImageGeneration
from xlx_fast.models.checkpoint import CheckpointError, save_authors_format

GRIDS = (8, 16, 32)


def tiny(grid, seed=1):
    return XLxmertForImageGeneration.from_default(seed=seed, size="tiny", grid=grid)


def random_codes(model, b, seed=0):
    ids = torch.randint(0, model.n_clusters, (b, model.n_cells),
                        generator=torch.Generator().manual_seed(seed))
    return ids, model.centroids[ids]


def test_the_8x8_generator_is_the_papers():
    for size in SIZES:
        cfg = SIZES[size].generator
        assert cfg.init_size == 8 and cfg.for_grid(8) == cfg
    assert GeneratorConfig().n_blocks == 5 and GeneratorConfig().target_size == 256
    model = tiny(8)
    assert model.generator.config == SIZES["tiny"].generator
    assert len(model.generator.resblocks) == len(model.generator.to_RGB_blocks) == 2


@pytest.mark.parametrize("grid,blocks", [(8, 5), (16, 4), (32, 3)])
def test_base_generator_paints_each_grid_to_256(grid, blocks):
    cfg = GeneratorConfig().for_grid(grid)
    assert (cfg.init_size, cfg.target_size, cfg.n_blocks) == (grid, 256, blocks)
    g = Generator(cfg)
    conv = lambda i, o, k, groups=1: i // groups * o * k * k + o  # noqa: E731
    spade = conv(32, 128, 3) + 2 * conv(128, 32, 3)
    block = 2 * spade + 2 * conv(32, 32, 3) + conv(32, 32, 1) + 2
    expected = conv(2048, 256, 1) + 2 * conv(256, 32, 3, groups=4) + blocks * (block + conv(32, 3, 3))
    assert sum(p.numel() for p in g.parameters()) == expected
    g.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = g(torch.randn(1, grid, grid, 2048), torch.Generator().manual_seed(0))
    assert img.shape == (1, 3, 256, 256) and img.min() >= 0 and img.max() <= 1


@pytest.mark.parametrize("grid", GRIDS)
def test_tiny_models_paint_their_grid_deterministically(grid):
    model = tiny(grid)
    cfg = model.generator.config
    # the tiny picture is 32×32, or 2N where that is larger (at least one upsampling block)
    assert (cfg.init_size, cfg.target_size) == (grid, max(32, 2 * grid))
    _, codes = random_codes(model, 2)
    img = reference.paint(model, codes, seed=7)
    assert img.shape == (2, 3, cfg.target_size, cfg.target_size)
    assert img.min() >= 0 and img.max() <= 1 and bool(torch.isfinite(img).all())
    assert torch.equal(img, reference.paint(tiny(grid), codes, seed=7))  # same seed, same picture
    assert not torch.equal(img, reference.paint(model, codes, seed=8))   # the noise is on
    assert torch.equal(reference.paint(model, codes, seed=None), reference.paint(model, codes, seed=None))
    # [B, N, N, F] and [B, F, N, N] are the same picture
    cells = codes.reshape(2, grid, grid, -1)
    with torch.no_grad():
        assert torch.equal(model.generator(cells), model.generator(cells.permute(0, 3, 1, 2)))
        with pytest.raises(ValueError, match="codes must be"):
            model.generator(torch.randn(2, grid // 2, grid // 2, model.feat_dim))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("where", ["corner", "middle", "last"])
def test_each_cells_code_paints_its_own_square(grid, where):
    """Changing one cell's code changes the picture most around that cell's square: its own
    square's change is at least half the largest square's, and more than twice that of any
    square 4 cells or more away (instance norm spreads a little everywhere)."""
    model = tiny(grid)
    ids, codes = random_codes(model, 1)
    cell = {"corner": 0, "middle": grid * grid // 2 + grid // 3, "last": grid * grid - 1}[where]
    changed = codes.clone()
    changed[0, cell] = model.centroids[(ids[0, cell] + 1) % model.n_clusters]
    a, b = reference.paint(model, codes, seed=5), reference.paint(model, changed, seed=5)
    side = a.shape[-1] // grid
    per_square = (a - b).abs().sum(1)[0].reshape(grid, side, grid, side).mean((1, 3))
    i, j = divmod(cell, grid)
    r = torch.arange(grid)
    dist = torch.maximum((r[:, None] - i).abs(), (r[None, :] - j).abs())
    own = per_square[i, j]
    assert own > 0.5 * per_square.max()
    assert own > 2 * per_square[dist >= 4].max()


def test_config_checks():
    with pytest.raises(ValueError, match="power of two of at least 2"):
        GeneratorConfig(init_size=16, target_size=16)
    with pytest.raises(ValueError, match="power of two of at least 2"):
        GeneratorConfig(init_size=8, target_size=96)
    with pytest.raises(ValueError, match="init_size must be a positive int"):
        GeneratorConfig(init_size=0)
    with pytest.raises(ValueError, match="grid"):
        GeneratorConfig().for_grid(0)


def test_generator_files_of_each_grid(tmp_path):
    """A generator file loads on its own grid; on another grid (another count of upsampling
    blocks) it is one CheckpointError naming both grids, never resized."""
    paths = {}
    for grid in (8, 16):
        model = tiny(grid, seed=4)
        paths[grid] = [tmp_path / f"lxrt{grid}.pth", tmp_path / f"c{grid}.npy", tmp_path / f"G{grid}.pth"]
        save_authors_format(model, *paths[grid])
        loaded = XLxmertForImageGeneration.from_checkpoint(*paths[grid], size="tiny", grid=grid)
        _, codes = random_codes(model, 1)
        assert torch.equal(reference.paint(loaded, codes, seed=3), reference.paint(model, codes, seed=3))
    with pytest.raises(CheckpointError, match=r"the generator checkpoint paints 16×16 codes \(1 "
                                              r"upsampling block\) but the model's grid is 8×8"):
        XLxmertForImageGeneration.from_checkpoint(*paths[16], size="tiny", grid=8)
    with pytest.raises(CheckpointError, match="paints 8×8 codes .* but the model's grid is 32×32"):
        XLxmertForImageGeneration.from_checkpoint(*paths[8], size="tiny", grid=32)
    # a model and a generator config of different grids are refused when built
    s = SIZES["tiny"]
    from transformers import LxmertConfig
    with pytest.raises(ValueError, match="generator_config paints 16×16 codes but the model's grid is 8×8"):
        XLxmertForImageGeneration(LxmertConfig(**s.lxmert), s.n_clusters,
                                  dataclasses.replace(s.generator, init_size=16), grid=8)
