"""Every ``xlx-fast`` subcommand, run as a real process with bad arguments: exit code 2, exactly
one ``error:`` line on stderr naming what is wrong, no traceback.

Argument errors must be caught before a model is built: the process never imports
``transformers`` (no model can exist without it; seen through ``-X importtime``). That is the
structure asked for, and it holds on any machine: no test here times anything (a busy or slow
machine stretches every duration). Errors in file contents (a truncated checkpoint, NaN
centroids, inf features) need the files read, so only their message and exit code are checked.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch



def run_cli(args, cwd, timeout=600):
    """(returncode, stdout, stderr without import-time lines, imported modules). The timeout only
    guards against a hang."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "xlx_fast.cli", *args],
                          cwd=cwd, env=env, capture_output=True, timeout=timeout)
    err_lines, modules = [], set()
    for line in proc.stderr.decode("utf-8", "replace").splitlines():
        if line.startswith("import time:"):
            modules.add(line.rsplit("|", 1)[-1].strip())
        else:
            err_lines.append(line)
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), "\n".join(err_lines), modules


def assert_user_error(result, match, *, argument_error=True):
    rc, out, err, modules = result
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    assert match in error_lines[0], (match, error_lines[0])
    if argument_error:
        assert not any(m == "transformers" or m.startswith("transformers.") for m in modules), \
            "an argument error must be caught before the model code is imported"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 8)).astype(np.float32)
    np.save(d / "feats.npy", feats)
    inf = feats.copy()
    inf[123, 4] = np.inf
    np.save(d / "feats_inf.npy", inf)
    np.save(d / "cents.npy", rng.normal(size=(6, 8)).astype(np.float32))
    nan = rng.normal(size=(6, 8)).astype(np.float32)
    nan[2, 0] = np.nan
    np.save(d / "cents_nan.npy", nan)
    np.save(d / "cents_str.npy", np.array([["a", "b"], ["c", "d"]]))
    (d / "text.pth").write_text("hello, this is not a checkpoint\n")
    (d / "empty.pth").write_bytes(b"")
    torch.save({"w": torch.zeros(1000)}, d / "ok.pth")
    blob = (d / "ok.pth").read_bytes()
    (d / "truncated.pth").write_bytes(blob[: len(blob) // 2])
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "bus"]) + "\n")
    (d / "notvocab.txt").write_text("hello\nworld\n")
    (d / "a_file").write_text("x")
    (d / "outdir").mkdir()
    return d


GENERATE_ARG_ERRORS = [
    (["--steps", "0"], "--steps 0"),
    (["--steps", "-3"], "--steps -3"),
    (["--strategy", "tlbr", "--steps", "65"], "--steps 65"),
    (["--strategy", "confidence", "--steps", "100"], "at most 64"),
    (["--steps", "100000"], "1024"),
    (["--steps", "abc"], "--steps"),
    (["--strategy", "greedy"], "--strategy"),
    (["--dtype", "fp64"], "--dtype"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "1e-40"], "--temperature 1e-40: must be 0 (greedy) or at least 1e-30"),
    (["--temperature", "0.5", "--impl", "reference"], "--impl fast"),
    (["--device", "xyz"], "--device xyz"),
    (["--device", "meta"], "--device meta"),
    (["--device", "cuda:x"], "--device cuda:x"),
    (["--seed", "1.5"], "--seed"),
    (["--checkpoint", "missing.pth", "--centroids", "cents.npy", "--generator", "ok.pth",
      "--vocab", "vocab.txt"], "--checkpoint missing.pth"),
    (["--checkpoint", "text.pth", "--centroids", "cents.npy", "--generator", "ok.pth",
      "--vocab", "vocab.txt"], "not a PyTorch checkpoint"),
    (["--checkpoint", "empty.pth", "--centroids", "cents.npy", "--generator", "ok.pth",
      "--vocab", "vocab.txt"], "--checkpoint empty.pth"),
    (["--checkpoint", "outdir", "--centroids", "cents.npy", "--generator", "ok.pth",
      "--vocab", "vocab.txt"], "is a directory"),
    (["--checkpoint", "ok.pth", "--centroids", "text.pth", "--generator", "ok.pth",
      "--vocab", "vocab.txt"], "--centroids text.pth: not a .npy"),
    (["--checkpoint", "ok.pth", "--centroids", "cents.npy", "--generator", "text.pth",
      "--vocab", "vocab.txt"], "--generator text.pth"),
    (["--checkpoint", "ok.pth"], "--centroids"),
    (["--centroids", "cents.npy"], "--checkpoint"),
    (["--checkpoint", "ok.pth", "--centroids", "cents.npy"], "--generator"),
    (["--checkpoint", "ok.pth", "--centroids", "cents.npy", "--generator", "ok.pth"], "--vocab"),
    (["--vocab", "missing.txt"], "--vocab missing.txt"),
    (["--vocab", "notvocab.txt"], "not a BERT vocabulary"),
    (["-o", "outdir"], "-o outdir is a directory"),
    (["-o", "picture.txt"], "unknown image extension '.txt'"),
    (["-o", "a_file/x.png"], "is a file"),
    (["-o", "/proc/xlx_fast_test.png"], "cannot write"),
]


@pytest.mark.parametrize("extra,match", GENERATE_ARG_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_generate_argument_errors(files, extra, match):
    assert_user_error(run_cli(["generate", "a red bus", *extra], files), match)


def test_generate_caption_with_undecodable_bytes(files):
    # bytes that are not UTF-8 reach Python as lone surrogates
    result = run_cli(["generate", os.fsdecode(b"a \xff\xfe bus")], files)
    assert_user_error(result, "caption 1 is not valid text")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_generate_cuda_without_cuda(files):
    assert_user_error(run_cli(["generate", "x", "--device", "cuda"], files), "no CUDA device")


VOCAB_ARG_ERRORS = [
    (["assign", "feats.npy", "cents.npy", "-o", "ids.npy", "--chunk", "0"], "--chunk"),
    (["assign", "feats.npy", "cents.npy", "-o", "ids.npy", "--chunk", "-5"], "--chunk"),
    (["fit", "feats.npy", "-o", "c.npy", "-k", "0"], "--clusters"),
    (["fit", "feats.npy", "-o", "c.npy", "--iters", "-1"], "--iters"),
    (["fit", "feats.npy", "-o", "c.npy", "--max-points-per-centroid", "0"], "--max-points-per-centroid"),
    (["fit", "feats.npy", "-o", "outdir"], "-o outdir is a directory"),
    (["fit", "feats.npy", "-o", "a_file/c.npy"], "is a file"),
    (["fit", "feats.npy", "-o", "/proc/xlx_fast_test.npy"], "cannot write"),
    (["assign", "feats.npy", "cents.npy", "-o", "ids", "--distances", "ids.npy"], "must differ"),
    (["fit", "missing.npy", "-o", "c.npy"], "features missing.npy"),
    (["assign", "feats.npy", "missing.npy", "-o", "ids.npy"], "centroids missing.npy"),
    (["fit", "feats.npy", "-o", "c.npy", "--device", "xyz"], "--device xyz"),
    (["assign", "feats.npy", "cents.npy", "-o", "ids.npy", "--device", "meta"], "--device meta"),
]


@pytest.mark.parametrize("extra,match", VOCAB_ARG_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_vocab_argument_errors(files, extra, match):
    assert_user_error(run_cli(["vocab", *extra], files), match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("action", [["fit", "feats.npy", "-o", "c.npy"],
                                    ["assign", "feats.npy", "cents.npy", "-o", "ids.npy"]])
def test_vocab_cuda_without_cuda(files, action):
    assert_user_error(run_cli(["vocab", *action, "--device", "cuda"], files), "no CUDA device")


@pytest.mark.parametrize("args,match", [
    (["info", "--bogus"], "--bogus"),
    ([], "required"),
    (["paint"], "invalid choice"),
    (["vocab"], "required"),
])
def test_parser_errors(files, args, match):
    assert_user_error(run_cli(args, files), match)


# -- errors in file contents: the files must be read first ---------------------------------------

@pytest.mark.parametrize("args,match", [
    (["assign", "feats_inf.npy", "cents.npy", "-o", "ids.npy", "--quiet"],
     "features contain NaN or inf (rows [123])"),
    (["assign", "feats.npy", "cents_nan.npy", "-o", "ids.npy", "--quiet"], "centroids contain NaN or inf (rows [2])"),
    (["assign", "feats.npy", "cents_str.npy", "-o", "ids.npy", "--quiet"], "centroids must be a floating"),
    (["assign", "text.pth", "cents.npy", "-o", "ids.npy", "--quiet"], "features file text.pth is not a .npy"),
    (["fit", "feats_inf.npy", "-o", "c.npy", "-k", "4", "--quiet"], "features contain NaN or inf (rows [123])"),
    (["fit", "feats.npy", "-o", "c.npy", "-k", "301", "--quiet"], "fewer than k = 301"),
])
def test_vocab_content_errors(files, args, match):
    assert_user_error(run_cli(["vocab", *args], files), match, argument_error=False)
    assert not (files / "ids.npy").exists() and not (files / "c.npy").exists()


@pytest.mark.parametrize("args,match", [
    (["--checkpoint", "truncated.pth", "--centroids", "cents.npy"], "damaged or truncated"),
    (["--checkpoint", "ok.pth", "--centroids", "cents_str.npy"], "must hold numbers"),
    (["--checkpoint", "ok.pth", "--centroids", "cents_nan.npy"], "contain NaN or inf (rows [2])"),
])
def test_generate_content_errors(files, args, match):
    result = run_cli(["generate", "a bus", *args, "--generator", "ok.pth", "--vocab", "vocab.txt"], files)
    assert_user_error(result, match, argument_error=False)


@pytest.fixture(scope="module")
def tiny_checkpoint(files):
    """A tiny model in the authors' three-file format, with a vocabulary whose [PAD] is id 3."""
    from xlx_fast.models import XLxmertForImageGeneration
    from xlx_fast.models.checkpoint import save_authors_format

    d = files / "tiny"
    d.mkdir()
    model = XLxmertForImageGeneration.from_default(seed=1, size="tiny")
    save_authors_format(model, d / "lxrt.pth", d / "centroids.npy", d / "G.pth")
    words = ["zebra", "[UNK]", "bus", "[PAD]", "[CLS]", "[SEP]", "a", "red", "on", "the", "street"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    with torch.no_grad():
        model.bert.encoder.x_layers[0].visual_attention.att.query.weight[3, 5] = float("nan")
    save_authors_format(model, d / "lxrt_nan.pth", d / "centroids_nan_w.npy")
    return d


def test_nan_weight_is_named(tiny_checkpoint):
    d = tiny_checkpoint
    result = run_cli(["generate", "a bus", "--size", "tiny", "--checkpoint", "lxrt_nan.pth",
                      "--centroids", "centroids.npy", "--generator", "G.pth", "--vocab", "vocab.txt"], d)
    assert_user_error(result, "bert.encoder.x_layers.0.visual_attention.att.query.weight",
                      argument_error=False)


def test_generate_succeeds_on_the_cases_that_once_failed(tiny_checkpoint):
    """A 64-bit seed, a 500-word caption (cut, with one note), sampling at a temperature, a
    checkpoint with a [PAD] that is not id 0, and an output name without extension."""
    d = tiny_checkpoint
    caption = " ".join(["red bus on the street"] * 100)  # 500 words, 502 tokens
    rc, out, err, _ = run_cli(["generate", caption, "a zebra", "--size", "tiny", "--steps", "2",
                                  "--seed", str(2 ** 63 - 1), "--temperature", "0.8",
                                  "--checkpoint", "lxrt.pth", "--centroids", "centroids.npy",
                                  "--generator", "G.pth", "--vocab", "vocab.txt", "-o", "pics/bus"], d)
    assert rc == 0, err
    assert "Traceback" not in err and "error:" not in err
    cut = [line for line in err.splitlines() if "note: the model reads 20 tokens" in line]
    assert len(cut) == 1 and "caption 1 (502 tokens)" in cut[0] and "caption 2" not in cut[0]
    assert "note: --seed 9223372036854775807 is outside [0, 2**31)" in err
    for i in range(2):
        assert f"wrote pics/bus_{i}.png" in out
        assert (d / "pics" / f"bus_{i}.png").stat().st_size > 0


def test_vocab_fit_reports_the_path_it_writes(files):
    rc, out, err, _ = run_cli(["vocab", "fit", "feats.npy", "-o", "cnoext", "-k", "4", "--iters", "2",
                                  "--quiet"], files)
    assert rc == 0, err
    assert out.strip().endswith("wrote cnoext.npy")
    assert np.load(files / "cnoext.npy").shape == (4, 8) and not (files / "cnoext").exists()


# -- train ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_dir(files):
    """A data directory (captions + cluster ids for the tiny model's 97 clusters), a non-empty
    directory, and a finished 4-step tiny run (saved at steps 2 and 4)."""
    from xlx_fast.cli import main

    d = files / "train"
    data = d / "data"
    data.mkdir(parents=True)
    (data / "captions.txt").write_text("a red bus\na dog on a beach\ntwo cats\na green plate\n")
    np.save(data / "cluster_ids.npy", np.random.default_rng(0).integers(0, 97, (4, 64)))
    (d / "full").mkdir()
    (d / "full" / "notes.txt").write_text("x")
    (d / "a_file").write_text("x")
    assert main(["train", str(data), "--out", str(d / "run"), "--size", "tiny", "--steps", "4",
                 "--batch-size", "2", "--save-every", "2", "--no-progress"]) == 0
    return d


TRAIN_ARG_ERRORS = [
    (["--clip", "-1"], "--clip must be a finite number > 0"),
    (["--clip", "0"], "--clip must be a finite number > 0"),
    (["--clip", "nan"], "--clip must be a finite number > 0"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr=-1e-4"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--weight-decay", "-0.01"], "--weight-decay must be a finite number >= 0"),
    (["--warmup-ratio", "5"], "--warmup-ratio must be in [0, 1]"),
    (["--warmup-ratio", "-0.1"], "--warmup-ratio must be in [0, 1]"),
    (["--stop-at", "0"], "--stop-at must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--save-every", "0"], "--save-every must be >= 1, got 0"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--seed", str(2 ** 32)], "--seed must be in [0, 2**32)"),
    (["--device", "xyz"], "--device"),
    (["--lr", "abc"], "--lr"),
]


@pytest.mark.parametrize("extra,match", TRAIN_ARG_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_train_argument_errors(train_dir, extra, match):
    assert_user_error(run_cli(["train", "data", "--out", "new_run", "--size", "tiny", *extra], train_dir), match)
    assert not (train_dir / "new_run").exists()


@pytest.mark.parametrize("args,match", [
    (["data", "--out", "a_file"], "--out a_file is a file, not a directory"),
    (["data", "--out", "a_file/run"], "is a file, not a directory"),
    (["--make-synthetic", "a_file"], "--make-synthetic a_file is a file, not a directory"),
    (["--make-synthetic", "data"], "already holds a data set (captions.txt, cluster_ids.npy)"),
    (["--make-synthetic", "syn", "--examples", "1"], "--examples must be >= 2"),
    (["data", "--out", "full"], "--out full is not empty (notes.txt): pass --resume"),
    (["data", "--out", "run"], "--out run is not empty"),
    (["data", "--out", "new_run", "--resume"], "--resume: no new_run/last.pt"),
    (["data", "--out", "run", "--resume", "--overwrite"], "give one"),
    (["missing", "--out", "new_run"], "data directory missing does not exist"),
    (["a_file", "--out", "new_run"], "data directory a_file is a file"),
    ([], "give a data directory and --out"),
])
def test_train_path_errors_come_before_the_model(train_dir, args, match):
    assert_user_error(run_cli(["train", *args, "--size", "tiny", "--no-progress"], train_dir), match)
    assert not (train_dir / "new_run").exists() and not (train_dir / "syn").exists()


@pytest.mark.parametrize("extra,match", [
    (["--lr", "1e-3"], "--lr 0.001 (the run has 0.0001)"),
    (["--steps", "8", "--clip", "0.5"], "--steps 8 (the run has 4); --clip 0.5 (the run has 1.0)"),
    (["--warmup-ratio", "0.5"], "--warmup-ratio 0.5 (the run has 0.05)"),
    (["--size", "base"], "--size base (the run has tiny)"),
])
def test_train_resume_refuses_a_changed_hyper_parameter(train_dir, extra, match):
    before = (train_dir / "run" / "last.pt").read_bytes()
    result = run_cli(["train", "data", "--out", "run", "--resume", "--no-progress", *extra], train_dir)
    assert_user_error(result, match)  # read from last.pt, before any model is built
    assert "--resume keeps the run's hyper-parameters" in result[2]
    assert (train_dir / "run" / "last.pt").read_bytes() == before


def test_train_resume_of_a_finished_run_says_there_is_nothing_to_train(train_dir):
    result = run_cli(["train", "data", "--out", "run", "--resume", "--lr", "1e-4"], train_dir)
    assert_user_error(result, "run/last.pt is at step 4, the run's last (--steps 4): nothing to train")


def _damage(blob: bytes, how: str) -> bytes:
    if how == "truncated":
        return blob[: len(blob) // 2]
    if how == "empty":
        return b""
    if how == "text":
        return b"hello, this is not a checkpoint\n"
    b = bytearray(blob)
    b[len(b) // 2 if how == "bit flip in the weights" else 100] ^= 0x10
    return bytes(b)


@pytest.mark.parametrize("how", ["truncated", "empty", "text", "bit flip in the weights", "bit flip in the header"])
def test_train_damaged_last_pt_is_one_error_naming_it(train_dir, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(train_dir / "run", run)
    (run / "last.pt").write_bytes(_damage((run / "last.pt").read_bytes(), how))
    result = run_cli(["train", str(train_dir / "data"), "--out", "run", "--resume", "--no-progress"], tmp_path)
    assert_user_error(result, "run/last.pt is damaged")


def test_train_help_gives_every_default(tmp_path):
    rc, out, err, _ = run_cli(["train", "--help"], tmp_path)
    assert rc == 0, err
    text = " ".join(out.split())
    for option, default in [("--lr", "default 0.0001"), ("--weight-decay", "default 0.01"),
                            ("--warmup-ratio", "default 0.05"), ("--clip", "default 1"),
                            ("--steps", "default 100"), ("--batch-size", "default 8"),
                            ("--save-every", "default 50"), ("--examples", "default 64")]:
        found = re.search(re.escape(option) + r" [A-Z_]+ [^()]*\((default [^)]*)\)", text)
        assert found and found.group(1) == default, (option, found and found.group(0))
