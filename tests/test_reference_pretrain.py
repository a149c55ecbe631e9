"""The reference pre-training step against the authors' semantics (tiny config)."""
import math

import pytest
import torch

from xlx_fast.models import XLxmertForImageGeneration
from xlx_fast.reference import pretrain as rp

VOCAB = 30522


def captions(n, seed=0, L=20):
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, L, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(1, L - 1, (1,), generator=g))  # words, then [SEP], then padding
        out[i, 0] = rp.CLS_ID
        out[i, 1:k + 1] = torch.randint(1000, VOCAB, (k,), generator=g)
        out[i, k + 1] = rp.SEP_ID
    return out


def test_tasks_cycle_like_the_authors_mask_modality():
    assert [rp.task_for_step(s) for s in range(7)] == [
        "vis_mask", "word_mask", "matched", "vis_mask", "word_mask", "matched", "vis_mask"]


def test_draw_is_a_pure_function_that_depends_on_every_argument():
    base = rp.draw(1, 2, 3, 4, 5)
    assert base == rp.draw(1, 2, 3, 4, 5) and 0 <= base < 2 ** 32
    for k in range(5):
        args = [1, 2, 3, 4, 5]
        args[k] += 1
        assert rp.draw(*args) != base


def test_uniform_vis_masking_counts_and_cells():
    n_ex = 3000
    counts = torch.zeros(65)
    per_cell = torch.zeros(64)
    for i in range(n_ex):
        m = torch.tensor(rp.vis_mask_for(7, 0, i))
        n = int(m.sum())
        assert 1 <= n <= 64
        counts[n] += 1
        per_cell += m
    # n = randint(1, 64): uniform over 1..64 (chi-square, 63 dof: mean 63, sd ~11)
    expected = n_ex / 64
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi2 < 63 + 6 * math.sqrt(2 * 63)
    assert counts[0] == 0
    # cells chosen uniformly: each cell masked with probability E[n]/64 = 65/128
    p = per_cell / n_ex
    assert (p - 65 / 128).abs().max() < 0.05


def test_word_masking_is_bert_80_10_10_and_skips_special_tokens():
    caps = captions(4000, seed=1)
    eligible = selected = to_mask = to_random = kept = 0
    for i in range(caps.shape[0]):
        ids = caps[i].tolist()
        inp, lab = rp.word_mask_for(3, 1, i, ids, VOCAB)
        for t, tok in enumerate(ids):
            if tok in (0, rp.CLS_ID, rp.SEP_ID):
                assert lab[t] == rp.IGNORE_INDEX and inp[t] == tok
                continue
            eligible += 1
            if lab[t] == rp.IGNORE_INDEX:
                assert inp[t] == tok
                continue
            assert lab[t] == tok
            selected += 1
            if inp[t] == rp.MASK_ID:
                to_mask += 1
            elif inp[t] == tok:
                kept += 1
            else:
                to_random += 1
    assert abs(selected / eligible - 0.15) < 0.01
    assert abs(to_mask / selected - 0.8) < 0.02
    # a random word equals the original with probability 1/30522: counted as kept
    assert abs(to_random / selected - 0.1) < 0.015 and abs(kept / selected - 0.1) < 0.015


def test_matched_swaps_half_the_captions_with_another_example():
    n = 50
    swapped = 0
    for i in range(2000):
        idx = i % n
        shown = rp.matched_for(5, 2 + i, idx, n)
        assert 0 <= shown < n
        swapped += shown != idx
    assert abs(swapped / 2000 - 0.5) < 0.04
    caps = captions(n, seed=2)
    ids = torch.randint(0, 97, (n, 64))
    batch = rp.make_batch(caps, ids, range(n), step=2, seed=5, vocab_size=VOCAB)
    assert batch.task == "matched"
    for b in range(n):
        own = torch.equal(batch.input_ids[b], caps[b])
        assert bool(batch.labels[b]) == own  # captions are distinct, so "own caption" <=> label 1
    assert not batch.vis_mask.any() and torch.equal(batch.cluster_ids, ids)


def test_batches_depend_on_the_example_not_on_its_batch():
    caps = captions(30, seed=3)
    ids = torch.randint(0, 97, (30, 64), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        whole = rp.make_batch(caps, ids, [4, 9, 17, 22], step, 11, VOCAB)
        parts = [rp.make_batch(caps, ids, [i], step, 11, VOCAB) for i in (4, 9, 17, 22)]
        for b, part in enumerate(parts):
            assert torch.equal(whole.input_ids[b], part.input_ids[0])
            assert torch.equal(whole.vis_mask[b], part.vis_mask[0])
            assert torch.equal(whole.labels[b], part.labels[0])
    vis = rp.make_batch(caps, ids, range(30), 0, 11, VOCAB)
    assert torch.equal(vis.labels[vis.vis_mask], ids[vis.vis_mask])
    assert (vis.labels[~vis.vis_mask] == rp.IGNORE_INDEX).all()
    assert torch.equal(vis.input_ids, caps)  # vis_mask batches keep their captions


def tiny_model(seed=0):
    model = XLxmertForImageGeneration.from_default(seed=seed, size="tiny", with_generator=False,
                                                   pretraining_heads=True)
    return model


def test_vis_mask_loss_is_ce_over_masked_cells_only():
    model = tiny_model().double()
    caps = captions(3, seed=4)
    ids = torch.randint(0, model.n_clusters, (3, 64), generator=torch.Generator().manual_seed(1))
    batch = rp.make_batch(caps, ids, range(3), 0, 1, VOCAB)
    loss = rp.pretrain_loss(model, batch)
    # by hand: the masked input, the head's log-softmax at the label of each masked cell
    feats = model.centroids[ids].clone()
    feats[batch.vis_mask] = model.mask_feat
    out = model.bert(input_ids=caps, visual_feats=feats, visual_pos=rp.box_positions().double().expand(3, 64, 4),
                     attention_mask=caps > 0)
    logp = torch.log_softmax(model.obj_predict_head(out.vision_output), -1)
    picked = [-logp[b, c, ids[b, c]] for b in range(3) for c in range(64) if batch.vis_mask[b, c]]
    torch.testing.assert_close(loss, torch.stack(picked).mean(), rtol=1e-12, atol=0)
    # changing the ids of unmasked cells changes the input but never a label
    assert (batch.labels[~batch.vis_mask] == -100).all()


def test_word_and_matched_losses_use_the_tied_lm_head_and_the_pooled_classifier():
    model = tiny_model().double()
    caps = captions(4, seed=5)
    ids = torch.randint(0, model.n_clusters, (4, 64), generator=torch.Generator().manual_seed(2))
    wm = rp.make_batch(caps, ids, range(4), 1, 1, VOCAB)
    loss = rp.pretrain_loss(model, wm)
    out = model.bert(input_ids=wm.input_ids, visual_feats=model.centroids[ids],
                     visual_pos=rp.box_positions().double().expand(4, 64, 4), attention_mask=wm.input_ids > 0)
    h = model.cls.predictions.transform(out.language_output)
    logits = h @ model.bert.embeddings.word_embeddings.weight.T + model.cls.predictions.bias
    sel = wm.labels != -100
    assert sel.any()
    want = -torch.log_softmax(logits, -1)[sel].gather(1, wm.labels[sel][:, None]).mean()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    loss.backward()
    assert model.cls.predictions.decoder.weight.grad is model.bert.embeddings.word_embeddings.weight.grad
    assert model.cls.seq_relationship.weight.grad is None and model.obj_predict_head.linear_feat.weight.grad is None

    mt = rp.make_batch(caps, ids, range(4), 2, 1, VOCAB)
    loss = rp.pretrain_loss(model, mt)
    out = model.bert(input_ids=mt.input_ids, visual_feats=model.centroids[ids],
                     visual_pos=rp.box_positions().double().expand(4, 64, 4), attention_mask=mt.input_ids > 0)
    want = torch.nn.functional.cross_entropy(model.cls.seq_relationship(out.pooled_output), mt.labels)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)


def test_train_step_updates_clips_and_rejects_nan():
    model = tiny_model().train()
    caps = captions(4, seed=6)
    ids = torch.randint(0, model.n_clusters, (4, 64), generator=torch.Generator().manual_seed(3))
    opt, sched = rp.make_optimizer(model, lr=1e-3, total_steps=20)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    centroids = model.centroids.detach().clone()
    for step in range(4):  # step 0 runs at lr 0 (warm-up): step 3 is the first vis_mask update
        loss = rp.train_step(model, opt, sched, rp.make_batch(caps, ids, range(4), step, 0, VOCAB))
        assert math.isfinite(loss)
    after = dict(model.named_parameters())
    assert torch.equal(centroids, model.centroids)  # frozen
    for name in ("mask_feat", "obj_predict_head.linear_feat.weight", "cls.seq_relationship.weight",
                 "cls.predictions.bias", "bert.embeddings.word_embeddings.weight"):
        assert not torch.equal(before[name], after[name]), name
    with torch.no_grad():
        model.mask_feat.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="vis_mask"):
        rp.train_step(model, opt, sched, rp.make_batch(caps, ids, range(4), 6, 0, VOCAB))


def test_schedule_warms_up_then_decays():
    model = tiny_model()
    opt, sched = rp.make_optimizer(model, lr=1.0, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[5] == pytest.approx(1.0) and lrs[4] == pytest.approx(0.8)
    assert lrs[99] == pytest.approx(1 / 95)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[id(p)] for p in opt.param_groups[1]["params"]]
    assert all(n.endswith("bias") or "LayerNorm.weight" in n for n in no_decay)
    assert all(p is not model.centroids for g in opt.param_groups for p in g["params"])


def test_nearest_ids_is_the_float64_argmin():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(11, 5, generator=g)
    f = c[torch.tensor([3, 0, 10])] + 1e-3 * torch.randn(3, 5, generator=g)
    assert rp.nearest_ids(f, c).tolist() == [3, 0, 10]
