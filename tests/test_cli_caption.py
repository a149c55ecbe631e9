"""`xlx-fast caption` and `xlx-fast generate --caption-back` end to end on the CPU (tiny model)."""
import json

import numpy as np
import pytest
import torch

import xlx_fast
from xlx_fast.cli import main
from xlx_fast.models import XLxmertForImageGeneration
from xlx_fast.models.checkpoint import save_authors_format


@pytest.fixture
def ids_file(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 97, (3, 64)))
    return path


def _json_rows(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_caption_prints_what_the_api_writes(ids_file, capsys):
    assert main(["caption", "--cluster-ids", str(ids_file), "--size", "tiny", "--length", "7",
                 "--json", "--seed", "3"]) == 0
    rows = _json_rows(capsys)
    model = XLxmertForImageGeneration.from_default(seed=0, size="tiny", pretraining_heads=True)
    want = xlx_fast.caption(model, cluster_ids=torch.from_numpy(np.load(ids_file)), length=7, seed=3)
    assert [r["ids"] for r in rows] == [want.tokens(r) for r in range(3)]
    assert all(r["text"] == " ".join(f"[{i}]" for i in r["ids"]) for r in rows)  # no vocabulary
    assert main(["caption", "--cluster-ids", str(ids_file), "--size", "tiny", "--length", "7"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # one caption per image


def test_reference_impl_agrees(ids_file, capsys):
    args = ["caption", "--cluster-ids", str(ids_file), "--size", "tiny", "--length", "5", "--json",
            "--strategy", "tlbr"]
    assert main(args) == 0
    fast = _json_rows(capsys)
    assert main(args + ["--impl", "reference"]) == 0
    assert [r["ids"] for r in _json_rows(capsys)] == [r["ids"] for r in fast]


def test_generate_caption_back_reads_the_painted_ids(tmp_path, capsys):
    out, ids = tmp_path / "p.png", tmp_path / "ids.npy"
    assert main(["generate", "a red bus", "two dogs", "-o", str(out), "--size", "tiny", "--steps", "2",
                 "--caption-back", "--caption-length", "6", "--save-ids", str(ids)]) == 0
    printed = capsys.readouterr().out
    back = [line.split(": ", 1)[1] for line in printed.splitlines() if line.startswith("caption read back")]
    assert len(back) == 2 and np.load(ids).shape == (2, 64)
    # Mask-Predict decides every cell, so the picture's codes are its ids' centroids: the
    # caption command on the saved ids reads the same words
    assert main(["caption", "--cluster-ids", str(ids), "--size", "tiny", "--length", "6"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == back


def test_caption_from_an_authors_checkpoint_with_a_vocabulary(tmp_path, ids_file, capsys):
    model = XLxmertForImageGeneration.from_default(seed=5, size="tiny", with_generator=False,
                                                   pretraining_heads=True)
    ck, cents = tmp_path / "x.pth", tmp_path / "c.npy"
    save_authors_format(model, ck, cents)
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"w{i}" for i in range(len(vocab), 30522)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    assert main(["caption", "--cluster-ids", str(ids_file), "--size", "tiny", "--checkpoint", str(ck),
                 "--centroids", str(cents), "--vocab", str(tmp_path / "vocab.txt"), "--json"]) == 0
    rows = _json_rows(capsys)
    want = xlx_fast.caption(model, cluster_ids=torch.from_numpy(np.load(ids_file)))
    assert [r["ids"] for r in rows] == [want.tokens(r) for r in range(3)]
    assert rows[0]["text"] == " ".join(vocab[i] for i in rows[0]["ids"])


@pytest.mark.parametrize("make,extra,message", [
    (None, [], "no such file"),
    (lambda p: p.write_text("hello"), [], "not a .npy file"),
    (lambda p: np.save(p, np.zeros((2, 64), np.float32)), [], "cluster ids must be integers"),
    (lambda p: np.save(p, np.zeros((2, 63), np.int64)), [], "must be [64] or [images, 64]"),
    (lambda p: np.save(p, np.full((1, 64), 97)), [], "must lie in [0, 97)"),
    (lambda p: np.save(p, np.zeros(64, np.int64)), ["--length", "19"], "a caption has 1 to 18 words"),
    (lambda p: np.save(p, np.zeros(64, np.int64)), ["--length", "0"], "a caption has 1 to 18 words"),
    (lambda p: np.save(p, np.zeros(64, np.int64)), ["--length", "4", "--strategy", "tlbr", "--steps", "5"],
     "--steps 5"),
    (lambda p: np.save(p, np.zeros(64, np.int64)), ["--temperature", "-1"], "--temperature"),
    (lambda p: np.save(p, np.zeros(64, np.int64)), ["--checkpoint", "x.pth"], "--checkpoint needs --centroids"),
])
def test_caption_mistakes_are_one_error_line(tmp_path, capsys, make, extra, message):
    path = tmp_path / "ids.npy"
    if make is not None:
        make(path)
    assert main(["caption", "--cluster-ids", str(path), "--size", "tiny", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_features_of_the_wrong_width_are_refused(tmp_path, capsys):
    path = tmp_path / "f.npy"
    np.save(path, np.zeros((64, 2048), np.float32))  # base width, tiny model reads 48
    assert main(["caption", "--features", str(path), "--size", "tiny"]) == 2
    assert "features are 2048 wide but the model reads 48-wide" in capsys.readouterr().err
    np.save(path, np.zeros((2, 64, 48), np.float32))
    assert main(["caption", "--features", str(path), "--size", "tiny", "--length", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_generate_caption_options_are_checked_first(tmp_path, capsys):
    assert main(["generate", "x", "--size", "tiny", "--caption-length", "40"]) == 2
    assert "--caption-length 40" in capsys.readouterr().err
    assert main(["generate", "x", "--size", "tiny", "--save-ids", str(tmp_path / "ids.txt")]) == 2
    assert "give a .npy file name" in capsys.readouterr().err
    lines = tmp_path / "c.txt"
    lines.write_text("a\n")
    assert main(["generate", "--captions-file", str(lines), "--out-dir", str(tmp_path / "o"),
                 "--caption-back"]) == 2
    assert "not --captions-file" in capsys.readouterr().err
