"""N×N grids (8, 16, 32: 64, 256 and 1,024 cells) as a property of the image model, through the
core sampling path: ``xlx_fast.generate`` against ``reference.sample`` id for id, the engine's
batch invariance, captioning an image of the model's grid, and the errors of a wrong grid.

As in tests/test_generation.py the reference runs on one model and the fast path on a deep copy
(``generate`` optimizes its model), and the head is sharpened so that ids do not hang on float
rounding (SPEC §4). With 1,024 cells two cells' probabilities sit closer together than with 64,
and Mask-Predict's and confidence's choices of cells hang on their order; tests/test_generation's
factor 3 keeps every decision of these cases clear of fp32 rounding on each grid (measured with
the reference: the narrowest gap at a Mask-Predict boundary is 4e-6 in probability at 32×32, the
narrowest top-two logit gap 1e-6, against differences of about 3e-7 between the two paths).
Larger factors do not widen those gaps (they push probabilities towards 1, where cells tie).
Captions and seeds are drawn from a seeded generator: lengths, tokens and seeds are not picked
by hand.
"""
import copy
import dataclasses
import functools

import pytest
import torch

import xlx_fast
from xlx_fast import reference
from xlx_fast.caption_engine import CaptionEngine, CaptionRequest
from xlx_fast.caption_io import SPECIAL_IDS, layout
from xlx_fast.engine import Engine, Request
from xlx_fast.grid import box_positions
from xlx_fast.models import SIZES, XLxmertForImageGeneration
from xlx_fast.models.checkpoint import CheckpointError, save_authors_format
from xlx_fast.reference.caption import caption as reference_caption
from xlx_fast.seeds import cell_seeds, seed_key
from xlx_fast.step_plan import prepare

from test_captioning import sharpen_words
from test_generation import sharpen

GRIDS = (8, 16, 32)
FACTOR = 3.0


@functools.lru_cache(maxsize=None)
def painter(grid):
    """(the reference's model, a deep copy for the fast path) on an N×N grid."""
    model = sharpen(XLxmertForImageGeneration.from_default(seed=1, size="tiny", grid=grid),
                    FACTOR).eval()
    return model, copy.deepcopy(model)


@functools.lru_cache(maxsize=None)
def captioner(grid):
    model = sharpen_words(XLxmertForImageGeneration.from_default(
        seed=3, size="tiny", grid=grid, pretraining_heads=True)).eval()
    return model, copy.deepcopy(model)


def captions(b, seed, length=20):
    """b captions of random lengths ([CLS] first, [PAD] after), random tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (b, length), generator=g)
    lengths = torch.randint(3, length + 1, (b,), generator=g)
    for row in range(b):
        ids[row, lengths[row]:] = 0
    ids[:, 0] = 101
    return ids


def row_seeds(b, seed):
    return torch.randint(0, 2**31, (b,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_same(a, b):
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.masks, b.masks)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-3, atol=1e-6)


# -- the model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", GRIDS)
def test_the_grid_is_a_model_property_and_no_weight_depends_on_it(grid):
    model = XLxmertForImageGeneration.from_default(seed=2, size="tiny", grid=grid)
    assert model.grid == grid and model.n_cells == grid * grid
    assert f"grid={grid}x{grid}" in repr(model)
    with pytest.raises(AttributeError):
        model.grid = 8
    # the generator is built for the grid (tests/test_generator_grids.py)
    assert model.generator.config.init_size == grid
    eight = XLxmertForImageGeneration.from_default(seed=2, size="tiny", with_generator=False)
    assert eight.grid == 8 and eight.n_cells == 64
    a, b = eight.state_dict(), {k: v for k, v in model.state_dict().items()
                                if not k.startswith("generator.")}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_base_size_takes_a_grid():
    model = XLxmertForImageGeneration.from_default(seed=0, size="base", grid=16)
    assert (model.grid, model.n_cells) == (16, 256)
    assert (model.generator.config.init_size, model.generator.config.target_size) == (16, 256)
    assert model.config.hidden_size == 768 and model.n_clusters == 10_000


@pytest.mark.parametrize("grid", GRIDS)
def test_box_table_is_the_grids(grid):
    model = painter(grid)[1]
    enc = model.bert.encoder.visn_fc
    with torch.no_grad():
        want = enc.box_layer_norm(enc.box_fc(box_positions(grid))) / 2
    box = prepare(model).box
    assert box.shape == (grid * grid, model.config.hidden_size)
    torch.testing.assert_close(box, want, rtol=0, atol=0)
    # cell (i, j) = index i·N + j has the box (j/N, i/N, (j+1)/N, (i+1)/N)
    i, j = grid - 1, 1
    assert box_positions(grid)[i * grid + j].tolist() == [j / grid, i / grid, (j + 1) / grid,
                                                          (i + 1) / grid]


@pytest.mark.parametrize("grid", [0, 33, -8])
def test_grid_out_of_range(grid):
    with pytest.raises(ValueError, match="grid must be in 1..32"):
        XLxmertForImageGeneration.from_default(size="tiny", grid=grid)


@pytest.mark.parametrize("grid", ["16", 16.0, True, None])
def test_grid_must_be_an_int(grid):
    with pytest.raises(TypeError, match="grid must be an int"):
        XLxmertForImageGeneration.from_default(size="tiny", grid=grid)


# -- generate == reference -----------------------------------------------------------------------

CASES = [("mask_predict", 1), ("mask_predict", 4), ("mask_predict", 10), ("confidence", 6),
         ("tlbr", 5), ("random", 9)]


@pytest.mark.parametrize("strategy,steps", CASES)
@pytest.mark.parametrize("grid", GRIDS)
def test_generate_equals_reference(grid, strategy, steps):
    ref_model, fast_model = painter(grid)
    n = grid * 7 + len(strategy) + steps  # a caption set and seeds of their own per case
    ids, seeds = captions(3, seed=n), row_seeds(3, seed=n)
    ref = reference.sample(ref_model, ids, steps=steps, strategy=strategy, seed=seeds)
    got = xlx_fast.generate(fast_model, ids, steps=steps, strategy=strategy, seed=seeds)
    assert got.ids.shape == (3, grid * grid) and got.codes.shape == (3, grid * grid, ref_model.feat_dim)
    assert got.masks.shape == (steps, 3, grid * grid)
    assert_same(ref, got)


@pytest.mark.parametrize("strategy,steps", [("tlbr", 100), ("confidence", 70), ("random", 80)])
def test_more_steps_than_the_8x8_grid_has_cells(strategy, steps):
    """On 16×16 the one-cell-per-step orders may take up to 256 steps: past 64 too."""
    ref_model, fast_model = painter(16)
    ids, seeds = captions(2, seed=steps), row_seeds(2, seed=steps)
    ref = reference.sample(ref_model, ids, steps=steps, strategy=strategy, seed=seeds)
    got = xlx_fast.generate(fast_model, ids, steps=steps, strategy=strategy, seed=seeds)
    assert_same(ref, got)
    decided = len(set(reference.random_order(steps, seeds[0], 256))) if strategy == "random" else steps
    assert int((got.ids[0] >= 0).sum()) == decided


def test_ar_default_steps_are_the_grids_cells():
    """confidence by default decides every one of the 256 cells, one a step, as the reference."""
    ref_model, fast_model = painter(16)
    ids = captions(1, seed=77)
    ref = reference.sample(ref_model, ids, strategy="confidence")
    got = xlx_fast.generate(fast_model, ids, strategy="confidence")
    assert got.masks.shape == (256, 1, 256)
    assert bool((got.ids >= 0).all())
    assert_same(ref, got)


@pytest.mark.parametrize("grid", [16, 32])
def test_per_row_strategies_equal_each_rows_reference(grid):
    ref_model, fast_model = painter(grid)
    rows = [("mask_predict", 4), ("tlbr", 7), ("confidence", 3), ("random", 5)]
    ids, seeds = captions(len(rows), seed=grid + 1), row_seeds(len(rows), seed=grid + 1)
    got = xlx_fast.generate(fast_model, ids, steps=[k for _, k in rows],
                            strategy=[s for s, _ in rows], seed=seeds)
    for r, (strategy, steps) in enumerate(rows):
        ref = reference.sample(ref_model, ids[r:r + 1], steps=steps, strategy=strategy, seed=seeds[r])
        assert torch.equal(got.ids[r], ref.ids[0])
        assert torch.equal(got.codes[r], ref.codes[0])
        assert torch.equal(got.masks[:steps, r], ref.masks[:, 0])
        assert not got.masks[steps:, r].any()


# -- the engine: batch invariance on every grid --------------------------------------------------

MIX = [
    dict(length=5, seed=3, steps=4, strategy="mask_predict"),
    dict(length=12, seed=2**63 + 5, steps=7, strategy="random"),
    dict(length=7, seed=-4, steps=3, strategy="confidence"),
    dict(length=9, seed=7, steps=6, strategy="tlbr"),
    dict(length=10, seed=5, steps=5, strategy="mask_predict", temperature=0.7),
    dict(length=8, seed=9, steps=4, strategy="confidence", temperature=1.3),
]
MAXLEN = 12


def request(spec, tag):
    g = torch.Generator().manual_seed(spec["seed"] % 1000)
    ids = torch.randint(1000, 30000, (spec["length"],), generator=g)
    ids[0] = 101
    return Request(input_ids=ids, seed=spec["seed"], steps=spec["steps"], strategy=spec["strategy"],
                   temperature=spec.get("temperature", 0.0), tag=tag)


def run(engine, joins):
    """joins: {step number: [MIX index]}; each joins before that step (or as soon as a slot is
    free); returns {index: Finished}."""
    pending = {t: list(v) for t, v in joins.items()}
    out, t = {}, 0
    while engine.active() or any(k >= t for k in pending):
        if t in pending:
            now = pending.pop(t)
            fits, later = now[:engine.free_slots()], now[engine.free_slots():]
            engine.admit([request(MIX[i], i) for i in fits])
            if later:
                pending.setdefault(t + 1, [])[:0] = later
        for f in engine.step():
            out[f.request.tag] = f
        t += 1
        assert t < 200
    return out


@pytest.mark.parametrize("grid", GRIDS)
def test_engine_batch_invariance(grid):
    model = painter(grid)[1]
    alone = [run(Engine(model, slots=1, max_length=MAXLEN), {0: [i]})[i] for i in range(len(MIX))]
    for f, spec in zip(alone, MIX):
        assert f.ids.shape == (grid * grid,) and f.probs.shape == (grid * grid,)
        assert f.masks.shape == (spec["steps"], grid * grid)
        assert f.codes.shape == (grid * grid, model.feat_dim)
    engine = Engine(model, slots=3, max_length=MAXLEN)
    assert engine.cells == grid * grid
    # three start together, the others join mid-flight as slots free up, next to other rows
    out = run(engine, {0: [0, 1, 2], 2: [3], 3: [4], 5: [5]})
    assert sorted(out) == list(range(len(MIX)))
    for i, f in out.items():
        assert torch.equal(f.ids, alone[i].ids)
        assert torch.equal(f.masks, alone[i].masks)
        assert torch.equal(f.codes, alone[i].codes)
        torch.testing.assert_close(f.probs, alone[i].probs, rtol=1e-3, atol=1e-6)
    # the greedy rows are the reference's
    ref_model = painter(grid)[0]
    for i in (0, 3):
        spec, req = MIX[i], request(MIX[i], i)
        ref = reference.sample(ref_model, req.input_ids[None], steps=spec["steps"],
                               strategy=spec["strategy"], seed=spec["seed"])
        assert torch.equal(out[i].ids, ref.ids[0])


def test_cell_seeds_of_a_cell_do_not_depend_on_the_grid():
    key = seed_key(12345)
    big = cell_seeds(key, 3, 1024)
    assert big.shape == (1024,) and len(set(big.tolist())) == 1024
    assert (big[:64] == cell_seeds(key, 3)).all() and (big[:256] == cell_seeds(key, 3, 256)).all()
    for bad in (0, 1025, True):
        with pytest.raises(ValueError, match="n_cells"):
            cell_seeds(key, 3, bad)


# -- captioning an image of the model's grid -----------------------------------------------------

@pytest.mark.parametrize("strategy", ["mask_predict", "confidence", "tlbr", "random"])
def test_caption_of_a_16x16_image_equals_reference(strategy):
    ref_model, fast_model = captioner(16)
    g = torch.Generator().manual_seed(len(strategy))
    ids = torch.randint(0, ref_model.n_clusters, (3, 256), generator=g)
    lengths, seeds = [5, 11, 3], row_seeds(3, seed=len(strategy))
    ref = reference_caption(ref_model, cluster_ids=ids, length=lengths, strategy=strategy, seed=seeds)
    got = xlx_fast.caption(fast_model, cluster_ids=ids, length=lengths, strategy=strategy, seed=seeds)
    assert torch.equal(ref.ids, got.ids) and torch.equal(ref.masks, got.masks)
    torch.testing.assert_close(ref.probs, got.probs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grid", [16, 32])
def test_caption_of_grid_features_equals_reference(grid):
    ref_model, fast_model = captioner(grid)
    feats = torch.randn(2, grid * grid, ref_model.feat_dim, generator=torch.Generator().manual_seed(grid))
    ref = reference_caption(ref_model, features=feats, length=[8, 4])
    got = xlx_fast.caption(fast_model, features=feats, length=[8, 4])
    assert torch.equal(ref.ids, got.ids) and torch.equal(ref.masks, got.masks)


def test_the_caption_reads_the_image_at_the_grids_boxes():
    """The same 256 ids read as a 16×16 image: a model of that grid's first step equals HF's
    forward with the 16×16 boxes."""
    ref_model = captioner(16)[0]
    ids = torch.randint(0, ref_model.n_clusters, (1, 256), generator=torch.Generator().manual_seed(4))
    got = reference_caption(ref_model, cluster_ids=ids, length=6, steps=1)
    tokens, mask = layout([6])
    with torch.no_grad():
        out = ref_model.bert(input_ids=tokens, attention_mask=mask,
                             visual_feats=ref_model.centroids[ids],
                             visual_pos=box_positions(16).expand(1, -1, -1), return_dict=True)
        logits = ref_model.cls.predictions(out.language_output[:, 1:7])
    logits[..., list(SPECIAL_IDS)] = float("-inf")
    assert torch.equal(got.ids, logits.argmax(-1))


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["confidence", "tlbr"])
def test_steps_above_the_grids_cells_are_refused(strategy):
    ref_model, fast_model = painter(16)
    ids = captions(1, seed=0)
    for sampler, model in ((reference.sample, ref_model), (xlx_fast.generate, fast_model)):
        with pytest.raises(ValueError, match="steps must be <= 256"):
            sampler(model, ids, steps=257, strategy=strategy)
    with pytest.raises(ValueError, match=r"requests\[0\]\.steps must be <= 256"):
        Engine(fast_model, slots=1).admit([Request(input_ids=ids[0], steps=257, strategy=strategy)])
    with pytest.raises(ValueError, match="steps must be <= 64"):  # the 8×8 model's limit
        xlx_fast.generate(painter(8)[1], ids, steps=65, strategy=strategy)


@pytest.mark.parametrize("cells", [64, 255, 1024])
def test_cluster_ids_of_another_grid_are_refused(cells):
    ref_model, fast_model = captioner(16)
    ids = torch.zeros(2, cells, dtype=torch.int64)
    for captioner_fn, model in ((reference_caption, ref_model), (xlx_fast.caption, fast_model)):
        with pytest.raises(ValueError, match=r"cluster_ids must be \[batch, 256\] \(the model's 16×16 grid\)"):
            captioner_fn(model, cluster_ids=ids, length=4)
        with pytest.raises(ValueError, match=r"features must be \[batch, 256, 48\]"):
            captioner_fn(model, features=torch.zeros(2, cells, model.feat_dim), length=4)
    engine = CaptionEngine(fast_model, slots=1)
    with pytest.raises(ValueError, match=r"requests\[0\]\.cluster_ids must be \[256\]"):
        engine.admit([CaptionRequest(cluster_ids=ids[0], length=4)])
    with pytest.raises(ValueError, match=r"requests\[0\]\.features must be \[256, 48\]"):
        engine.admit([CaptionRequest(features=torch.zeros(cells, fast_model.feat_dim), length=4)])


def test_a_16x16_model_captions_its_own_painting():
    """Paint on 16×16 (ids [1, 256]), then read the same ids back: the shapes line up."""
    model = captioner(16)[1]
    ids = xlx_fast.generate(model, captions(1, seed=3), steps=2).ids
    assert ids.shape == (1, 256)
    words = xlx_fast.caption(model, cluster_ids=ids, length=5)
    assert words.ids.shape == (1, 5) and bool((words.ids >= 0).all())


def test_a_16x16_model_paints_its_codes_and_refuses_another_grids():
    model = painter(16)[1]
    codes = xlx_fast.generate(model, captions(1, seed=1), steps=1).codes
    assert codes.shape == (1, 256, model.feat_dim)
    assert reference.paint(model, codes).shape == (1, 3, 32, 32)
    # a generator built for another grid is refused, never resized
    other = copy.deepcopy(model)
    other.generator = copy.deepcopy(painter(8)[1].generator)
    with pytest.raises(ValueError, match="cannot paint a 16×16 grid: the generator paints 8×8 codes"):
        reference.paint(other, codes)
    # an 8×8 model still paints its 64 cells (and refuses 256)
    eight = painter(8)[1]
    image = reference.paint(eight, xlx_fast.generate(eight, captions(1, seed=1), steps=1).codes)
    assert image.shape[:2] == (1, 3)
    with pytest.raises(ValueError, match=r"codes must be \[B, 64, F\]"):
        reference.paint(eight, codes)


def test_a_generator_for_another_grid_is_refused(tmp_path):
    s = SIZES["tiny"]
    from transformers import LxmertConfig

    with pytest.raises(ValueError, match="generator_config paints 8×8 codes but the model's grid is 16×16"):
        XLxmertForImageGeneration(LxmertConfig(**s.lxmert), s.n_clusters, s.generator, grid=16)
    # a generator built for the model's grid is accepted
    gen16 = dataclasses.replace(s.generator, init_size=16)
    assert XLxmertForImageGeneration(LxmertConfig(**s.lxmert), s.n_clusters, gen16, grid=16).grid == 16

    model = XLxmertForImageGeneration.from_default(seed=4, size="tiny")
    paths = [tmp_path / "lxrt.pth", tmp_path / "centroids.npy", tmp_path / "G.pth"]
    save_authors_format(model, *paths)
    with pytest.raises(CheckpointError, match="the generator checkpoint paints 8×8 codes .* but the "
                                              "model's grid is 16×16"):
        XLxmertForImageGeneration.from_checkpoint(*paths, size="tiny", grid=16)
    # the transformer's checkpoint has no grid: it loads on any
    loaded = XLxmertForImageGeneration.from_checkpoint(*paths[:2], size="tiny", grid=32)
    assert (loaded.grid, loaded.n_cells, loaded.generator) == (32, 1024, None)
    want = {k: v for k, v in model.state_dict().items() if not k.startswith("generator.")}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in want.items())
    assert XLxmertForImageGeneration.from_checkpoint(*paths, size="tiny").grid == 8
