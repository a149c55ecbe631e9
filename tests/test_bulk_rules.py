"""The rules of bulk generation that keep its output true to its manifest, and the matching
rules of single-caption mode: an image in a bulk out-dir is exactly the one single mode and
``xlx_fast.generate`` make from its manifest entry, a resume never mixes settings, keys each
entry on its content and checks each PNG, a second run into the same out-dir is refused, and
every bad option is one ``error:`` line before any model is built.

Runs use the embedded default at ``--size tiny`` with 2 steps.
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from xlx_fast.cli import bulk
from xlx_fast.cli.bulk import BulkError, read_lines
from xlx_fast.cli import main
from xlx_fast.cli.generation_options import engine_seed

from test_cli_errors import assert_user_error, run_cli

BIG_SEED = 2 ** 40
CAPTIONS = ["a red bus", "", json.dumps({"caption": "two dogs", "seed": BIG_SEED}), "cows in the snow"]
TINY = ["--size", "tiny", "--steps", "2"]


def bulk_args(caps, out, *extra):
    return ["generate", "--captions-file", str(caps), "--out-dir", str(out), "--batch-size", "2",
            *TINY, *extra]


def manifest(out):
    return {e["line"]: e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def caps(tmp_path_factory):
    path = tmp_path_factory.mktemp("caps") / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return path


@pytest.fixture(scope="module")
def base(caps, tmp_path_factory):
    """A finished greedy run and what it printed (stderr is not a terminal under pytest)."""
    out = tmp_path_factory.mktemp("base")
    proc = subprocess.run([sys.executable, "-m", "xlx_fast.cli", *bulk_args(caps, out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


@pytest.fixture
def copy(base, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(base[0], out)
    return out


def test_blank_line_keeps_numbers_and_is_reported(base):
    out, err = base
    m = manifest(out)
    assert sorted(m) == [1, 3, 4]
    assert m[4]["seed"] == 4 and m[1]["seed"] == 1  # default seed: --seed (0) + line number
    assert "1 blank line(s) skipped (line 2)" in err


def test_progress_and_notes_without_a_terminal(base):
    err = base[1]
    assert "pictures are noise" in err
    assert "building the model" in err
    assert "[2/3] images written" in err and "[3/3] images written" in err


def test_seed_outside_range_reproduces_in_single_mode_and_python(base, tmp_path):
    out = base[0]
    entry = manifest(out)[3]
    assert entry["given_seed"] == BIG_SEED and entry["seed"] == engine_seed(BIG_SEED)
    assert f"line 3: {BIG_SEED} -> {entry['seed']}" in base[1]
    # single mode, given the seed the line asked for or the one recorded: the same PNG
    for seed in (BIG_SEED, entry["seed"]):
        png = tmp_path / f"single_{seed}.png"
        assert main(["generate", "two dogs", "--seed", str(seed), *TINY, "-o", str(png)]) == 0
        assert png.read_bytes() == (out / "000003.png").read_bytes()

    import numpy as np
    import torch
    from PIL import Image

    import xlx_fast
    from xlx_fast import reference
    from xlx_fast.models import XLxmertForImageGeneration
    from xlx_fast.text import CaptionTokenizer

    model = XLxmertForImageGeneration.from_default(seed=0, size="tiny").eval()
    ids, mask = CaptionTokenizer.fallback()(["two dogs"])
    result = xlx_fast.generate(model, ids, mask, steps=2, seed=entry["seed"])
    assert result.ids[0].tolist() == entry["ids"]
    image = reference.paint(model, result.codes, seed=entry["seed"])[0].float()
    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    assert np.array_equal(pixels, np.asarray(Image.open(out / "000003.png")))
    assert torch.is_tensor(result.codes)


def test_temperature_is_used_and_matches_single_mode(caps, base, tmp_path):
    out = tmp_path / "hot"
    assert main(bulk_args(caps, out, "--temperature", "5")) == 0
    m = manifest(out)
    assert m[1]["temperature"] == 5.0
    assert (out / "000001.png").read_bytes() != (base[0] / "000001.png").read_bytes()
    png = tmp_path / "single.png"
    assert main(["generate", "a red bus", "--seed", "1", "--temperature", "5", *TINY, "-o", str(png)]) == 0
    assert png.read_bytes() == (out / "000001.png").read_bytes()


def test_nothing_to_do_exits_before_building(copy, caps, monkeypatch, capsys):
    def no_model(args):
        raise AssertionError("a model was built for a run with nothing to do")

    monkeypatch.setattr("xlx_fast.cli.generate.load_model", no_model)
    assert main(bulk_args(caps, copy)) == 0
    assert "all 3 images are already in" in capsys.readouterr().err


def test_edited_caption_is_redone(copy, caps, tmp_path, capsys):
    edited = tmp_path / "edited.txt"
    edited.write_text("\n".join(["a red bus", "", json.dumps({"caption": "two cats", "seed": BIG_SEED}),
                                 "cows in the snow"]) + "\n")
    kept = (copy / "000001.png").stat().st_mtime_ns
    assert main(bulk_args(edited, copy)) == 0
    assert "1 of 3 images to make" in capsys.readouterr().err
    m = manifest(copy)
    assert m[3]["caption"] == "two cats"
    assert hashlib.sha256((copy / "000003.png").read_bytes()).hexdigest() == m[3]["sha256"]
    assert (copy / "000001.png").stat().st_mtime_ns == kept


def test_torn_manifest_line_is_dropped_and_redone(copy, caps, base, capsys):
    # an interrupted run: its shard's last line torn in half, no merged manifest yet
    text = (copy / "manifest.jsonl").read_text()
    os.remove(copy / "manifest.jsonl")
    (copy / "manifest.rank0.jsonl").write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    assert main(bulk_args(caps, copy)) == 0
    err = capsys.readouterr().err
    assert "torn last line" in err and "3 of 3 images in" in err
    assert (copy / "manifest.jsonl").read_text() == (base[0] / "manifest.jsonl").read_text()
    assert not [n for n in os.listdir(copy) if n.startswith("manifest.rank")]


def test_truncated_png_is_redone(copy, caps, base, capsys):
    whole = (copy / "000004.png").read_bytes()
    (copy / "000004.png").write_bytes(whole[: len(whole) // 2])
    assert main(bulk_args(caps, copy)) == 0
    err = capsys.readouterr().err
    assert "000004.png" in err and "1 of 3 images to make" in err
    assert (copy / "000004.png").read_bytes() == whole
    assert not [n for n in os.listdir(copy) if n.endswith(".tmp")]


@pytest.mark.parametrize("extra,match", [
    (["--steps", "3"], "--steps 3 (there: 2)"),
    (["--seed", "1000"], "--seed 1000 (there: 0)"),
    (["--strategy", "random"], "--strategy random (there: mask_predict)"),
    (["--temperature", "0.5"], "--temperature 0.5 (there: 0.0)"),
    (["--size", "base"], "--size base (there: tiny)"),
    (["--grid", "16"], "--grid 16 (there: 8)"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_resume_with_other_settings_is_refused(copy, caps, extra, match):
    before = {n: (copy / n).read_bytes() for n in os.listdir(copy)}
    result = run_cli(bulk_args(caps, copy, *extra), copy.parent)  # the last --steps counts
    assert_user_error(result, match)
    assert "--overwrite" in result[2]
    assert {n: (copy / n).read_bytes() for n in os.listdir(copy) if n != ".xlx-fast.lock"} == \
        {n: b for n, b in before.items() if n != ".xlx-fast.lock"}


def test_settings_without_a_grid_mean_8x8(copy, caps, capsys):
    """A settings.json written before the grid was recorded resumes at 8×8 and gains the grid;
    another grid is refused."""
    path = copy / "settings.json"
    old = json.loads(path.read_text())
    assert old.pop("grid") == 8
    path.write_text(json.dumps(old))
    assert_user_error(run_cli(bulk_args(caps, copy, "--grid", "32"), copy.parent), "--grid 32 (there: 8)")
    assert main(bulk_args(caps, copy)) == 0
    assert "all 3 images are already in" in capsys.readouterr().err
    assert json.loads(path.read_text())["grid"] == 8


def test_overwrite_starts_over(copy, caps):
    assert main(bulk_args(caps, copy, "--seed", "1000", "--overwrite")) == 0
    m = manifest(copy)
    assert m[1]["seed"] == 1001 and json.loads((copy / "settings.json").read_text())["seed"] == 1000


def test_a_locked_out_dir_is_refused(copy, caps):
    with open(copy / ".xlx-fast.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert_user_error(run_cli(bulk_args(caps, copy), copy.parent), "in use by another run")


def test_two_runs_into_one_out_dir(caps, tmp_path):
    """Started together with different seeds: one runs, the other is refused (by the lock, or
    by the settings when the first has finished), and the manifest is true to its images."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "xlx_fast.cli", *bulk_args(caps, out, "--seed", seed)],
                              stderr=subprocess.PIPE, text=True) for seed in ("0", "1000")]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    winner = json.loads((out / "settings.json").read_text())["seed"]
    rc, err = results[1 if winner == 0 else 0]
    assert rc == 2 and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert {n: e["seed"] for n, e in manifest(out).items()} == {1: winner + 1, 3: engine_seed(BIG_SEED),
                                                               4: winner + 4}


def test_lines_end_at_newline_only(tmp_path):
    path = tmp_path / "caps.txt"
    data = b"a red\rbus\ncows\r\n\r\n  \nlast"
    path.write_bytes(data)
    items, skipped = read_lines(str(path), 0)
    assert [(it["line"], it["caption"], it["seed"]) for it in items] == [(1, "a red\rbus", 1), (2, "cows", 2),
                                                                         (5, "last", 5)]
    assert skipped == [3, 4]
    assert data.count(b"\n") == 4  # wc -l: the unterminated last line is line 5


def test_json_line_parameters(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_text('{"caption": " x ", "temperature": 2, "strategy": "tlbr"}\n')
    items, _ = read_lines(str(path), 10, steps=None, temperature=0.5)
    assert items == [dict(line=1, caption="x", seed=11, steps=64, strategy="tlbr", temperature=2.0)]
    path.write_text('{"caption": "x", "temperature": -1}\n')
    with pytest.raises(BulkError, match=":1: 'temperature'"):
        read_lines(str(path), 0)
    path.write_text('{"caption": "x", "strategy": "tlbr"}\n')
    with pytest.raises(BulkError, match=":1: --steps 100 with strategy tlbr"):
        read_lines(str(path), 0, steps=100)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    (d / "caps.txt").write_text("a red bus\n")
    (d / "a_file").write_text("x")
    return d


BULK_ARG_ERRORS = [
    (["--steps", "0"], "--steps 0:"),
    (["--steps", "-3"], "--steps -3:"),
    (["--steps", "5000"], "--steps 5000:"),
    (["--strategy", "tlbr", "--steps", "100"], "at most 64"),
    (["--temperature", "nan"], "--temperature nan"),
    (["--temperature", "-1"], "--temperature -1"),
    (["--temperature", "1e-40"], "at least 1e-30"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--batch-size", "100000000"], "--batch-size 100000000"),
    (["--impl", "reference"], "--impl reference"),
    (["--out-dir", "a_file"], "--out-dir a_file is a file"),
    (["--out-dir", "a_file/sub"], "a_file is a file"),
    (["--out-dir", "/proc/xlx_fast_test"], "cannot write"),
    (["--captions-file", "missing.txt"], "--captions-file missing.txt: no such file"),
    (["--vocab", "missing.txt"], "--vocab missing.txt"),
]


@pytest.mark.parametrize("extra,match", BULK_ARG_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bulk_argument_errors(files, extra, match):
    args = ["generate", "--captions-file", "caps.txt", "--out-dir", "out", "--size", "tiny", *extra]
    assert_user_error(run_cli(args, files), match)
    assert not (files / "out").exists()


@pytest.mark.parametrize("caption", ["", "   ", "\t\n"])
def test_single_mode_refuses_a_blank_caption(files, caption):
    assert_user_error(run_cli(["generate", "a bus", caption, "--size", "tiny"], files), "caption 2 is blank")


def test_single_mode_says_what_it_does(tmp_path, capsys):
    assert main(["generate", "a red bus", *TINY, "-o", str(tmp_path / "x.png")]) == 0
    err = capsys.readouterr().err
    order = [err.index(s) for s in ("building the model", "sampling", "painting", "done in")]
    assert order == sorted(order)
    assert "model" in err.split("done in", 1)[1] and "painting" in err.split("done in", 1)[1]


def test_lock_is_released_after_a_run(copy, caps):
    assert main(bulk_args(caps, copy)) == 0
    with open(copy / bulk.LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_flagged_row_gets_no_image_and_fails_the_run(caps, tmp_path, monkeypatch, capsys):
    # NaN weights that only the "cows" line reaches (its words' embedding rows): the engine
    # flags that row; bulk must not paint it as if it were fine, must say so, exit non-zero,
    # and leave it for a rerun
    import torch

    from xlx_fast.cli import generate as single
    from xlx_fast.text import CaptionTokenizer

    ids, mask = CaptionTokenizer.fallback()(["cows in the snow"])
    others, _ = CaptionTokenizer.fallback()(["a red bus", "two dogs"])
    poison = sorted(set(ids[0][mask[0]].tolist()) - set(others.flatten().tolist()))
    assert poison
    real = single.load_model

    def poisoned(args):
        model = real(args)
        with torch.no_grad():
            model.bert.embeddings.word_embeddings.weight[poison] = float("nan")
        return model

    monkeypatch.setattr("xlx_fast.cli.generate.load_model", poisoned)
    out = tmp_path / "out"
    assert main(bulk_args(caps, out)) == 1
    err = capsys.readouterr().err
    assert "error: line 4: sampler step flagged" in err and "1 line(s) got no image: 4" in err
    assert sorted(manifest(out)) == [1, 3] and not (out / "000004.png").exists()
    monkeypatch.setattr("xlx_fast.cli.generate.load_model", real)
    assert main(bulk_args(caps, out)) == 0  # the rerun makes the missing one
    assert sorted(manifest(out)) == [1, 3, 4]
