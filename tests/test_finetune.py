"""Fine-tuning for the answer tasks: the fast loss and step against the reference (tiny config,
fp32, dropout 0), the data directory's loader and its errors."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from xlx_fast.models import TASKS, XLxmertForImageGeneration, XLxmertForQuestionAnswering
from xlx_fast.models.checkpoint import CheckpointError, save_authors_format
from xlx_fast.reference import finetune as rf
from xlx_fast.text import CaptionTokenizer
from xlx_fast.training import make_optimizer, prepare_for_training
from xlx_fast.training.task_data import TaskBatch, load_task_data, vqa_score, write_synthetic_task
from xlx_fast.training.tasks import build_answer_model, finetune_step, task_loss

TOKENIZER = CaptionTokenizer.fallback()
FEAT = 48  # the tiny size's visual_feat_dim


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def grad_rel(name, got, want, want_grads):
    """A key projection's bias has gradient 0 in exact arithmetic (softmax is shift-invariant per
    query row): both sides hold rounding noise, measured against the key weight's gradient (as in
    test_training)."""
    if name.endswith("key.bias"):
        scale = want_grads[name[:-len("bias")] + "weight"].detach().double().norm()
        return float((got.detach().double() - want.detach().double()).norm() / scale)
    return rel(got, want)


@pytest.fixture(scope="module", params=sorted(TASKS))
def task_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    write_synthetic_task(d, request.param, n=16, seed=3, size="tiny")
    return request.param, d


def load(task, d):
    return load_task_data(d, task, TOKENIZER, FEAT)


def models(task, labels=None, seed=0):
    ref = build_answer_model(task, seed=seed, size="tiny", labels=labels)
    for m in ref.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ref.train()
    return ref, prepare_for_training(copy.deepcopy(ref)).train()


# ---- the loss and its gradients equal the reference's ----------------------------------------

def test_fast_loss_and_every_gradient_equal_the_reference(task_dir):
    task, d = task_dir
    data = load(task, d)
    ref, fast = models(task, data.answers)
    batch = data.batch([5, 0, 11, 3, 3, 14])
    lr, lf = rf.finetune_loss(ref, batch), task_loss(fast, batch)
    lr.backward()
    lf.backward()
    assert rel(lf, lr) <= 1e-5
    want = {n: p.grad for n, p in ref.named_parameters()}
    n_grads = 0
    for (name, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            n_grads += 1
            assert grad_rel(name, q.grad, p.grad, want) <= 1e-5, name
    assert n_grads > 40
    # the head and the pooler are trained; the last cross layer's visual half never reaches the head
    assert ref.answer_head.logit_fc[3].weight.grad.abs().sum() > 0
    assert ref.bert.pooler.dense.weight.grad.abs().sum() > 0
    assert ref.bert.encoder.x_layers[-1].visn_output.dense.weight.grad is None


def test_the_losses_are_the_authors_formulas(task_dir):
    task, d = task_dir
    data = load(task, d)
    ref, _ = models(task, data.answers)
    batch = data.batch([1, 2, 7])
    from xlx_fast.reference.answer import answer_logits

    with torch.no_grad():
        logits = answer_logits(ref, batch.input_ids, batch.attention_mask, features=batch.features).double()
        got = rf.finetune_loss(ref, batch).double()
    if TASKS[task].loss == "bce":
        y = batch.target.double()
        # -[y log σ(x) + (1 - y) log(1 - σ(x))], averaged over B·A entries (X-LXMERT's vqa.py)
        per = -(y * torch.nn.functional.logsigmoid(logits) + (1 - y) * torch.nn.functional.logsigmoid(-logits))
        want = per.mean()
    else:
        want = -torch.log_softmax(logits, 1)[torch.arange(3), batch.target].mean()
    assert rel(got, want) <= 1e-6


def test_three_steps_give_the_reference_parameters(task_dir):
    task, d = task_dir
    data = load(task, d)
    ref, fast = models(task, data.answers, seed=1)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    o1, s1 = rf.make_optimizer(ref, lr=1e-3, total_steps=10, warmup_ratio=0.1)
    o2, s2 = make_optimizer(fast, lr=1e-3, total_steps=10, warmup_ratio=0.1)
    for step in range(3):
        batch = data.batch([(4 * step + j) % 16 for j in range(4)])
        a = rf.finetune_step(ref, o1, s1, batch)
        b = finetune_step(fast, o2, s2, batch, step=step)
        assert math.isclose(a, b, rel_tol=1e-5)
    # as in test_training: the whole parameter vector to 1e-5, each parameter's update to 1e-3
    # (Adam's m/sqrt(v) turns last-bit differences of near-zero gradients into O(lr) ones)
    pr = torch.cat([p.detach().flatten() for p in ref.parameters()])
    pf = torch.cat([p.detach().flatten() for p in fast.parameters()])
    assert rel(pf, pr) <= 1e-5
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        if name.endswith("key.bias"):
            continue
        d_ref, d_fast = p.detach() - start[name], q.detach() - start[name]
        if d_ref.any():
            assert rel(d_fast, d_ref) <= 1e-3, name


def test_the_loss_decreases_on_synthetic_data(task_dir):
    task, d = task_dir
    data = load(task, d)
    _, model = models(task, data.answers, seed=2)
    opt, sched = make_optimizer(model, lr=1e-3, total_steps=100, warmup_ratio=0.0)
    batch = data.batch(range(len(data)))
    losses = [finetune_step(model, opt, sched, batch, step=s) for s in range(6)]
    with torch.no_grad():
        after = float(task_loss(model, batch))
    assert after < 0.9 * losses[0], losses + [after]


def test_bf16_autocast_loss_is_close_to_fp32(tmp_path):
    _, model = models("vqa")
    write_synthetic_task(tmp_path, "vqa", n=8, seed=0, size="tiny")
    batch = load("vqa", tmp_path).batch(range(8))
    l32 = task_loss(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l16 = task_loss(model, batch)
    assert l16.dtype == torch.float32 and rel(l16, l32) <= 2e-2


# ---- the data directory -----------------------------------------------------------------------

def test_batches_hold_the_files_contents(task_dir):
    task, d = task_dir
    data = load(task, d)
    examples = json.loads((d / "questions.json").read_text())
    img_ids = json.loads((d / "img_ids.json").read_text())
    feats = np.load(d / "features.npy")
    idx = [4, 9, 4]
    b = data.batch(idx)
    assert b.input_ids.shape == b.attention_mask.shape == (3, 20)
    want_ids, want_mask = TOKENIZER([examples[i]["sent"] for i in idx])
    assert torch.equal(b.input_ids, want_ids) and torch.equal(b.attention_mask, want_mask)
    keys = ("img0", "img1") if task == "nlvr2" else ("img_id",)
    for k, i in enumerate(idx):
        rows = [img_ids.index(examples[i][key]) for key in keys]
        got = b.features[k] if task == "nlvr2" else b.features[k][None]
        assert torch.equal(got, torch.from_numpy(feats[rows]))
        if task == "nlvr2":
            assert int(b.target[k]) == examples[i]["label"]
        else:
            want = torch.zeros(TASKS[task].n_answers)
            for a, s in examples[i]["label"].items():
                want[data.answers.index(a)] = s
            assert torch.equal(b.target[k], want)
    assert b.features.dtype == torch.float32 and b.features.shape[-2:] == (64, FEAT)


def test_synthetic_vqa_scores_are_the_official_ones():
    assert [vqa_score(c) for c in range(5)] == [0.0, 0.3, 0.6, 0.9, 1.0]


def _vqa_dir(tmp_path):
    d = tmp_path / "vqa"
    write_synthetic_task(d, "vqa", n=6, seed=0, size="tiny")
    return d


def _edit_json(path, fn):
    obj = json.loads(path.read_text())
    obj = fn(obj) or obj
    path.write_text(json.dumps(obj))


def _set(i, key, value):
    def fn(examples):
        examples[i][key] = value
    return fn


def _del(i, key):
    def fn(examples):
        del examples[i][key]
    return fn


VQA_ERRORS = [
    ("no questions.json", lambda d: (d / "questions.json").unlink(), FileNotFoundError, "no questions.json in"),
    ("no features", lambda d: (d / "features.npy").unlink(), FileNotFoundError, "no features.npy in"),
    ("no image ids", lambda d: (d / "img_ids.json").unlink(), FileNotFoundError, "no img_ids.json in"),
    ("no answers", lambda d: (d / "answers.json").unlink(), FileNotFoundError, "no answers.json in"),
    ("not JSON", lambda d: (d / "questions.json").write_text("[{"), ValueError, "questions.json is not valid JSON"),
    ("empty", lambda d: (d / "questions.json").write_text("[]"), ValueError, "must be a non-empty JSON list"),
    ("width", lambda d: np.save(d / "features.npy", np.zeros((3, 64, 47), np.float32)), ValueError,
     "features of width 47 but the model takes 48-dimensional features"),
    ("rank", lambda d: np.save(d / "features.npy", np.zeros((3, 48), np.float32)), ValueError,
     "must be [N_images, 64, F]"),
    ("dtype", lambda d: np.save(d / "features.npy", np.zeros((3, 64, 48), np.int64)), ValueError,
     "float32 or float16"),
    ("rows", lambda d: _edit_json(d / "img_ids.json", lambda ids: ids[:-1]), ValueError,
     "img_ids.json names 2 images but"),
    ("duplicate image", lambda d: _edit_json(d / "img_ids.json", lambda ids: [ids[0]] * len(ids)), ValueError,
     "appears twice"),
    ("unknown image", lambda d: _edit_json(d / "questions.json", _set(2, "img_id", "COCO_404")), ValueError,
     "example 2 (question_id 2): img_id 'COCO_404' is not in img_ids.json"),
    ("unknown answer", lambda d: _edit_json(d / "questions.json", _set(4, "label", {"zebra": 1})), ValueError,
     "example 4 (question_id 4): answer 'zebra' is not in answers.json"),
    ("answer table length", lambda d: _edit_json(d / "answers.json", lambda a: a[:-1]), ValueError,
     "answers.json has 3128 answers but the vqa head has 3129"),
    ("score", lambda d: _edit_json(d / "questions.json", _set(1, "label", {"yes": 3})), ValueError,
     "'label' must be an object answer -> score in [0, 1]"),
    ("lacks sent", lambda d: _edit_json(d / "questions.json", _del(0, "sent")), ValueError,
     "example 0 (question_id 0) lacks 'sent'"),
    ("lacks id", lambda d: _edit_json(d / "questions.json", _del(3, "question_id")), ValueError,
     "example 3 lacks 'question_id'"),
]


@pytest.mark.parametrize("name,edit,error,match", VQA_ERRORS, ids=[e[0] for e in VQA_ERRORS])
def test_data_errors_name_the_file_and_the_example(tmp_path, name, edit, error, match):
    d = _vqa_dir(tmp_path)
    edit(d)
    with pytest.raises(error, match=match.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load("vqa", d)


def test_many_bad_examples_are_counted_in_one_error(tmp_path):
    d = _vqa_dir(tmp_path)
    _edit_json(d / "questions.json", lambda ex: [dict(e, img_id="x") for e in ex])
    with pytest.raises(ValueError, match=r"6 examples name images that are not in img_ids.json; the first: example 0"):
        load("vqa", d)


def test_gqa_and_nlvr2_label_errors(tmp_path):
    g = tmp_path / "gqa"
    write_synthetic_task(g, "gqa", n=4, seed=0, size="tiny")
    _edit_json(g / "questions.json", _set(1, "label", {"yes": 1.0, "no": 1.0}))
    with pytest.raises(ValueError, match="a GQA 'label' holds exactly one answer, got 2"):
        load("gqa", g)
    n = tmp_path / "nlvr2"
    write_synthetic_task(n, "nlvr2", n=4, seed=0, size="tiny")
    assert not (n / "answers.json").exists()
    _edit_json(n / "questions.json", _set(2, "label", 2))
    with pytest.raises(ValueError, match="'label' must be 0 or 1, got 2"):
        load("nlvr2", n)
    _edit_json(n / "questions.json", _set(2, "img1", "elsewhere"))
    with pytest.raises(ValueError, match="img1 'elsewhere' is not in img_ids.json"):
        load("nlvr2", n)


def test_bad_batches_raise_clear_errors(tmp_path):
    data = load("vqa", _vqa_dir(tmp_path))
    _, model = models("vqa", data.answers)
    b = data.batch([0, 1])
    with pytest.raises(ValueError, match=r"features must be \[2, cells, 48\]"):
        task_loss(model, TaskBatch(b.input_ids, b.attention_mask, b.features[..., :40], b.target))
    with pytest.raises(ValueError, match=r"target must be float scores \[2, 3129\]"):
        task_loss(model, TaskBatch(b.input_ids, b.attention_mask, b.features, b.target[:, :5]))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\)"):
        data.batch([6])
    n_model = build_answer_model("nlvr2", size="tiny")
    with pytest.raises(ValueError, match=r"features must be \[2, 2, cells, 48\]"):
        task_loss(n_model, TaskBatch(b.input_ids, b.attention_mask, b.features, torch.tensor([0, 1])))


# ---- where a fine-tuning run starts ------------------------------------------------------------

def test_the_answer_model_starts_from_a_pretraining_checkpoint(tmp_path):
    pre = XLxmertForImageGeneration.from_default(seed=7, size="tiny", with_generator=False,
                                                 pretraining_heads=True)
    save_authors_format(pre, tmp_path / "Epoch20_LXRT.pth", tmp_path / "centroids.npy")
    model = build_answer_model("nlvr2", seed=0, size="tiny", checkpoint=tmp_path / "Epoch20_LXRT.pth")
    want = pre.bert.state_dict()
    for k, v in model.bert.state_dict().items():
        assert torch.equal(v, want[k]), k
    fresh = build_answer_model("nlvr2", seed=0, size="tiny")
    for k, v in model.answer_head.state_dict().items():  # the head is the seeded fresh one
        assert torch.equal(v, fresh.answer_head.state_dict()[k]), k
    assert model.vis_emb is None and "mask_feat" in model.load_report["unused"]
    assert isinstance(model, XLxmertForQuestionAnswering) and model.task.name == "nlvr2"
    torch.save({"module.mask_feat": torch.zeros(48)}, tmp_path / "nobert.pth")
    with pytest.raises(CheckpointError, match="holds no bert"):
        build_answer_model("vqa", size="tiny", checkpoint=tmp_path / "nobert.pth")
    state = torch.load(tmp_path / "Epoch20_LXRT.pth")
    del state["module.bert.pooler.dense.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing from the checkpoint: pooler.dense.bias"):
        build_answer_model("vqa", size="tiny", checkpoint=tmp_path / "partial.pth")
