"""Pre-training on N×N grids (8, 16, 32): uniform masking over 1..N² cells and the grid's boxes,
in the fast step and the reference alike; the fast loss and every gradient equal the
reference's (tiny config, fp32, dropout 0, as in tests/test_training.py); data directories of
the grid's cell count.
"""
import copy

import numpy as np
import pytest
import torch

from xlx_fast import training
from xlx_fast.grid import box_positions
from xlx_fast.models import XLxmertForImageGeneration
from xlx_fast.reference import pretrain as rp
from xlx_fast.training import masking
from xlx_fast.training.data import load_data, write_synthetic

from test_training import VOCAB, grad_rel, no_dropout, rel

GRIDS = (8, 16, 32)


def dataset(n, grid, seed=0, n_clusters=97, L=20):
    g = torch.Generator().manual_seed(seed)
    caps = torch.zeros(n, L, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(3, L - 1, (1,), generator=g))
        caps[i, 0], caps[i, k + 1] = rp.CLS_ID, rp.SEP_ID
        caps[i, 1:k + 1] = torch.randint(1000, VOCAB, (k,), generator=g)
    return caps, torch.randint(0, n_clusters, (n, grid * grid), generator=g)


def models(grid, seed=0):
    ref = no_dropout(XLxmertForImageGeneration.from_default(
        seed=seed, size="tiny", with_generator=False, pretraining_heads=True, grid=grid)).train()
    fast = training.prepare_for_training(copy.deepcopy(ref)).train()
    return ref, fast


@pytest.mark.parametrize("grid", GRIDS)
def test_masks_cover_one_to_all_cells_uniformly(grid):
    cells = grid * grid
    index = torch.arange(4000)
    vm = masking.vis_mask(3, 0, index, cells)
    assert vm.shape == (4000, cells)
    counts = vm.sum(1)
    assert int(counts.min()) >= 1 and int(counts.max()) <= cells
    # the count is 1 + draw % cells: uniform on 1..N² (mean (N²+1)/2), and every cell is masked
    assert abs(float(counts.double().mean()) - (cells + 1) / 2) < 0.05 * cells
    assert bool(vm.any(0).all())
    want = torch.tensor([rp.vis_mask_for(3, 0, i, cells) for i in range(50)])
    assert torch.equal(vm[:50], want)
    if grid == 8:  # at 8×8, the default
        assert torch.equal(masking.vis_mask(3, 0, index[:50]), want)
        assert rp.vis_mask_for(3, 0, 7) == rp.vis_mask_for(3, 0, 7, 64)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("step", range(3))
def test_fast_batches_equal_reference_batches(grid, step):
    caps, ids = dataset(20, grid)
    sel = [3, 19, 0, 14]
    a = rp.make_batch(caps, ids, sel, step, 9, VOCAB)
    b = training.make_batch(caps, ids, torch.tensor(sel), step, 9, VOCAB)
    for f in ("input_ids", "cluster_ids", "vis_mask", "labels"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    if a.task == "vis_mask":
        assert a.vis_mask.shape == (4, grid * grid) and bool(a.vis_mask.any(1).all())


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("step", [0, 1, 2])
def test_fast_loss_and_every_gradient_equal_the_reference(grid, step):
    ref, fast = models(grid)
    caps, ids = dataset(10, grid, seed=grid)
    sel = [1, 4, 9]
    rb = rp.make_batch(caps, ids, sel, step, 4, VOCAB)
    fb = training.make_batch(caps, ids, torch.tensor(sel), step, 4, VOCAB)
    lr, lf = rp.pretrain_loss(ref, rb), training.pretrain_loss(fast, fb)
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
    assert n_grads > 20


def test_the_boxes_are_the_grids():
    """The loss on a 16×16 model reads box_positions(16): the same ids with the 8×8 model's
    boxes would give another loss (the box embedding is not constant across cells)."""
    ref, fast = models(16)
    caps, ids = dataset(4, 16)
    batch = rp.make_batch(caps, ids, [0, 1], 0, 0, VOCAB)
    with torch.no_grad():
        got = rp.pretrain_loss(ref, batch)
        feats = torch.where(batch.vis_mask[..., None], ref.mask_feat, ref.vis_emb(batch.cluster_ids))
        out = ref.bert(input_ids=batch.input_ids, visual_feats=feats,
                       visual_pos=box_positions(16).expand(2, 256, 4),
                       attention_mask=batch.input_ids > 0,
                       token_type_ids=torch.zeros_like(batch.input_ids))
        logits = ref.obj_predict_head(out[1])
        want = torch.nn.functional.cross_entropy(logits.reshape(512, -1), batch.labels.reshape(-1))
        assert torch.equal(got, want)
        assert rel(training.pretrain_loss(fast, training.make_batch(
            caps, ids, torch.tensor([0, 1]), 0, 0, VOCAB)), got) <= 1e-5


def test_ids_of_another_grid_are_refused():
    ref, fast = models(16)
    caps, ids = dataset(4, 8)
    for make, loss, m in ((rp.make_batch, rp.pretrain_loss, ref),
                          (training.make_batch, training.pretrain_loss, fast)):
        batch = make(caps, ids, torch.tensor([0, 1]), 0, 0, VOCAB)
        with pytest.raises(ValueError, match=r"cluster_ids must be \[B, 256\] \(the model's 16×16 grid\)"):
            loss(m, batch)


class _Tokenizer:
    def __call__(self, lines):
        ids = torch.zeros(len(lines), 20, dtype=torch.long)
        for r, line in enumerate(lines):
            toks = [1000 + len(w) for w in line.split()][:18]
            ids[r, :len(toks) + 2] = torch.tensor([rp.CLS_ID, *toks, rp.SEP_ID])
        return ids, None


@pytest.mark.parametrize("grid", [8, 16])
def test_data_directories_hold_the_grids_cells(grid, tmp_path):
    model = XLxmertForImageGeneration.from_default(seed=0, size="tiny", with_generator=False, grid=grid)
    write_synthetic(tmp_path / "d", model.centroids, n=6, seed=1, grid=grid)
    data = load_data(tmp_path / "d", _Tokenizer(), model.centroids, grid=grid)
    assert data.cluster_ids.shape == (6, grid * grid)
    feats = np.load(tmp_path / "d" / "features.npy")
    assert feats.shape == (6, grid * grid, model.feat_dim)
    # [N, G, G, F] features are the same grid
    np.save(tmp_path / "d" / "features.npy", feats.reshape(6, grid, grid, -1))
    assert torch.equal(load_data(tmp_path / "d", _Tokenizer(), model.centroids, grid=grid).cluster_ids,
                       data.cluster_ids)
    other = 16 if grid == 8 else 8
    with pytest.raises(ValueError, match=rf"must be \[N, {other * other}, F\] or \[N, {other}, {other}, F\]"):
        load_data(tmp_path / "d", _Tokenizer(), model.centroids, grid=other)
    (tmp_path / "d" / "features.npy").unlink()
    np.save(tmp_path / "d" / "cluster_ids.npy", data.cluster_ids.numpy())
    assert torch.equal(load_data(tmp_path / "d", _Tokenizer(), model.centroids, grid=grid).cluster_ids,
                       data.cluster_ids)
    with pytest.raises(ValueError, match=rf"must be an integer array \[N, {other * other}\] \({other}×{other} grid\)"):
        load_data(tmp_path / "d", _Tokenizer(), model.centroids, grid=other)


# -- xlx-fast train --grid ----------------------------------------------------------------------

def test_cli_trains_on_a_16x16_grid(tmp_path, capsys):
    from xlx_fast.cli import main
    from xlx_fast.training import checkpoint

    data = tmp_path / "data"
    assert main(["train", "--make-synthetic", str(data), "--size", "tiny", "--examples", "6",
                 "--grid", "16"]) == 0
    assert np.load(data / "features.npy").shape[:2] == (6, 256)
    args = ["--size", "tiny", "--steps", "3", "--batch-size", "2", "--dropout", "0", "--no-progress",
            "--save-every", "3"]
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--grid", "16", *args]) == 0
    assert checkpoint.load_run_state(out / "last.pt")["hparams"]["grid"] == 16
    # the 16×16 data does not train an 8×8 model (the default grid): one clear error
    assert main(["train", str(data), "--out", str(tmp_path / "run8"), *args]) != 0
    assert "must be [N, 64, F] or [N, 8, 8, F] (8×8 grid)" in capsys.readouterr().err
    # --resume keeps the run's grid
    assert main(["train", str(data), "--out", str(out), "--resume", "--grid", "8", *args]) != 0
    assert "--grid 8 (the run has 16)" in capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    (["--grid", "0"], "--grid must be in 1..32"),
    (["--grid", "33"], "--grid must be in 1..32"),
    (["--grid", "16", "--task", "vqa"], "--grid is for --task pretrain"),
])
def test_cli_grid_errors(extra, match, tmp_path, capsys):
    from xlx_fast.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "captions.txt").write_text("a cat\n")
    assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--size", "tiny",
                 *extra]) != 0
    assert match in capsys.readouterr().err
