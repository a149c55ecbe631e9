"""X-UNITER pre-training: the heads, the eager reference loss against the formulas, and the fast
step against the reference (loss and every gradient, grids 8, 16 and 32, tiny config, fp32,
dropout 0, as tests/test_training.py does for X-LXMERT)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xlx_fast.models import XLxmertForImageGeneration
from xlx_fast.models.xuniter import XUniterForImageGeneration
from xlx_fast.reference import pretrain as rp
from xlx_fast.reference import xuniter_pretrain as rx
from xlx_fast.training import xuniter_step as xs

from test_training import grad_rel, no_dropout, rel

VOCAB = 30522
K = 97  # the tiny size's clusters


def dataset(n, grid, seed, L=17):
    """``n`` captions of 3..L-3 random words between [CLS] and [SEP] in a padded [n, L], and
    random cluster ids [n, grid²]."""
    g = torch.Generator().manual_seed(seed)
    caps = torch.zeros(n, L, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(3, L - 2, (1,), generator=g))
        caps[i, 0], caps[i, k + 1] = rp.CLS_ID, rp.SEP_ID
        caps[i, 1:k + 1] = torch.randint(1000, VOCAB, (k,), generator=g)
    return caps, torch.randint(0, K, (n, grid * grid), generator=g)


def models(grid=8, seed=0, sdpa=True):
    ref = no_dropout(XUniterForImageGeneration.from_default(
        seed=seed, size="tiny", with_generator=False, pretraining_heads=True, grid=grid)).train()
    fast = copy.deepcopy(ref).train()
    if sdpa:
        xs.prepare_for_training(fast)
    return ref, fast


def batches(caps, ids, sel, step, seed):
    return (rx.make_batch(caps, ids, sel, step, seed, VOCAB),
            xs.make_batch(caps, ids, torch.tensor(sel), step, seed, VOCAB))


# ---- the heads -------------------------------------------------------------------------------

def test_pretraining_heads_are_tied_and_leave_the_rest_unchanged():
    state = torch.random.get_rng_state()
    plain = XUniterForImageGeneration.from_default(seed=3, size="tiny", with_generator=False)
    model = XUniterForImageGeneration.from_default(seed=3, size="tiny", with_generator=False,
                                                   pretraining_heads=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is untouched
    assert plain.cls is None and plain.bert.pooler is None
    a, b = plain.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in set(b) - set(a)} == {
        "bert.pooler", "cls.predictions", "cls.seq_relationship"}
    pred = model.cls.predictions
    assert pred.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert pred.decoder.bias is pred.bias
    H = model.config.hidden_size
    added = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert added == 2 * H * H + 4 * H + VOCAB + 2 * H + 2
    # the same seed draws the same heads; another seed other ones
    again = XUniterForImageGeneration.from_default(seed=3, size="tiny", with_generator=False,
                                                   pretraining_heads=True)
    other = XUniterForImageGeneration.from_default(seed=4, size="tiny", with_generator=False,
                                                   pretraining_heads=True)
    w = "cls.seq_relationship.weight"
    assert torch.equal(again.state_dict()[w], b[w]) and not torch.equal(other.state_dict()[w], b[w])
    assert plain.add_pretraining_heads() is plain and plain.cls is not None


def test_generation_output_is_the_encoders_image_rows():
    model = XUniterForImageGeneration.from_default(seed=1, size="tiny", with_generator=False)
    caps, ids = dataset(3, 8, seed=1)
    feats = model.vis_emb(ids)
    with torch.no_grad():
        seq = model.encode(caps, caps > 0, feats)
        assert seq.shape == (3, 17 + 64, model.config.hidden_size)
        assert torch.equal(model(caps, caps > 0, feats), seq[:, 17:])


# ---- the reference against the formulas ------------------------------------------------------

def test_reference_losses_are_the_formulas():
    """CCC: mean CE over the masked cells of the full [B, N², K] logits; MLM: mean CE over the
    selected words of ``transform(h)·Eᵀ + b`` (E the word table); ITM: CE of the 2-way classifier
    on ``tanh(W·h_[CLS] + b)``. Each from the model's pieces, not from the reference's code."""
    model, _ = models(seed=2)
    caps, ids = dataset(9, 8, seed=2)
    sel = [8, 0, 5, 3, 2]
    C, E = model.centroids, model.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        for step in range(3):
            batch = rx.make_batch(caps, ids, sel, step, 7, VOCAB)
            words = batch.input_ids
            feats = C[batch.cluster_ids].clone()
            feats[batch.vis_mask] = model.mask_feat
            seq = model.encode(words, words > 0, feats)
            got = rx.pretrain_loss(model, batch)
            if batch.task == "vis_mask":
                assert batch.vis_mask.any(1).all() and torch.equal(words, caps[sel])
                head = model.obj_predict_head
                logits = head.linear_feat(head.transform(seq[:, 17:])) @ C.T + head.out_cluster.bias
                lp = logits.log_softmax(-1)[batch.vis_mask]
                want = -lp.gather(1, batch.cluster_ids[batch.vis_mask][:, None]).mean()
            elif batch.task == "word_mask":
                assert not batch.vis_mask.any()
                on = batch.labels != -100
                pred = model.cls.predictions
                logits = pred.transform(seq[:, :17][on]) @ E.T + pred.bias
                want = -logits.log_softmax(-1).gather(1, batch.labels[on][:, None]).mean()
            else:
                pooled = torch.tanh(model.bert.pooler.dense(seq[:, 0]))
                lp = model.cls.seq_relationship(pooled).log_softmax(-1)
                want = -lp.gather(1, batch.labels[:, None]).mean()
                assert set(batch.labels.tolist()) == {0, 1}
            assert rel(got, want) <= 1e-6, batch.task


def test_reference_batches_are_x_lxmerts():
    caps, ids = dataset(11, 16, seed=5)
    for step in range(3):
        a = rx.make_batch(caps, ids, [4, 10, 1], step, 3, VOCAB)
        b = rp.make_batch(caps, ids, [4, 10, 1], step, 3, VOCAB)
        assert a.task == rx.TASKS[step]
        for f in ("input_ids", "cluster_ids", "vis_mask", "labels"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f


# ---- the fast step equals the reference --------------------------------------------------------

@pytest.mark.parametrize("grid", (8, 16, 32))
@pytest.mark.parametrize("step", (0, 1, 2))
def test_fast_loss_and_every_gradient_equal_the_reference(grid, step):
    ref, fast = models(grid, seed=grid + step)
    caps, ids = dataset(13, grid, seed=10 * grid + step)
    sel = [12, 3, 7, 0, 9]
    rb, fb = batches(caps, ids, sel, step, 11)
    for f in ("input_ids", "cluster_ids", "vis_mask", "labels"):
        assert torch.equal(getattr(rb, f), getattr(fb, f).cpu()), f
    lr, lf = rx.pretrain_loss(ref, rb), xs.pretrain_loss(fast, fb)
    lr.backward()
    lf.backward()
    assert rel(lf, lr) <= 1e-5
    want = {n: p.grad for n, p in ref.named_parameters()}
    n_grads = 0
    for (name, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            n_grads += 1
            err = grad_rel(name, q.grad, p.grad, want)
            assert err <= 1e-5, (name, err)
    assert n_grads > 40
    # each task reaches its own head and no other
    assert (ref.obj_predict_head.transform.dense.weight.grad is not None) == (rb.task == "vis_mask")
    assert (ref.cls.predictions.transform.dense.weight.grad is not None) == (rb.task == "word_mask")
    assert (ref.cls.seq_relationship.weight.grad is not None) == (rb.task == "matched")


@pytest.mark.parametrize("step", (0, 1))
def test_eager_attention_fast_loss_equals_the_reference(step):
    ref, fast = models(8, seed=6, sdpa=False)
    caps, ids = dataset(7, 8, seed=6)
    rb, fb = batches(caps, ids, [6, 1, 2], step, 0)
    lr, lf = rx.pretrain_loss(ref, rb), xs.pretrain_loss(fast, fb)
    lr.backward()
    lf.backward()
    assert rel(lf, lr) <= 1e-5
    want = {n: p.grad for n, p in ref.named_parameters()}
    for (name, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
        if p.grad is not None:
            assert grad_rel(name, q.grad, p.grad, want) <= 1e-5, name


def test_prepare_switches_attention_and_back():
    _, fast = models(sdpa=False)
    assert fast.config._attn_implementation == "eager"
    assert xs.prepare_for_training(fast) is fast and fast.config._attn_implementation == "sdpa"
    assert xs.unprepare(fast) is fast and fast.config._attn_implementation == "eager"


def test_four_training_steps_give_the_reference_parameters():
    ref, fast = models(8, seed=7)
    caps, ids = dataset(14, 8, seed=7)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    codebook = ref.centroids.detach().clone()
    o1, s1 = rx.make_optimizer(ref, lr=1e-3, total_steps=10, warmup_ratio=0.1)
    o2, s2 = rx.make_optimizer(fast, lr=1e-3, total_steps=10, warmup_ratio=0.1)
    for step in range(4):
        sel = [(5 * step + j) % 14 for j in range(5)]
        rb, fb = batches(caps, ids, sel, step, 1)
        a = rx.train_step(ref, o1, s1, rb)
        b = xs.train_step(fast, o2, s2, fb, step=step)
        assert math.isclose(a, b, rel_tol=1e-5)
    # as in tests/test_training.py: Adam normalises per entry, so near-zero gradients turn
    # last-bit differences into O(lr) ones; the whole vector to 1e-5, each update to 1e-3
    pr = torch.cat([p.detach().flatten() for p in ref.parameters()])
    pf = torch.cat([p.detach().flatten() for p in fast.parameters()])
    assert rel(pf, pr) <= 1e-5
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        if name.endswith("key.bias"):
            continue
        d_ref, d_fast = p.detach() - start[name], q.detach() - start[name]
        if d_ref.any():
            assert rel(d_fast, d_ref) <= 1e-3, name
    # the tied tables stay tied, the codebook stays frozen
    assert fast.cls.predictions.decoder.weight is fast.bert.embeddings.word_embeddings.weight
    assert torch.equal(fast.centroids, codebook)


def test_global_count_rescales_the_local_mean():
    _, fast = models(seed=8)
    caps, ids = dataset(6, 8, seed=8)
    _, fb = batches(caps, ids, [0, 1, 2], 0, 0)
    module = xs.XUniterPretrainingLoss(fast)
    local = int((fb.labels != -100).sum())
    with torch.no_grad():
        plain = module(fb)
        scaled = module(fb, global_count=3 * local, world=2)
    assert rel(scaled, plain * (2 / 3)) <= 1e-6


def test_bf16_autocast_loss_is_close_to_fp32():
    _, fast = models(seed=10)
    caps, ids = dataset(8, 8, seed=10)
    for step in range(3):
        b = xs.make_batch(caps, ids, torch.arange(8), step, 1, VOCAB)
        with torch.no_grad():
            l32 = xs.pretrain_loss(fast, b)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                l16 = xs.pretrain_loss(fast, b)
        assert l16.dtype == torch.float32 and rel(l16, l32) <= 2e-2, b.task


# ---- bad input -------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    ref, fast = models(seed=9)
    caps, ids = dataset(6, 8, seed=9)
    rb, fb = batches(caps, ids, [0, 1, 2], 0, 0)
    for loss, m, b in ((rx.pretrain_loss, ref, rb), (xs.pretrain_loss, fast, fb)):
        bare = XUniterForImageGeneration.from_default(size="tiny", with_generator=False)
        with pytest.raises(ValueError, match="no pre-training heads"):
            loss(bare, b)
        lx = XLxmertForImageGeneration.from_default(size="tiny", with_generator=False, pretraining_heads=True)
        with pytest.raises(TypeError, match="must be an XUniterForImageGeneration"):
            loss(lx, b)
        other = copy.copy(b)
        other.task = "itm"
        with pytest.raises(ValueError, match="batch.task must be one of"):
            loss(m, other)
        small = copy.copy(b)
        small.cluster_ids, small.vis_mask = b.cluster_ids[:, :16], b.vis_mask[:, :16]
        small.labels = b.labels[:, :16]
        with pytest.raises(ValueError, match=r"cluster_ids must be \[B, 64\] \(the model's 8×8 grid\)"):
            loss(m, small)
        long = copy.copy(b)
        long.input_ids = torch.cat([b.input_ids, torch.ones(3, 60, dtype=torch.long)], 1)
        with pytest.raises(ValueError, match="exceed the model's 64 text positions"):
            loss(m, long)
    empty = copy.copy(fb)
    empty.vis_mask = fb.vis_mask.clone()
    empty.vis_mask[1] = False
    with pytest.raises(ValueError, match="vis_mask row 1 masks no cell"):
        xs.pretrain_loss(fast, empty)
    bad = copy.copy(fb)
    bad.cluster_ids = fb.cluster_ids.clone()
    bad.cluster_ids[0, 0] = K
    with pytest.raises(ValueError, match=r"cluster_ids must lie in \[0, 97\)"):
        xs.pretrain_loss(fast, bad)
    with pytest.raises(TypeError, match="must be an XUniterForImageGeneration"):
        xs.prepare_for_training(nn.Linear(2, 2))
    opt, sched = rx.make_optimizer(fast)
    with torch.no_grad():
        fast.mask_feat.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="vis_mask loss nan at step 30"):
        xs.train_step(fast, opt, sched, fb, step=30)


# ---- xlx-fast train --arch xuniter ---------------------------------------------------------------

def test_cli_trains_xuniter_as_the_reference_does(tmp_path, capsys):
    """Two steps of ``xlx-fast train --arch xuniter`` (dropout 0) give the parameters of two
    reference steps on the same batches; the run keeps its arch on --resume."""
    from xlx_fast.cli import main
    from xlx_fast.text import load_tokenizer
    from xlx_fast.training import checkpoint
    from xlx_fast.training.data import global_batch_indices, load_data

    data, out = tmp_path / "data", tmp_path / "run"
    assert main(["train", "--make-synthetic", str(data), "--size", "tiny", "--examples", "7",
                 "--arch", "xuniter", "--seed", "2"]) == 0
    args = ["--size", "tiny", "--batch-size", "3", "--dropout", "0", "--no-progress", "--seed", "2",
            "--lr", "1e-3", "--device", "cpu"]
    assert main(["train", str(data), "--out", str(out), "--arch", "xuniter", "--steps", "4",
                 "--stop-at", "2", *args]) == 0
    assert "step000002_XUNITER.pth" in capsys.readouterr().out
    assert checkpoint.load_run_state(out / "last.pt")["hparams"]["arch"] == "xuniter"

    ref = no_dropout(XUniterForImageGeneration.from_default(
        seed=2, size="tiny", with_generator=False, pretraining_heads=True)).train()
    d = load_data(data, load_tokenizer(None, real_weights=False), ref.centroids)
    opt, sched = rx.make_optimizer(ref, lr=1e-3, total_steps=4)
    for step in range(2):
        sel = global_batch_indices(step, 3, len(d), 2).tolist()
        rx.train_step(ref, opt, sched, rx.make_batch(d.captions, d.cluster_ids, sel, step, 2, VOCAB))
    saved = torch.load(out / "step000002_XUNITER.pth")
    got = XUniterForImageGeneration.from_default(size="tiny", with_generator=False, pretraining_heads=True)
    got.load_state_dict({k[len("module."):]: v for k, v in saved.items()})
    pr = torch.cat([p.detach().flatten() for p in ref.parameters()])
    pg = torch.cat([p.detach().flatten() for p in got.parameters()])
    assert rel(pg, pr) <= 1e-5

    # --resume keeps the arch: another one is refused, none given continues the X-UNITER run
    assert main(["train", str(data), "--out", str(out), "--resume", "--arch", "xlxmert", *args]) != 0
    assert "--arch xlxmert (the run has xuniter)" in capsys.readouterr().err
    assert main(["train", str(data), "--out", str(out), "--resume", *args]) == 0
    assert (out / "step000004_XUNITER.pth").is_file()


@pytest.mark.parametrize("extra,match", [
    (["--arch", "xuniter", "--task", "vqa"], "--arch xuniter is for --task pretrain"),
    (["--arch", "xuniter", "--checkpoint", "x.pth"], "there is no X-UNITER --checkpoint"),
    (["--arch", "uniter"], "invalid choice: 'uniter'"),
])
def test_cli_arch_errors(extra, match, tmp_path, capsys):
    from xlx_fast.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "captions.txt").write_text("a cat\n")
    (tmp_path / "data" / "questions.json").write_text("[]")
    try:
        rc = main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--size", "tiny",
                   *extra])
    except SystemExit as e:  # argparse's own refusal of an unknown choice
        rc = e.code
    assert rc != 0
    assert match in capsys.readouterr().err
