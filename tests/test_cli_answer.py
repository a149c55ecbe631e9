"""``xlx-fast answer`` end to end, in subprocesses (``python -m xlx_fast.cli answer``, tiny size).

Every user mistake is one ``error:`` line on stderr and exit status 2, without a traceback.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
F, K = 48, 97  # the tiny size's feature width and codebook


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "xlx_fast.cli", "answer", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def assert_user_error(r, fragment):
    assert r.returncode == 2, (r.returncode, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("answer")
    g = np.random.default_rng(0)
    np.save(d / "img.npy", g.standard_normal((64, F)).astype(np.float32))
    np.save(d / "img_grid.npy", g.standard_normal((8, 8, F)).astype(np.float64))
    np.save(d / "left.npy", g.standard_normal((64, F)).astype(np.float32))
    np.save(d / "pair.npy", g.standard_normal((2, 64, F)).astype(np.float32))
    np.save(d / "ids.npy", g.integers(0, K, (8, 8)))
    np.save(d / "ids_pair.npy", g.integers(0, K, (2, 64)).astype(np.int32))
    np.save(d / "wide.npy", g.standard_normal((64, F + 2)).astype(np.float32))
    np.save(d / "short.npy", g.standard_normal((63, F)).astype(np.float32))
    np.save(d / "int_feats.npy", g.integers(0, 5, (64, F)))
    np.save(d / "float_ids.npy", g.standard_normal(64))
    np.save(d / "big_ids.npy", np.full(64, K))
    nan = g.standard_normal((64, F)).astype(np.float32)
    nan[3, 4] = np.nan
    np.save(d / "nan.npy", nan)
    (d / "text.npy").write_text("not an array\n")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "what", "color",
                                            "is", "the", "bus", "?"]) + "\n")
    (d / "answers3.json").write_text(json.dumps(["a", "b", "c"]))
    (d / "broken.json").write_text("{not json")
    return d


@pytest.fixture(scope="module")
def checkpoint(files):
    """A tiny fine-tuned VQA model saved as the authors' files: the state dict (keys under
    ``module.``), its answer table (an ans2label object) and its centroids; plus one without a
    codebook."""
    from xlx_fast.models import XLxmertForQuestionAnswering

    model = XLxmertForQuestionAnswering.from_default("vqa", seed=4, size="tiny")
    with torch.no_grad():
        model.answer_head.logit_fc[3].weight.mul_(8)
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.startswith("vis_emb")}
    torch.save(state, files / "vqa.pth")
    np.save(files / "centroids.npy", model.vis_emb.weight.numpy())
    labels = [f"word{i}" for i in range(model.n_answers)]
    (files / "ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(labels)}))
    return model, labels


def test_answers_with_the_embedded_default(files):
    r = cli("what color is the bus?", "is it raining?", "--features", "img.npy", "--size", "tiny",
            "--top-k", "3", cwd=files)
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stderr and "garbage" in r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "what color is the bus?" and lines[4] == "is it raining?"
    ranked = [line.split() for line in lines[1:4]]
    assert [row[0] for row in ranked] == ["1.", "2.", "3."]
    scores = [float(row[2]) for row in ranked]
    assert all(0 < s < 1 for s in scores) and scores == sorted(scores, reverse=True)
    assert all(row[1].startswith("answer_") for row in ranked)


def test_json_nlvr2_two_files_and_cluster_ids(files):
    r = cli("the left image has two dogs", "--task", "nlvr2", "--features", "left.npy", "img_grid.npy",
            "--size", "tiny", "--json", cwd=files)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["task"] == "nlvr2" and doc["size"] == "tiny"
    (row,) = doc["results"]
    assert sorted(a["answer"] for a in row["answers"]) == ["false", "true"]
    assert abs(sum(a["score"] for a in row["answers"]) - 1) < 1e-5  # softmax over the two classes
    one_file = json.loads(cli("the left image has two dogs", "--task", "nlvr2", "--features", "pair.npy",
                              "--size", "tiny", "--json", cwd=files).stdout)
    assert [a["answer"] for a in one_file["results"][0]["answers"]]

    r = cli("what?", "--task", "gqa", "--cluster-ids", "ids.npy", "--size", "tiny", "--top-k", "2",
            "--json", cwd=files)
    assert r.returncode == 0, r.stderr
    answers = json.loads(r.stdout)["results"][0]["answers"]
    assert len(answers) == 2 and all(a["answer"] == f"answer_{a['index']}" for a in answers)
    r = cli("same?", "--task", "nlvr2", "--cluster-ids", "ids_pair.npy", "--size", "tiny", cwd=files)
    assert r.returncode == 0, r.stderr


def test_a_checkpoint_answers_as_the_python_api(files, checkpoint):
    import xlx_fast
    from xlx_fast.text import CaptionTokenizer

    model, labels = checkpoint
    r = cli("what color is the bus?", "--checkpoint", "vqa.pth", "--answers", "ans2label.json",
            "--centroids", "centroids.npy", "--vocab", "vocab.txt", "--size", "tiny",
            "--cluster-ids", "ids.npy", "--json", cwd=files)
    assert r.returncode == 0, r.stderr
    assert "garbage" not in r.stderr
    got = json.loads(r.stdout)["results"][0]["answers"]
    ids, mask = CaptionTokenizer.from_vocab(files / "vocab.txt")(["what color is the bus?"])
    want = xlx_fast.answer(model, ids, mask, top_k=5,
                           cluster_ids=torch.from_numpy(np.load(files / "ids.npy")).reshape(1, 64))
    assert [a["answer"] for a in got] == [labels[i] for i in want.top_ids[0].tolist()]
    assert [a["index"] for a in got] == want.top_ids[0].tolist()
    np.testing.assert_allclose([a["score"] for a in got], want.top_scores[0].tolist(), rtol=1e-5)


def test_cli_task_table_matches_the_models():
    from xlx_fast.cli.answer import TASK_IMAGES, TASK_HELP
    from xlx_fast.models.answering import TASKS

    assert TASK_IMAGES == {name: t.images for name, t in TASKS.items()}
    for name in ("vqa", "gqa"):
        assert f"{TASKS[name].n_answers:,} answers" in TASK_HELP[name]


ERRORS = [
    # (arguments after the question, error fragment)
    (["--features", "missing.npy"], "--features missing.npy: no such file"),
    ([], "give the image"),
    (["--features", "text.npy"], "not a .npy file"),
    (["--features", "short.npy"], "shape (63, 48); vqa takes [64, F] or [8, 8, F] per image"),
    (["--features", "wide.npy"], "50 values per cell, but the model reads 48"),
    (["--features", "img.npy", "--size", "base"], "48 values per cell, but the model reads 2048"),
    (["--features", "int_feats.npy"], "holds int64, not floats"),
    (["--cluster-ids", "float_ids.npy"], "holds float64, not integers"),
    (["--cluster-ids", "big_ids.npy"], "ids must lie in [0, 97)"),
    (["--features", "nan.npy"], "NaN or Inf"),
    (["--features", "img.npy", "left.npy"], "vqa takes 1 image per question, got 2 files"),
    (["--task", "nlvr2", "--features", "img.npy"], "nlvr2 judges a statement about two images"),
    (["--task", "nlvr2", "--cluster-ids", "ids.npy"], "nlvr2 judges a statement about two images"),
    (["--task", "nlvr2", "--features", "img.npy", "wide.npy"], "different widths"),
    (["--features", "img.npy", "--answers", "answers3.json"], "has 3 answers but the embedded default"),
    (["--features", "img.npy", "--answers", "broken.json"], "--answers: answer table"),
    (["--features", "img.npy", "--top-k", "0"], "--top-k 0: must be at least 1"),
    (["--task", "nlvr2", "--features", "pair.npy", "--top-k", "3"], "head has only 2 answers"),
    (["--features", "img.npy", "--device", "tpu"], "--device tpu: use cpu, cuda or cuda:N"),
    (["--features", "img.npy", "--centroids", "centroids.npy"], "--centroids needs --checkpoint"),
    (["--features", "img.npy", "--checkpoint", "vqa.pth", "--vocab", "vocab.txt"],
     "--checkpoint needs --answers"),
    (["--features", "img.npy", "--checkpoint", "vqa.pth", "--answers", "ans2label.json"],
     "needs the vocabulary"),
    (["--features", "img.npy", "--checkpoint", "text.npy", "--answers", "ans2label.json",
      "--vocab", "vocab.txt"], "not a PyTorch checkpoint"),
    (["--features", "img.npy", "--checkpoint", "vqa.pth", "--answers", "answers3.json",
      "--vocab", "vocab.txt", "--size", "tiny"], "has 3 answers but the checkpoint's head has"),
    (["--cluster-ids", "ids.npy", "--checkpoint", "vqa.pth", "--answers", "ans2label.json",
      "--vocab", "vocab.txt", "--size", "tiny"], "holds no codebook"),
]


@pytest.mark.parametrize("args,fragment", ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_user_mistakes_are_one_error_line(files, checkpoint, args, fragment):
    size = [] if "--size" in args else ["--size", "tiny"]
    assert_user_error(cli("what color is the bus?", *args, *size, cwd=files), fragment)


def test_blank_question_and_both_inputs(files):
    assert_user_error(cli("  ", "--features", "img.npy", "--size", "tiny", cwd=files),
                      "question 1 is blank")
    r = cli("q", "--features", "img.npy", "--cluster-ids", "ids.npy", cwd=files)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
