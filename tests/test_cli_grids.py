"""``--grid N`` on the command line: the model's N×N grid reaches generate, bulk and caption.

Every check against the grid's cells (steps of confidence/tlbr up to N², id arrays of N² cells)
is one ``error:`` line before any model is built; ``generate --grid 16`` samples the ids
``xlx_fast.generate`` samples on the same model, and saves them before painting, so the ids stand
whether or not a generator paints that grid.
"""
import json

import numpy as np
import pytest
import torch

import xlx_fast
from xlx_fast.cli import main
from xlx_fast.models import XLxmertForImageGeneration
from xlx_fast.text import MAX_LENGTH, CaptionTokenizer

from test_cli_errors import assert_user_error, run_cli

TINY = ["--size", "tiny"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("grids")
    rng = np.random.default_rng(0)
    np.save(d / "ids64.npy", rng.integers(0, 97, (2, 64)))
    np.save(d / "ids256.npy", rng.integers(0, 97, (2, 256)))
    np.save(d / "ids16x16.npy", rng.integers(0, 97, (16, 16)))
    np.save(d / "feats64.npy", rng.standard_normal((64, 48)).astype(np.float32))
    (d / "caps.txt").write_text("a red bus\n")
    return d


GRID_ARG_ERRORS = [
    (["generate", "x", *TINY, "--grid", "16", "--strategy", "tlbr", "--steps", "257"], "must be <= 256"),
    (["generate", "x", *TINY, "--grid", "16", "--strategy", "confidence", "--steps", "300"],
     "must be <= 256"),
    (["generate", "x", *TINY, "--strategy", "confidence", "--steps", "65"], "must be <= 64"),
    (["generate", "x", *TINY, "--grid", "32", "--strategy", "tlbr", "--steps", "1025"], "must be <= 1024"),
    (["generate", "--captions-file", "caps.txt", "--out-dir", "out", *TINY, "--grid", "16",
      "--strategy", "tlbr", "--steps", "257"], "at most 256"),
    (["caption", "--cluster-ids", "ids64.npy", *TINY, "--grid", "16"], "[256] or [images, 256]"),
    (["caption", "--cluster-ids", "ids256.npy", *TINY], "[64] or [images, 64]"),
    (["caption", "--features", "feats64.npy", *TINY, "--grid", "16"], "[256, 48]"),
]


@pytest.mark.parametrize("args,match", GRID_ARG_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_grid_argument_errors(files, args, match):
    # caption reads the codebook's shape from the model sizes (models.sizes), so it imports the
    # model code before its checks; still nothing is built
    assert_user_error(run_cli(args, files), match, argument_error=args[0] != "caption")


@pytest.mark.parametrize("grid", ["12", "0", "x"])
def test_only_the_covered_grids_are_choices(grid, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", *TINY, "--grid", grid])
    assert e.value.code == 2 and "--grid" in capsys.readouterr().err


def test_generate_grid_16_samples_the_ids_of_xlx_fast_generate(tmp_path, capsys):
    ids_path = tmp_path / "ids.npy"
    rc = main(["generate", "a red bus", "two dogs", *TINY, "--grid", "16", "--steps", "3",
               "--seed", "5", "-o", str(tmp_path / "x.png"), "--save-ids", str(ids_path)])
    err = capsys.readouterr().err
    assert "16×16 grid" in err
    saved = np.load(ids_path)
    assert saved.shape == (2, 256)
    model = XLxmertForImageGeneration.from_default(seed=0, size="tiny", grid=16)
    xlx_fast.optimize(model)
    input_ids, mask = CaptionTokenizer.fallback()(["a red bus", "two dogs"], MAX_LENGTH)
    want = xlx_fast.generate(model, input_ids, mask, steps=3, seed=5).ids
    assert torch.equal(torch.from_numpy(saved), want.cpu())
    if rc == 0:  # a generator paints 16×16 codes
        assert (tmp_path / "x_0.png").exists() and (tmp_path / "x_1.png").exists()
    else:  # none yet: one clear error naming the grid, nothing resized
        assert rc == 2 and "error: --grid 16:" in err and not (tmp_path / "x_0.png").exists()


def test_generate_takes_confidence_steps_up_to_the_grids_cells(tmp_path):
    ids_path = tmp_path / "ids.npy"
    main(["generate", "a bus", *TINY, "--grid", "16", "--strategy", "tlbr", "--steps", "100",
          "-o", str(tmp_path / "x.png"), "--save-ids", str(ids_path)])
    ids = np.load(ids_path)
    assert ids.shape == (1, 256) and (ids[0, :100] >= 0).all()


def test_caption_reads_ids_on_the_grid(files, tmp_path, capsys):
    for name in ("ids256.npy", "ids16x16.npy"):
        assert main(["caption", "--cluster-ids", str(files / name), *TINY, "--grid", "16",
                     "--length", "3", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == (2 if name == "ids256.npy" else 1)
