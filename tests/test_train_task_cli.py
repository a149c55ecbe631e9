"""``xlx-fast train --task vqa|gqa|nlvr2``: a synthetic set, a short run in a subprocess whose
checkpoint loads with ``XLxmertForQuestionAnswering.from_checkpoint`` and answers, a 2-process
torchrun (gloo, CPU) run making the updates of the 1-process run, resume, and the errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from xlx_fast.cli import main
from xlx_fast.models import XLxmertForQuestionAnswering
from xlx_fast.reference.answer import answer_logits
from xlx_fast.text import CaptionTokenizer
from xlx_fast.training import checkpoint
from xlx_fast.training.task_data import load_task_data

COMMON = ["--size", "tiny", "--steps", "4", "--batch-size", "4", "--dropout", "0", "--no-progress",
          "--lr", "1e-3", "--save-every", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("vqa") / "data"
    assert main(["train", "--make-synthetic", str(d), "--task", "vqa", "--size", "tiny", "--examples", "12"]) == 0
    return d


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1") / "run"
    r = subprocess.run([sys.executable, "-m", "xlx_fast.cli", "train", "--task", "vqa", str(data),
                        "--out", str(out), *COMMON], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"trained to step 4; checkpoints in {out}: step000004_VQA.pth" in r.stdout
    return out


def test_make_synthetic_writes_a_task_data_set(data):
    assert sorted(p.name for p in data.iterdir()) == ["answers.json", "features.npy", "img_ids.json",
                                                       "questions.json"]
    assert len(json.loads((data / "questions.json").read_text())) == 12
    assert len(json.loads((data / "answers.json").read_text())) == 3129


def test_the_checkpoint_loads_and_answers(data, one_process, tmp_path, capsys):
    names = sorted(p.name for p in one_process.iterdir())
    assert names == ["answers.json", "last.pt", "step000002_VQA.pth", "step000004_VQA.pth"]
    model = XLxmertForQuestionAnswering.from_checkpoint(one_process / "step000004_VQA.pth",
                                                        one_process / "answers.json", task="vqa", size="tiny")
    assert model.labels == json.loads((data / "answers.json").read_text())
    state = checkpoint.load_run_state(one_process / "last.pt")
    assert state["step"] == 4 and state["hparams"]["task"] == "vqa"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    # it answers: a label from the table for every question, and the trained run answers
    # better than chance (the synthetic answers are mostly yes/no, colours and objects)
    tasks = load_task_data(data, "vqa", CaptionTokenizer.fallback(), model.feat_dim)
    batch = tasks.batch(range(len(tasks)))
    with torch.no_grad():
        logits = answer_logits(model, batch.input_ids, batch.attention_mask, features=batch.features)
    assert logits.shape == (12, 3129) and torch.isfinite(logits).all()
    answers = [model.labels[i] for i in logits.argmax(1).tolist()]
    questions = json.loads((data / "questions.json").read_text())
    preds = [{"question_id": q["question_id"], "answer": a} for q, a in zip(questions, answers)]
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    capsys.readouterr()
    assert main(["eval", "--task", "vqa", "--data", str(data / "questions.json"),
                 "--predictions", str(tmp_path / "preds.json")]) == 0
    assert "vqa VQA soft accuracy: " in capsys.readouterr().out


def test_two_rank_ddp_matches_one_process(data, one_process, tmp_path):
    out = tmp_path / "run2"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "xlx_fast.cli", "train", "--task", "vqa", str(data), "--out", str(out), *COMMON],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(one_process / "step000004_VQA.pth")
    b = torch.load(out / "step000004_VQA.pth")
    assert a.keys() == b.keys() and all(k.startswith("module.") for k in a)
    assert a["module.answer_head.logit_fc.3.bias"].abs().min() > 0  # trained: the head's bias starts at 0
    flat = lambda sd: torch.cat([v.flatten().double() for v in sd.values()])  # noqa: E731
    assert rel(flat(b), flat(a)) <= 1e-5
    for k in a:
        if not k.endswith("key.bias"):  # rounding noise only, as in test_train_cli
            assert rel(b[k], a[k]) <= 1e-4, k


def test_resume_continues_the_same_run(data, tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "split"
    # in this process both (the subprocess runs use one thread: other reduction orders)
    assert main(["train", "--task", "vqa", str(data), "--out", str(whole), *COMMON]) == 0
    assert main(["train", "--task", "vqa", str(data), "--out", str(out), *COMMON, "--stop-at", "2"]) == 0
    assert not (out / "step000004_VQA.pth").exists()
    assert main(["train", str(data), "--out", str(out), *COMMON, "--resume"]) == 0  # the task is the run's
    a = torch.load(whole / "step000004_VQA.pth")
    b = torch.load(out / "step000004_VQA.pth")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("task", ["gqa", "nlvr2"])
def test_gqa_and_nlvr2_runs_load_and_answer(task, tmp_path):
    d, out = tmp_path / "data", tmp_path / "run"
    assert main(["train", "--make-synthetic", str(d), "--task", task, "--size", "tiny", "--examples", "8"]) == 0
    assert main(["train", "--task", task, str(d), "--out", str(out), *COMMON, "--steps", "2"]) == 0
    model = XLxmertForQuestionAnswering.from_checkpoint(out / f"step000002_{task.upper()}.pth",
                                                        out / "answers.json", task=task, size="tiny")
    tasks = load_task_data(d, task, CaptionTokenizer.fallback(), model.feat_dim)
    b = tasks.batch([0, 1, 2])
    with torch.no_grad():
        logits = answer_logits(model, b.input_ids, b.attention_mask, features=b.features)
    assert logits.shape == (3, model.n_answers) and torch.isfinite(logits).all()
    assert model.labels == (["False", "True"] if task == "nlvr2" else tasks.answers)


def test_errors_are_one_line(data, one_process, tmp_path, capsys):
    def fails(argv, match):
        rc = main(["train", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and match in err and "Traceback" not in err, err
        assert err.strip().count("\n") == 0, err

    out = str(tmp_path / "o")
    fails(["--task", "vqa", str(data), "--out", out, "--centroids", "c.npy"], "--centroids is for --task pretrain")
    fails(["--task", "vqa", "--make-synthetic", str(data)], "already holds a data set (features.npy, questions.json")
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "captions.txt").write_text("a dog\n")
    fails(["--task", "vqa", str(pre), "--out", out], f"no questions.json in {pre} (the vqa data)")
    fails(["--task", "gqa", str(data), "--out", str(one_process), "--resume"], "--task gqa (the run has vqa)")
    fails(["--task", "gqa", str(data), "--out", out, *COMMON], "answers.json has 3129 answers but the gqa head has 1842")
    fails(["--task", "nlvr2", str(data), "--out", out, *COMMON], "lacks 'img0', 'img1'")
    assert not os.path.exists(out)


def test_fine_tuning_starts_from_a_pretraining_checkpoint(data, tmp_path, capsys):
    from xlx_fast.models import XLxmertForImageGeneration
    from xlx_fast.models.checkpoint import save_authors_format

    pre = XLxmertForImageGeneration.from_default(seed=5, size="tiny", with_generator=False, pretraining_heads=True)
    save_authors_format(pre, tmp_path / "Epoch20_LXRT.pth", tmp_path / "centroids.npy")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "color", "is", "the", "there", "a", "?"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    out = tmp_path / "run"
    # warm-up over both steps: step 0 runs at learning rate 0, so step 1's weights are the start's
    assert main(["train", "--task", "vqa", str(data), "--out", str(out), *COMMON, "--steps", "2",
                 "--warmup-ratio", "1", "--stop-at", "1", "--checkpoint", str(tmp_path / "Epoch20_LXRT.pth"),
                 "--vocab", str(tmp_path / "vocab.txt")]) == 0
    assert "took its bert.* weights" in capsys.readouterr().err
    got = torch.load(out / "step000001_VQA.pth")
    for k, v in pre.bert.state_dict().items():
        assert torch.equal(got[f"module.bert.{k}"], v), k
    assert not any(k.startswith(("module.cls.", "module.obj_predict_head.", "module.vis_emb")) for k in got)
    # a real checkpoint needs its vocabulary
    rc = main(["train", "--task", "vqa", str(data), "--out", str(tmp_path / "o"), *COMMON,
               "--checkpoint", str(tmp_path / "Epoch20_LXRT.pth")])
    assert rc == 2 and "needs the vocabulary" in capsys.readouterr().err
