"""The model, the generator and the authors' checkpoint format."""
import warnings

import numpy as np
import pytest
import torch

from xlx_fast import reference
from xlx_fast.models import Generator, GeneratorConfig, XLxmertForImageGeneration
from xlx_fast.models.checkpoint import CheckpointError, save_authors_format


def lxmert_param_count(H=768, I=3072, V=30522, P=512, T=2, F=2048, pos=4, L=9, R=5, X=5):
    """LxmertModel's parameters from its architecture (SPEC §1), counted by hand."""
    linear = lambda i, o: i * o + o  # noqa: E731
    ln = 2 * H
    attention = 3 * linear(H, H) + linear(H, H) + ln  # q, k, v; output dense; LayerNorm
    ffn = linear(H, I) + linear(I, H) + ln
    embeddings = V * H + P * H + T * H + ln
    visual_encoder = linear(F, H) + ln + linear(pos, H) + ln
    x_layer = 3 * attention + 2 * ffn  # shared cross attention, two self attentions, two FFNs
    pooler = linear(H, H)
    return embeddings + (L + R) * (attention + ffn) + X * x_layer + visual_encoder + pooler


def test_full_size_parameter_count():
    model = XLxmertForImageGeneration.from_default(seed=0, with_generator=False)
    H, F, K = 768, 2048, 10_000
    bert = lxmert_param_count()
    assert sum(p.numel() for p in model.bert.parameters()) == bert
    head = (H * H + H + 2 * H) + (H * F + F) + K  # transform; linear_feat; out_cluster bias
    # out_cluster.weight is the centroid table itself: counted once.
    expected = bert + head + K * F + F
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.obj_predict_head.out_cluster.weight is model.vis_emb.weight
    assert not model.vis_emb.weight.requires_grad
    assert model.centroids.shape == (K, F) and model.mask_feat.shape == (F,)


def test_generator_parameter_count_shape_and_range():
    g = Generator(GeneratorConfig())
    g.reset_parameters(torch.Generator().manual_seed(0))
    conv = lambda i, o, k, groups=1: i // groups * o * k * k + o  # noqa: E731
    spade = conv(32, 128, 3) + 2 * conv(128, 32, 3)
    block = 2 * spade + 2 * conv(32, 32, 3) + conv(32, 32, 1) + 2  # + two noise weights
    expected = conv(2048, 256, 1) + 2 * conv(256, 32, 3, groups=4) + 5 * block + 5 * conv(32, 3, 3)
    n = sum(p.numel() for p in g.parameters())
    assert n == expected and 1.6e6 < n < 1.9e6  # "about 1.7M"
    codes = torch.randn(2, 8, 8, 2048)
    img = g(codes, torch.Generator().manual_seed(0))
    assert img.shape == (2, 3, 256, 256)
    assert img.min() >= 0 and img.max() <= 1
    # Channels-first input is the same picture.
    same = g(codes.permute(0, 3, 1, 2), torch.Generator().manual_seed(0))
    assert torch.equal(img, same)
    # Noise is on and seeded: a different seed changes the picture, no generator removes noise.
    assert not torch.equal(img, g(codes, torch.Generator().manual_seed(1)))
    assert torch.equal(g(codes), g(codes))
    with pytest.raises(ValueError, match="codes"):
        g(torch.randn(2, 8, 8, 100))


def test_generator_per_row_noise_is_each_rows_own():
    """One generator per row: row r's picture is exactly row r painted alone from its generator,
    whatever it is batched with (the serving painter's guarantee); one for the batch differs."""
    m = XLxmertForImageGeneration.from_default(seed=3, size="tiny").eval()
    codes = m.centroids[torch.randint(0, m.n_clusters, (3, 64), generator=torch.Generator().manual_seed(0))]
    grid = codes.reshape(3, 8, 8, -1)
    seeds = [5, 2**40 + 1, 5]
    with torch.no_grad():
        rows = m.generator(grid, [torch.Generator().manual_seed(s) for s in seeds])
        for r, s in enumerate(seeds):
            alone = m.generator(grid[r:r + 1], torch.Generator().manual_seed(s))[0]
            torch.testing.assert_close(rows[r], alone, rtol=0, atol=1e-6)  # conv batch rounding
            assert torch.equal(alone, reference.paint(m, codes[r:r + 1], seed=s)[0])
        shared = m.generator(grid, torch.Generator().manual_seed(5))
        assert not torch.equal(shared[1], rows[1])
        with pytest.raises(ValueError, match="one per row"):
            m.generator(grid, [torch.Generator()] * 2)


def test_default_is_seeded():
    a = XLxmertForImageGeneration.from_default(seed=0, size="tiny").state_dict()
    b = XLxmertForImageGeneration.from_default(seed=0, size="tiny").state_dict()
    c = XLxmertForImageGeneration.from_default(seed=1, size="tiny").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differs = [k for k in a if not torch.equal(a[k], c[k])]
    assert "vis_emb.weight" in differs and "bert.encoder.layer.0.attention.self.query.weight" in differs


def test_unknown_size():
    with pytest.raises(ValueError, match="size"):
        XLxmertForImageGeneration.from_default(size="huge")


def test_set_centroids_validates():
    m = XLxmertForImageGeneration.from_default(size="tiny", with_generator=False)
    with pytest.raises(ValueError, match="shape"):
        m.set_centroids(np.zeros((3, 3), np.float32))
    bad = np.zeros(tuple(m.centroids.shape), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.set_centroids(bad)
    new = np.random.default_rng(0).standard_normal(tuple(m.centroids.shape)).astype(np.float32)
    m.set_centroids(new)
    assert torch.equal(m.obj_predict_head.out_cluster.weight, torch.from_numpy(new))


def captions(b):
    ids = torch.randint(1000, 30000, (b, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 12:] = 0
    return ids


@pytest.fixture
def saved_tiny(tmp_path):
    model = XLxmertForImageGeneration.from_default(seed=3, size="tiny")
    paths = [tmp_path / "Epoch20_LXRT.pth", tmp_path / "centroids.npy", tmp_path / "G_60.pth"]
    save_authors_format(model, *paths)
    return model, paths


def test_checkpoint_round_trip_tiny(saved_tiny):
    model, paths = saved_tiny
    state = torch.load(paths[0])
    assert all(k.startswith("module.") for k in state)  # the authors' DataParallel format
    # An unused pre-training head, as in the authors' file: reported by name, not loaded.
    state["module.obj_predict_head.decoder_dict.obj.weight"] = torch.zeros(3, 3)
    torch.save(state, paths[0])
    with pytest.warns(UserWarning, match="decoder_dict.obj.weight"):
        loaded = XLxmertForImageGeneration.from_checkpoint(*paths, size="tiny")
    ref = model.state_dict()
    assert ref.keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ref.items())
    ids = captions(2)
    for strategy in ("mask_predict", "confidence"):
        a = reference.sample(model, ids, steps=4, strategy=strategy)
        b = reference.sample(loaded, ids, steps=4, strategy=strategy)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.codes, b.codes)
    assert torch.equal(reference.paint(model, a.codes, seed=7), reference.paint(loaded, b.codes, seed=7))


@pytest.mark.slow
def test_checkpoint_round_trip_full_size(tmp_path):
    model = XLxmertForImageGeneration.from_default(seed=0)
    paths = [tmp_path / "Epoch20_LXRT.pth", tmp_path / "centroids.npy", tmp_path / "G_60.pth"]
    save_authors_format(model, *paths)
    loaded = XLxmertForImageGeneration.from_checkpoint(*paths)
    ids = captions(1)
    a, b = reference.sample(model, ids, steps=2), reference.sample(loaded, ids, steps=2)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.codes, b.codes)
    assert torch.equal(reference.paint(model, a.codes, seed=0), reference.paint(loaded, b.codes, seed=0))


def test_checkpoint_missing_key(saved_tiny):
    _, paths = saved_tiny
    state = torch.load(paths[0])
    del state["module.mask_feat"], state["module.bert.pooler.dense.bias"]
    torch.save(state, paths[0])
    with pytest.raises(CheckpointError, match="missing.*bert.pooler.dense.bias.*mask_feat"):
        XLxmertForImageGeneration.from_checkpoint(*paths, size="tiny")
    with pytest.warns(UserWarning, match="mask_feat"):
        XLxmertForImageGeneration.from_checkpoint(*paths, size="tiny", strict=False)


def test_checkpoint_shape_mismatch_names_key_and_shapes(saved_tiny):
    _, paths = saved_tiny
    state = torch.load(paths[0])
    state["module.obj_predict_head.linear_feat.weight"] = torch.zeros(5, 7)
    torch.save(state, paths[0])
    with pytest.raises(CheckpointError, match=r"obj_predict_head.linear_feat.weight: checkpoint \(5, 7\) vs model \(48, 64\)"):
        XLxmertForImageGeneration.from_checkpoint(*paths, size="tiny")


def test_checkpoint_centroid_count_must_match_head_bias(saved_tiny):
    _, paths = saved_tiny
    np.save(paths[1], np.zeros((50, 48), np.float32))
    with pytest.raises(CheckpointError, match="50 clusters"):
        XLxmertForImageGeneration.from_checkpoint(*paths, size="tiny")


def test_generator_checkpoint_mismatch(saved_tiny):
    _, paths = saved_tiny
    g = torch.load(paths[2])
    g["resblocks.0.conv1.weight_orig"] = torch.zeros(1)
    torch.save(g, paths[2])
    with pytest.raises(CheckpointError, match="resblocks.0.conv1.weight_orig"):
        XLxmertForImageGeneration.from_checkpoint(*paths, size="tiny")


def test_checkpoint_missing_and_bad_files(saved_tiny, tmp_path):
    _, paths = saved_tiny
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        XLxmertForImageGeneration.from_checkpoint(tmp_path / "nope.pth", paths[1], size="tiny")
    with pytest.raises(FileNotFoundError, match="centroids"):
        XLxmertForImageGeneration.from_checkpoint(paths[0], tmp_path / "nope.npy", size="tiny")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read"):
        XLxmertForImageGeneration.from_checkpoint(tmp_path / "junk.pth", paths[1], size="tiny")
    np.save(paths[1], np.zeros(5, np.float32))
    with pytest.raises(CheckpointError, match="2-D"):
        XLxmertForImageGeneration.from_checkpoint(paths[0], paths[1], size="tiny")


def test_no_warning_for_a_clean_checkpoint(saved_tiny):
    _, paths = saved_tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        XLxmertForImageGeneration.from_checkpoint(*paths, size="tiny")
