"""The sampler step (xlx_fast.ops.sampler_step) against a plain statement of its rules.

The oracle below restates the rules in NumPy, independently of the kernels and of
xlx_fast.reference: stable argsort for Mask-Predict, first maximum over unvisited cells for
AR-confidence, fixed cells for TLBR/random. The C++ twin must match it id for id and row for row
(bitwise), in every table dtype, with odd row sizes, many ties, per-row counts and K > 64, on
rows of N = 1, 7, 64, 256 and 1,024 cells (the op reads N from the shapes). GPU tests compare
the CUDA kernel with the C++ twin at the same cell counts and replay it from a CUDA graph.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from xlx_fast.ops import sampler_backends as B
from xlx_fast.ops import sampler_step as S
from xlx_fast.ops.sampler_args import SamplerStepArgs
from xlx_fast.ops.sampler_backends import run

CELLS = 64
CELL_COUNTS = (1, 7, 64, 256, 1024)  # rows of grids 1x1 .. 32x32, and an odd one
CSRC = Path(__file__).resolve().parent.parent / "csrc"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# The oracle: the rules of one step, in plain NumPy.

def oracle_step(prob, pred_id, mask, visited, ids, table, mask_row, strategy,
                count=None, cell=None, next_cell=None):
    """Returns (mask, visited, ids, out) after one step; inputs are not modified. Rows have
    N = prob.shape[1] cells."""
    prob, pred_id = prob.numpy(), pred_id.numpy()
    mask, visited, ids = mask.numpy().copy(), visited.numpy().copy(), ids.numpy().copy()
    b_rows, n_cells = prob.shape
    new_mask = np.zeros_like(mask)
    for b in range(b_rows):
        decided = np.zeros(n_cells, dtype=bool)
        if strategy == "mask_predict":
            decided = mask[b].copy()
        elif strategy in ("tlbr", "random"):
            if cell[b] >= 0:
                decided[cell[b]] = True
        else:  # confidence: first maximum among the unvisited cells (ascending cell order)
            free = np.flatnonzero(~visited[b])
            if free.size:
                decided[free[np.argmax(prob[b, free])]] = True
        ids[b, decided] = pred_id[b, decided]
        visited[b] |= decided
        if strategy == "mask_predict":
            lowest = np.argsort(prob[b], kind="stable")[: count[b]]
            new_mask[b, lowest] = True
        else:
            new_mask[b] = mask[b] & ~decided
            if strategy == "random" and next_cell is not None and next_cell[b] >= 0:
                new_mask[b, next_cell[b]] = True
    m = torch.from_numpy(new_mask)
    i = torch.from_numpy(ids)
    gathered = table[i.clamp(min=0)]  # clamped cells are masked (checked by the caller)
    out = torch.where(m.unsqueeze(-1), mask_row.view(1, 1, -1), gathered)
    assert bool(((i >= 0) | m).all()), "oracle: an unmasked cell has no id"
    return m, torch.from_numpy(visited), i, out


# ---------------------------------------------------------------------------------------------
# Helpers.

_TABLES = {}


def make_table(n, d, dtype):
    key = (n, d, dtype)
    if key not in _TABLES:
        g = torch.Generator().manual_seed(n * 7919 + d)
        _TABLES[key] = (torch.randn(n, d, generator=g) * 3).to(dtype)
    return _TABLES[key]


def make_mask_row(d, dtype):
    return torch.linspace(-1.5, 2.5, d).to(dtype) + 0.125


def seed_of(*parts):
    """A seed that is the same in every process (``hash`` of a str is not)."""
    return zlib.crc32(repr(parts).encode())


def random_probs(rng, b, ties, cells=CELLS):
    p = rng.random((b, cells), dtype=np.float32)
    if ties:  # few distinct values: most comparisons are ties
        p = np.floor(p * 4).astype(np.float32) / 4
    return torch.from_numpy(p)


def random_state(rng, b, n, d, dtype, *, poison=True, cells=CELLS):
    """A consistent mid-run state: every id valid, random mask/visited, poisoned output."""
    st = S.SamplerState(
        mask=torch.from_numpy(rng.random((b, cells)) < 0.5),
        visited=torch.from_numpy(rng.random((b, cells)) < 0.5),
        ids=torch.from_numpy(rng.integers(0, n, (b, cells))),
        out=torch.full((b, cells, d), float("nan") if poison else 0.0).to(dtype),
        status=torch.zeros(b, dtype=torch.int32),
    )
    return st


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


def strategy_args(rng, strategy, b, n_cells=CELLS):
    """Per-row count/cell/next_cell, different in every row, edge values (0, N, -1, N-1)
    included."""
    n = n_cells
    if strategy == "mask_predict":
        counts = [0, n, 1, n - 1] + list(rng.integers(0, n + 1, max(0, b - 4)))
        return {"count": i32(counts[:b])}
    if strategy == "tlbr":
        return {"cell": i32([-1, 0, n - 1] + list(rng.integers(0, n, max(0, b - 3))))[:b]}
    if strategy == "random":
        cells = [-1, min(5, n - 1), n - 1] + list(rng.integers(0, n, max(0, b - 3)))
        nexts = [min(7, n - 1), -1, n - 1] + list(rng.integers(-1, n, max(0, b - 3)))
        return {"cell": i32(cells[:b]), "next_cell": i32(nexts[:b])}
    return {}


def assert_state_equal(st, ref, what=""):
    m, v, i, o = ref
    assert torch.equal(st.mask, m), f"mask differs {what}"
    assert torch.equal(st.visited, v), f"visited differs {what}"
    assert torch.equal(st.ids, i), f"ids differ {what}"
    # bitwise: the op copies rows, it computes nothing (NaN poison would also fail here)
    assert torch.equal(st.out.view(torch.uint8 if st.out.element_size() == 1 else
                                   {2: torch.int16, 4: torch.int32}[st.out.element_size()]),
                       o.view({2: torch.int16, 4: torch.int32}[o.element_size()])), f"out differs {what}"
    assert int(st.status.abs().sum()) == 0, f"status set {what}: {st.status.tolist()}"


def run_and_compare(rng, strategy, n, d, dtype, b=6, ties=False, cells=CELLS):
    table, mask_row = make_table(n, d, dtype), make_mask_row(d, dtype)
    st = random_state(rng, b, n, d, dtype, cells=cells)
    prob = random_probs(rng, b, ties, cells)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, cells)))
    kw = strategy_args(rng, strategy, b, cells)
    ref = oracle_step(prob, pred_id, st.mask, st.visited, st.ids, table, mask_row, strategy,
                      **{k: v.numpy() for k, v in kw.items()})
    S.sampler_step(prob, pred_id, st, table, mask_row, strategy, **kw)
    assert_state_equal(st, ref, f"({strategy}, {cells} cells, table {n}x{d}, {dtype})")


# ---------------------------------------------------------------------------------------------
# One step: C++ twin vs oracle.

@pytest.mark.parametrize("strategy", list(S.STRATEGIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 1), (1, 3), (37, 3), (10_000, 768), (10_000, 2048)])
def test_step_matches_oracle(strategy, dtype, n, d):
    rng = np.random.default_rng(hash((strategy, str(dtype), n, d)) % 2**32)
    run_and_compare(rng, strategy, n, d, dtype, ties=False)
    run_and_compare(rng, strategy, n, d, dtype, ties=True)


@pytest.mark.parametrize("strategy", list(S.STRATEGIES))
def test_step_ties_many_rows(strategy):
    """Quantised probabilities (mostly ties) over many rows: ties go to the lowest index."""
    rng = np.random.default_rng(11)
    for _ in range(5):
        run_and_compare(rng, strategy, 50, 5, torch.float32, b=40, ties=True)


def test_mask_predict_every_count():
    """count 0..64 on one row each, with ties: exactly `count` cells masked, the stable-sort set."""
    rng = np.random.default_rng(3)
    b, n, d = 65, 9, 2
    table, mask_row = make_table(n, d, torch.float32), make_mask_row(d, torch.float32)
    st = random_state(rng, b, n, d, torch.float32)
    prob = random_probs(rng, b, ties=True)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, CELLS)))
    count = i32(list(range(65)))
    ref = oracle_step(prob, pred_id, st.mask, st.visited, st.ids, table, mask_row,
                      "mask_predict", count=count.numpy())
    S.sampler_step(prob, pred_id, st, table, mask_row, "mask_predict", count=count)
    assert st.mask.sum(1).tolist() == list(range(65))
    assert_state_equal(st, ref)


def test_confidence_when_every_cell_visited_decides_nothing():
    rng = np.random.default_rng(4)
    st = random_state(rng, 2, 5, 3, torch.float32)
    st.visited.fill_(True)
    ids_before, mask_before = st.ids.clone(), st.mask.clone()
    table, mask_row = make_table(5, 3, torch.float32), make_mask_row(3, torch.float32)
    S.sampler_step(random_probs(rng, 2, False), torch.zeros(2, 64, dtype=torch.int64), st,
                   table, mask_row, "confidence")
    assert torch.equal(st.ids, ids_before) and torch.equal(st.mask, mask_before)


# ---------------------------------------------------------------------------------------------
# Any cell count N in 1..1024 (grids 8x8, 16x16, 32x32 and odd ones): N comes from the shapes.

@pytest.mark.parametrize("strategy", list(S.STRATEGIES))
@pytest.mark.parametrize("cells", CELL_COUNTS)
def test_step_matches_oracle_any_cells(strategy, cells):
    rng = np.random.default_rng(seed_of(strategy, cells))
    for dtype, n, d in ((torch.float32, 37, 3), (torch.bfloat16, 1, 5), (torch.float16, 1000, 8)):
        run_and_compare(rng, strategy, n, d, dtype, b=6, ties=False, cells=cells)
        run_and_compare(rng, strategy, n, d, dtype, b=6, ties=True, cells=cells)


@pytest.mark.parametrize("cells", CELL_COUNTS)
def test_equal_probabilities_go_to_the_lowest_index(cells):
    """Every probability equal: Mask-Predict masks the first `count` cells, AR-confidence
    decides the lowest unvisited cell; rows with a few distinct values follow the stable sort."""
    rng = np.random.default_rng(seed_of("ties", cells))
    n, d = 13, 3
    table, mask_row = make_table(n, d, torch.float32), make_mask_row(d, torch.float32)
    counts = sorted({0, 1, cells // 2, cells - 1, cells})
    b = len(counts)
    prob = torch.full((b, cells), 0.5)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, cells)))
    st = random_state(rng, b, n, d, torch.float32, cells=cells)
    S.sampler_step(prob, pred_id, st, table, mask_row, "mask_predict", count=i32(counts))
    want = torch.arange(cells).view(1, -1) < torch.tensor(counts).view(-1, 1)
    assert torch.equal(st.mask, want)

    st = random_state(rng, b, n, d, torch.float32, cells=cells)
    st.visited[:, 0] = cells > 1  # so the lowest unvisited cell is never cell 0 (N = 1: none)
    ids_before, free = st.ids.clone(), ~st.visited
    rows = torch.nonzero(free.any(1)).flatten()  # rows with an unvisited cell decide one
    changed = torch.zeros_like(st.mask)
    changed[rows, free.int().argmax(1)[rows]] = True
    S.sampler_step(prob, pred_id, st, table, mask_row, "confidence")
    assert torch.equal(st.ids, torch.where(changed, pred_id, ids_before))

    stepped = (torch.arange(cells) % 3).float().view(1, -1).expand(b, -1).contiguous() / 3
    for strategy in ("mask_predict", "confidence"):
        st = random_state(rng, b, n, d, torch.float32, cells=cells)
        kw = {"count": i32(counts)} if strategy == "mask_predict" else {}
        ref = oracle_step(stepped, pred_id, st.mask, st.visited, st.ids, table, mask_row, strategy,
                          **{k: v.numpy() for k, v in kw.items()})
        S.sampler_step(stepped, pred_id, st, table, mask_row, strategy, **kw)
        assert_state_equal(st, ref, f"({strategy}, {cells} cells, three values)")


@pytest.mark.parametrize("cells,counts", [(256, range(257)),
                                          (1024, (0, 1, 2, 511, 512, 513, 1023, 1024))])
def test_mask_predict_counts_any_cells(cells, counts):
    """Every count 0..256 on 16x16 rows and the edges of 0..1024 on 32x32 rows, with ties:
    exactly `count` cells masked, the stable-sort set."""
    rng = np.random.default_rng(cells)
    counts = list(counts)
    b, n, d = len(counts), 9, 2
    table, mask_row = make_table(n, d, torch.float32), make_mask_row(d, torch.float32)
    st = random_state(rng, b, n, d, torch.float32, cells=cells)
    prob = random_probs(rng, b, True, cells)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, cells)))
    count = i32(counts)
    ref = oracle_step(prob, pred_id, st.mask, st.visited, st.ids, table, mask_row,
                      "mask_predict", count=count.numpy())
    S.sampler_step(prob, pred_id, st, table, mask_row, "mask_predict", count=count)
    assert st.mask.sum(1).tolist() == counts
    assert_state_equal(st, ref)


# ---------------------------------------------------------------------------------------------
# Whole runs from init_state with the schedule helpers: rows at different steps / seeds.

def authors_random_order(steps, seed):
    positions = list(range(64))
    random.Random(seed).shuffle(positions)
    if steps > 64:
        extra = list(range(steps - 64))
        random.Random(seed).shuffle(extra)
        positions = extra + positions
    return [positions.pop() % 64 for _ in range(steps)]


def test_schedule_helpers_state_the_authors_rules():
    for k in (1, 2, 3, 4, 7, 10, 64, 65, 100, 200):
        sch = S.schedule("mask_predict", k)
        assert sch.count == [int((k - i) / k * 64) for i in range(1, k)] + [0]
        for seed in (0, 1, 1234):
            order = authors_random_order(k, seed)
            sch = S.schedule("random", k, seed)
            assert sch.cell == order and sch.next_cell == order[1:] + [-1]
    assert S.schedule("mask_predict", 4).count == [48, 32, 16, 0]
    assert S.schedule("tlbr", 5).cell == [0, 1, 2, 3, 4]
    assert sorted(S.schedule("random", 64, 5).cell) == list(range(64))
    assert S.schedule("random", 3).cell == S.schedule("random", 3, 0).cell
    t = S.schedule("random", 5, 2).tensors(3)
    assert t["cell"].shape == (5, 3) and t["cell"].dtype == torch.int32
    with pytest.raises(ValueError, match="steps"):
        S.schedule("tlbr", 65)
    with pytest.raises(ValueError, match="steps"):
        S.schedule("mask_predict", 0)
    with pytest.raises(ValueError, match="strategy"):
        S.schedule("zigzag", 4)


@pytest.mark.parametrize("strategy,steps", [
    ("mask_predict", [4, 1, 10, 100]),     # per-row K (rows at different steps), K > 64
    ("random", [64, 100, 3, 70]),          # revisits when K > 64
    ("tlbr", [64, 4, 1, 20]),
    ("confidence", [64, 64, 5, 1]),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_full_runs_match_oracle(strategy, steps, dtype):
    """Every step of whole runs, each row with its own K (and seed), from init_state."""
    rng = np.random.default_rng(len(strategy) * 31 + steps[0])
    b, n, d = len(steps), 97, 5
    table, mask_row = make_table(n, d, dtype), make_mask_row(d, dtype)
    scheds = [S.schedule(strategy, k, seed=r) for r, k in enumerate(steps)]
    st = S.init_state(b, mask_row)
    assert st.mask.all() and not st.visited.any() and (st.ids == -1).all()
    assert torch.equal(st.out, mask_row.expand(b, 64, d))
    for i in range(max(steps)):
        # a finished row keeps going with "no-op" inputs: count from its last mask, cell -1
        def pick(name, default):
            vals = [getattr(s, name)[i] if i < s.steps else default for s in scheds]
            return i32(vals)
        kw = {}
        if strategy == "mask_predict":
            kw["count"] = pick("count", 0)
        if strategy in ("tlbr", "random"):
            kw["cell"] = pick("cell", -1)
        if strategy == "random":
            kw["next_cell"] = pick("next_cell", -1)
        prob = random_probs(rng, b, ties=(i % 2 == 1))
        pred_id = torch.from_numpy(rng.integers(0, n, (b, CELLS)))
        ref = oracle_step(prob, pred_id, st.mask, st.visited, st.ids, table, mask_row, strategy,
                          **{k: v.numpy() for k, v in kw.items()})
        st.out.fill_(float("nan"))  # poison: every row must be rewritten each step
        S.sampler_step(prob, pred_id, st, table, mask_row, strategy, **kw)
        assert_state_equal(st, ref, f"step {i}")
    if strategy == "mask_predict" or strategy == "confidence":
        done = [r for r, k in enumerate(steps) if k >= 64 or strategy == "mask_predict"]
        assert not st.mask[done].any() and (st.ids[done] >= 0).all()


@pytest.mark.parametrize("cells,strategy,steps", [
    (256, "mask_predict", [4, 1, 10, 300]),
    (256, "random", [256, 300, 3]),
    (256, "tlbr", [256, 4, 1]),
    (256, "confidence", [256, 5]),
    (1024, "mask_predict", [4, 16]),
    (1024, "random", [20, 3]),
    (7, "confidence", [7, 2]),
    (1, "mask_predict", [4, 1]),
])
def test_full_runs_any_cells(cells, strategy, steps):
    """Whole runs on N-cell rows from init_state(cells=N) with schedule(n_cells=N)."""
    rng = np.random.default_rng(seed_of(cells, strategy))
    b, n, d, dtype = len(steps), 97, 3, torch.bfloat16
    table, mask_row = make_table(n, d, dtype), make_mask_row(d, dtype)
    scheds = [S.schedule(strategy, k, seed=r, n_cells=cells) for r, k in enumerate(steps)]
    st = S.init_state(b, mask_row, cells=cells)
    assert st.mask.shape == (b, cells) and st.out.shape == (b, cells, d)
    for i in range(max(steps)):
        def pick(name, default):
            return i32([getattr(s, name)[i] if i < s.steps else default for s in scheds])
        kw = {}
        if strategy == "mask_predict":
            kw["count"] = pick("count", 0)
        if strategy in ("tlbr", "random"):
            kw["cell"] = pick("cell", -1)
        if strategy == "random":
            kw["next_cell"] = pick("next_cell", -1)
        prob = random_probs(rng, b, i % 2 == 1, cells)
        pred_id = torch.from_numpy(rng.integers(0, n, (b, cells)))
        ref = oracle_step(prob, pred_id, st.mask, st.visited, st.ids, table, mask_row, strategy,
                          **{k: v.numpy() for k, v in kw.items()})
        st.out.fill_(float("nan"))
        S.sampler_step(prob, pred_id, st, table, mask_row, strategy, **kw)
        assert_state_equal(st, ref, f"step {i}")
    done = [r for r, k in enumerate(steps) if strategy == "mask_predict" or
            (strategy in ("tlbr", "confidence") and k == cells)]
    assert not st.mask[done].any() and (st.ids[done] >= 0).all()


# ---------------------------------------------------------------------------------------------
# torch.library: fake tensors, meta, torch.compile.

def small_case(b=3, n=11, d=4, dtype=torch.float32, device="cpu", cells=CELLS):
    rng = np.random.default_rng(0)
    table, mask_row = make_table(n, d, dtype).to(device), make_mask_row(d, dtype).to(device)
    prob = random_probs(rng, b, False, cells).to(device)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, cells))).to(device)
    return table, mask_row, prob, pred_id


def test_opcheck():
    table, mask_row, prob, pred_id = small_case()
    st = S.init_state(3, mask_row)
    args = (prob, pred_id, table, mask_row, st.mask, st.visited, st.ids, st.out, st.status,
            i32([10, 0, 64]), None, None, 0)
    torch.library.opcheck(torch.ops.xlx_fast.sampler_step.default, args)


def test_fake_and_meta():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        table, mask_row = torch.empty(11, 4), torch.empty(4)
        st = S.SamplerState(torch.empty(2, 64, dtype=torch.bool), torch.empty(2, 64, dtype=torch.bool),
                            torch.empty(2, 64, dtype=torch.int64), torch.empty(2, 64, 4),
                            torch.empty(2, dtype=torch.int32))
        S.sampler_step(torch.empty(2, 64), torch.empty(2, 64, dtype=torch.int64), st, table,
                       mask_row, "confidence")
        with pytest.raises(ValueError, match="pred_prob"):
            S.sampler_step(torch.empty(2, 63), torch.empty(2, 64, dtype=torch.int64), st, table,
                           mask_row, "confidence")
    m = torch.device("meta")
    st = S.init_state(2, torch.empty(4, device=m))
    S.sampler_step(torch.empty(2, 64, device=m), torch.empty(2, 64, dtype=torch.int64, device=m),
                   st, torch.empty(11, 4, device=m), torch.empty(4, device=m), "tlbr",
                   cell=torch.empty(2, dtype=torch.int32, device=m))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    """The op inside a compiled graph (functionalised in-place updates) equals eager; inductor
    (a ~30 s C++ compile on 2 cores) is the slow variant."""
    table, mask_row, prob, pred_id = small_case(b=2, d=6)

    def two_steps(state, prob, pred_id, count1, count2):
        S.sampler_step(prob, pred_id, state, table, mask_row, "mask_predict", count=count1)
        S.sampler_step(prob.flip(1), (pred_id + 1) % 11, state, table, mask_row, "mask_predict",
                       count=count2)
        return state.ids.clone(), state.out * 2

    c1, c2 = i32([48, 10]), i32([32, 0])
    eager = S.init_state(2, mask_row)
    e_ids, e_out = two_steps(eager, prob, pred_id, c1, c2)
    compiled_state = S.init_state(2, mask_row)
    fn = torch.compile(two_steps, fullgraph=True, backend=backend)
    c_ids, c_out = fn(compiled_state, prob, pred_id, c1, c2)
    assert torch.equal(e_ids, c_ids) and torch.equal(e_out, c_out)
    assert torch.equal(eager.mask, compiled_state.mask)
    assert torch.equal(eager.visited, compiled_state.visited)


# ---------------------------------------------------------------------------------------------
# Bad input.

def bad_case(strategy="mask_predict", b=2, n=11, d=4, cells=CELLS):
    table, mask_row, prob, pred_id = small_case(b=b, n=n, d=d, cells=cells)
    st = S.init_state(b, mask_row, cells=cells)
    kw = {"count": i32([min(16, cells)] * b)} if strategy == "mask_predict" else {}
    if strategy in ("tlbr", "random"):
        kw["cell"] = i32([0] * b)
    return dict(pred_prob=prob, pred_id=pred_id, state=st, table=table, mask_row=mask_row,
                strategy=strategy, **kw)


def call(case, **change):
    args = {**case, **change}
    return S.sampler_step(args.pop("pred_prob"), args.pop("pred_id"), args.pop("state"),
                          args.pop("table"), args.pop("mask_row"), args.pop("strategy"), **args)


def replace_state(case, **fields):
    st = case["state"]
    return S.SamplerState(**{k: fields.get(k, getattr(st, k)) for k in
                             ("mask", "visited", "ids", "out", "status")})


@pytest.mark.parametrize("change,exc,match", [
    (dict(pred_prob=torch.rand(2, 64, dtype=torch.float64)), TypeError, "pred_prob"),
    (dict(pred_prob=torch.rand(2, 63)), ValueError, "pred_prob"),
    (dict(pred_prob=torch.rand(64)), ValueError, "pred_prob"),
    (dict(pred_prob=torch.rand(0, 64)), ValueError, "empty batch"),
    (dict(pred_prob=torch.rand(64, 2).t()), ValueError, "pred_prob must be contiguous"),
    (dict(pred_id=torch.zeros(2, 64, dtype=torch.int32)), TypeError, "pred_id"),
    (dict(pred_id=torch.zeros(3, 64, dtype=torch.int64)), ValueError, "pred_id"),
    (dict(table=torch.zeros(11, 4, dtype=torch.int64)), TypeError, "table"),
    (dict(table=torch.zeros(11, 4, 1)), ValueError, "table"),
    (dict(table=torch.zeros(0, 4)), ValueError, "table"),
    (dict(table=torch.zeros(4, 11).t()), ValueError, "table must be contiguous"),
    (dict(mask_row=torch.zeros(4, dtype=torch.float16)), TypeError, "mask_row"),
    (dict(mask_row=torch.zeros(5)), ValueError, "mask_row"),
    (dict(count=torch.zeros(2, dtype=torch.int64)), TypeError, "count"),
    (dict(count=torch.zeros(3, dtype=torch.int32)), ValueError, "count"),
    (dict(count=None), ValueError, "count is required"),
    (dict(strategy="zigzag"), ValueError, "strategy"),
    (dict(strategy=9), ValueError, "strategy"),
    (dict(strategy=1.0), TypeError, "strategy"),
    (dict(pred_id=torch.zeros(2, 64, dtype=torch.int64, device="meta")), ValueError,
     "pred_id is on meta"),
    (dict(count=torch.zeros(2, dtype=torch.int32, device="meta")), ValueError, "count is on meta"),
])
def test_bad_arguments(change, exc, match):
    with pytest.raises(exc, match=match):
        call(bad_case(), **change)


@pytest.mark.parametrize("field,value,exc,match", [
    ("mask", torch.ones(2, 64, dtype=torch.uint8), TypeError, "mask"),
    ("visited", torch.zeros(2, 65, dtype=torch.bool), ValueError, "visited"),
    ("ids", torch.zeros(2, 64, dtype=torch.int32), TypeError, "ids"),
    ("out", torch.zeros(2, 64, 4, dtype=torch.bfloat16), TypeError, "out"),
    ("out", torch.zeros(2, 4, 64).transpose(1, 2), ValueError, "out must be contiguous"),
    ("out", torch.zeros(2, 64, 5), ValueError, "out"),
    ("status", torch.zeros(2, dtype=torch.int64), TypeError, "status"),
    ("status", torch.zeros(2, dtype=torch.int32, device="meta"), ValueError, "status is on meta"),
])
def test_bad_state(field, value, exc, match):
    case = bad_case()
    with pytest.raises(exc, match=match):
        call(case, state=replace_state(case, **{field: value}))


@pytest.mark.parametrize("strategy,change,match", [
    ("mask_predict", dict(count=i32([16, 65])), r"count\[1\] = 65 is outside 0..64"),
    ("mask_predict", dict(count=i32([-1, 3])), r"count\[0\] = -1 is outside 0..64"),
    ("tlbr", dict(cell=i32([0, 64])), r"cell\[1\] = 64"),
    ("random", dict(cell=i32([-2, 0])), r"cell\[0\] = -2"),
    ("random", dict(next_cell=i32([3, 64])), r"next_cell\[1\] = 64"),
    ("mask_predict", dict(pred_id=torch.full((2, 64), 11, dtype=torch.int64)),
     r"ids out of range: row 0, cell 0.*pred_id 11"),
    ("mask_predict", dict(pred_id=torch.full((2, 64), -5, dtype=torch.int64)),
     r"ids out of range.*pred_id -5"),
])
def test_bad_values_raise_and_write_nothing_but_status(strategy, change, match):
    case = bad_case(strategy)
    st = case["state"]
    before = [t.clone() for t in (st.mask, st.visited, st.ids, st.out)]
    with pytest.raises(ValueError, match=match):
        call(case, **change)
    for t, b in zip((st.mask, st.visited, st.ids, st.out), before):
        assert torch.equal(t, b)
    assert (st.status != 0).any()
    with pytest.raises(ValueError, match="flagged"):
        S.check_status(st.status)


def test_bad_id_in_state_and_nan_prob():
    case = bad_case("tlbr")
    case["state"].ids[1, 5] = 10_000  # cell 5 is unmasked after step -> gathered -> must fail
    case["state"].mask[1, 5] = False
    with pytest.raises(ValueError, match=r"row 1, cell 5.*ids 10000"):
        call(case)
    case = bad_case("confidence")
    prob = case["pred_prob"].clone()
    prob[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        call(case, pred_prob=prob)


def test_status_is_sticky_and_reset_clears_it():
    case = bad_case()
    with pytest.raises(ValueError):
        call(case, count=i32([70, 1]))
    assert case["state"].status.tolist() == [S.STATUS_BAD_COUNT, 0]
    call(case)  # a good step does not clear the flag
    assert case["state"].status.tolist() == [S.STATUS_BAD_COUNT, 0]
    S.reset_state(case["state"], case["mask_row"])
    assert case["state"].status.tolist() == [0, 0]


def test_bytes_moved():
    assert S.sampler_step_bytes(1, 768, torch.bfloat16) > 2 * 64 * 768 * 2
    assert S.sampler_step_bytes(64, 2048, torch.float32) < 1.01 * 2 * 64 * 64 * 2048 * 4


@pytest.mark.parametrize("cells", [1, 7, 256, 1024])
@pytest.mark.parametrize("strategy,name,ok,bad,code,bound", [
    ("mask_predict", "count", lambda n: n, lambda n: n + 1, S.STATUS_BAD_COUNT, "0..{n}"),
    ("mask_predict", "count", lambda n: 0, lambda n: -1, S.STATUS_BAD_COUNT, "0..{n}"),
    ("tlbr", "cell", lambda n: n - 1, lambda n: n, S.STATUS_BAD_CELL, "-1..{last}"),
    ("random", "cell", lambda n: -1, lambda n: -2, S.STATUS_BAD_CELL, "-1..{last}"),
    ("random", "next_cell", lambda n: n - 1, lambda n: n, S.STATUS_BAD_NEXT_CELL, "-1..{last}"),
], ids=["count=N+1", "count=-1", "cell=N", "cell=-2", "next_cell=N"])
def test_bounds_follow_the_cell_count(cells, strategy, name, ok, bad, code, bound):
    """count in [0, N], cell and next_cell in [-1, N): the bound itself passes, one past it
    flags the row with the bound in the message and writes nothing but status."""
    case = bad_case(strategy, cells=cells)
    if strategy == "random":
        case["next_cell"] = i32([-1, -1])
    call(case, **{name: i32([ok(cells), ok(cells)])})
    assert case["state"].status.tolist() == [0, 0]
    st = case["state"]
    before = [t.clone() for t in (st.mask, st.visited, st.ids, st.out)]
    text = bound.format(n=cells, last=cells - 1)
    with pytest.raises(ValueError, match=rf"{name}\[1\] = {bad(cells)} is outside {re.escape(text)} \("):
        call(case, **{name: i32([ok(cells), bad(cells)])})
    for t, b in zip((st.mask, st.visited, st.ids, st.out), before):
        assert torch.equal(t, b)
    assert st.status.tolist() == [0, code]
    assert S.describe_status(code, cells).endswith(text)
    with pytest.raises(ValueError, match=rf"row 1: {name} outside {re.escape(text)}"):
        S.check_status(st.status, cells)


@pytest.mark.parametrize("cells,bad_cells", [(65, [64]), (256, [200, 64]), (256, [255]),
                                             (1024, [1000, 700]), (1024, [1023])])
@pytest.mark.parametrize("strategy", ["mask_predict", "random"])
def test_bad_id_past_cell_64_is_named(cells, bad_cells, strategy):
    """A bad id at a cell past 64 is encoded as STATUS_BAD_ID_BASE + cell and decoded to that
    cell, the lowest bad one, in the error, describe_status and check_status."""
    case = bad_case(strategy, cells=cells)
    pred_id = case["pred_id"].clone()
    pred_id[1, bad_cells] = 11  # the table has 11 rows
    if strategy == "random":  # only `cell` is decided: a bad id there is used
        pred_id[1, :] = 11
        case["cell"] = i32([0, min(bad_cells)])
        case["next_cell"] = i32([-1, -1])
    lowest = min(bad_cells)
    with pytest.raises(ValueError, match=rf"ids out of range: row 1, cell {lowest} .*pred_id 11"):
        call(case, pred_id=pred_id)
    code = int(case["state"].status[1])
    assert case["state"].status.tolist() == [0, S.STATUS_BAD_ID_BASE + lowest]
    assert S.bad_id_cell(code) == lowest
    assert S.describe_status(code) == S.describe_status(code, cells) == f"id out of range at cell {lowest}"
    with pytest.raises(ValueError, match=rf"row 1: id out of range at cell {lowest}$"):
        S.check_status(case["state"].status)


def test_status_codes_are_the_native_enum():
    """The Python constants are csrc/sampler_rules.h's values, and the two kinds of code never
    meet for any N up to MAX_CELLS."""
    header = (CSRC / "sampler_rules.h").read_text()
    body = re.search(r"enum Status : int \{(.*?)\};", header, re.S).group(1)
    native = {k: eval(v) for k, v in re.findall(r"(k\w+) = ([^,]+),", body)}
    assert native == {"kOk": 0, "kBadCount": S.STATUS_BAD_COUNT, "kBadCell": S.STATUS_BAD_CELL,
                      "kBadNextCell": S.STATUS_BAD_NEXT_CELL, "kBadProb": S.STATUS_BAD_PROB,
                      "kBadStrategy": S.STATUS_BAD_STRATEGY, "kBadIdBase": S.STATUS_BAD_ID_BASE}
    assert int(re.search(r"constexpr int kMaxCells = (\d+);", header).group(1)) == S.MAX_CELLS
    fixed = [S.STATUS_BAD_COUNT, S.STATUS_BAD_CELL, S.STATUS_BAD_NEXT_CELL, S.STATUS_BAD_PROB,
             S.STATUS_BAD_STRATEGY]
    assert max(fixed) < S.STATUS_BAD_ID_BASE and S.STATUS_BAD_ID_BASE + S.MAX_CELLS < 2**31
    assert all(S.bad_id_cell(c) is None for c in [0, *fixed, S.STATUS_BAD_ID_BASE - 1,
                                                  S.STATUS_BAD_ID_BASE + S.MAX_CELLS])
    for c in (0, 63, 64, 65, 255, 256, 1023):
        assert S.bad_id_cell(S.STATUS_BAD_ID_BASE + c) == c
        assert S.describe_status(S.STATUS_BAD_ID_BASE + c) == f"id out of range at cell {c}"
    assert S.describe_status(S.STATUS_BAD_COUNT) == "count outside 0..N"
    assert S.describe_status(S.STATUS_BAD_COUNT, 64) == "count outside 0..64"
    assert S.describe_status(S.STATUS_BAD_CELL, 1024) == "cell outside -1..1023"
    assert S.describe_status(S.STATUS_BAD_NEXT_CELL, 256) == "next_cell outside -1..255"
    assert S.describe_status(S.STATUS_BAD_PROB) == "NaN in pred_prob"
    assert S.describe_status(S.STATUS_BAD_STRATEGY) == "unknown strategy"
    assert S.describe_status(7) == "status 7"


def test_nan_and_bad_id_at_1024_cells():
    case = bad_case("confidence", cells=1024)
    prob = case["pred_prob"].clone()
    prob[1, 900] = float("nan")
    with pytest.raises(ValueError, match="pred_prob has NaN in row 1"):
        call(case, pred_prob=prob)
    assert case["state"].status.tolist() == [0, S.STATUS_BAD_PROB]
    case = bad_case("tlbr", cells=1024)
    case["state"].ids[0, 999] = 10_000  # unmasked after the step -> gathered -> must fail
    case["state"].mask[0, 999] = False
    with pytest.raises(ValueError, match=r"row 0, cell 999.*ids 10000"):
        call(case)
    assert case["state"].status.tolist() == [S.STATUS_BAD_ID_BASE + 999, 0]


@pytest.mark.parametrize("change,exc,match", [
    (dict(pred_prob=torch.rand(2, 0)), ValueError, r"pred_prob must have 1 to 1024 cells.*N = 0"),
    (dict(pred_prob=torch.rand(2, 1025)), ValueError, r"pred_prob must have 1 to 1024 .*N = 1025"),
    (dict(pred_prob=torch.rand(2, 255)), ValueError,
     r"pred_id must have shape \[2, 255\], got \(2, 256\) \(B = 2 and N = 255 are pred_prob's shape\)"),
    (dict(pred_id=torch.zeros(2, 64, dtype=torch.int64)), ValueError, r"pred_id must have shape \[2, 256\]"),
])
def test_shapes_must_agree_on_the_cell_count(change, exc, match):
    with pytest.raises(exc, match=match):
        call(bad_case(cells=256), **change)


@pytest.mark.parametrize("field,shape", [("mask", (2, 255)), ("visited", (2, 1024)), ("ids", (2, 64)),
                                         ("out", (2, 255, 4)), ("out", (2, 256, 5))])
def test_state_must_have_the_cell_count(field, shape):
    case = bad_case(cells=256)
    dtype = getattr(case["state"], field).dtype
    with pytest.raises(ValueError, match=rf"{field} must have shape .*N = 256 are pred_prob's shape"):
        call(case, state=replace_state(case, **{field: torch.zeros(shape, dtype=dtype)}))


def test_out_rows_over_2_to_the_30_bytes_are_refused():
    """The kernel indexes a row of out with int32 words: N·D·itemsize <= 2^30 (meta tensors:
    the check reads shapes only)."""
    m = torch.device("meta")

    def args(cells, d):
        return SamplerStepArgs(
            torch.empty(1, cells, device=m), torch.empty(1, cells, dtype=torch.int64, device=m),
            torch.empty(3, d, device=m), torch.empty(d, device=m),
            torch.empty(1, cells, dtype=torch.bool, device=m),
            torch.empty(1, cells, dtype=torch.bool, device=m),
            torch.empty(1, cells, dtype=torch.int64, device=m), torch.empty(1, cells, d, device=m),
            torch.empty(1, dtype=torch.int32, device=m), None, None, None, S.STRATEGIES["confidence"])

    args(1024, 1 << 18).check()  # exactly 2^30 bytes
    with pytest.raises(ValueError, match=r"out rows .* at most 1073741824 bytes, got N = 1024"):
        args(1024, (1 << 18) + 1).check()
    args(64, (1 << 22) - 1).check()  # the default grid never meets it under MAX_ROW_BYTES


@pytest.mark.parametrize("cells", [0, 1025, True, 64.0])
def test_init_state_checks_cells(cells):
    with pytest.raises(ValueError, match="cells must be an int in 1..1024"):
        S.init_state(2, make_mask_row(3, torch.float32), cells=cells)


def test_init_state_and_bytes_any_cells():
    mask_row = make_mask_row(5, torch.bfloat16)
    st = S.init_state(3, mask_row, cells=1024)
    assert st.mask.shape == st.visited.shape == st.ids.shape == (3, 1024)
    assert st.out.shape == (3, 1024, 5) and torch.equal(st.out, mask_row.expand(3, 1024, 5))
    assert S.init_state(3, mask_row).mask.shape == (3, 64)  # the default grid
    assert S.sampler_step_bytes(2, 768, torch.bfloat16, cells=1024) == (
        2 * 2 * 1024 * 768 * 2 + 2 * 1024 * 32 + 2 * 16)
    assert S.sampler_step_bytes(2, 768, torch.bfloat16) == S.sampler_step_bytes(2, 768, torch.bfloat16, 64)


@pytest.mark.parametrize("cells", [7, 256, 1024])
def test_opcheck_any_cells(cells):
    table, mask_row, prob, pred_id = small_case(cells=cells)
    st = S.init_state(3, mask_row, cells=cells)
    args = (prob, pred_id, table, mask_row, st.mask, st.visited, st.ids, st.out, st.status,
            i32([cells // 3, 0, cells]), None, None, 0)
    torch.library.opcheck(torch.ops.xlx_fast.sampler_step.default, args)


def test_fake_tensors_any_cells():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        st = S.SamplerState(torch.empty(2, 1024, dtype=torch.bool), torch.empty(2, 1024, dtype=torch.bool),
                            torch.empty(2, 1024, dtype=torch.int64), torch.empty(2, 1024, 4),
                            torch.empty(2, dtype=torch.int32))
        S.sampler_step(torch.empty(2, 1024), torch.empty(2, 1024, dtype=torch.int64), st,
                       torch.empty(11, 4), torch.empty(4), "confidence")
        with pytest.raises(ValueError, match="N = 1025"):
            S.sampler_step(torch.empty(2, 1025), torch.empty(2, 1025, dtype=torch.int64), st,
                           torch.empty(11, 4), torch.empty(4), "confidence")


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA kernel vs the C++ twin, graph capture.

def twin_and_cuda(rng, strategy, n, d, dtype, b, backend=None, table_offset=0, cells=CELLS):
    """Run one step on CPU (twin) and CUDA from the same inputs; returns both states."""
    table_full = make_table(n + table_offset, d, dtype)
    table = table_full[table_offset:]  # an offset view: a misaligned base pointer
    mask_row = make_mask_row(d, dtype)
    st = random_state(rng, b, n, d, dtype, cells=cells)
    prob = random_probs(rng, b, True, cells)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, cells)))
    kw = strategy_args(rng, strategy, b, cells)
    gpu = S.SamplerState(*(t.cuda() for t in (st.mask, st.visited, st.ids, st.out, st.status)))
    S.sampler_step(prob, pred_id, st, table, mask_row, strategy, **kw)
    args = (prob.cuda(), pred_id.cuda(), table_full.cuda()[table_offset:], mask_row.cuda(),
            gpu.mask, gpu.visited, gpu.ids, gpu.out, gpu.status,
            *(kw[k].cuda() if k in kw else None for k in ("count", "cell", "next_cell")),
            S.STRATEGIES[strategy])
    a = SamplerStepArgs(*args)
    a.check()
    run(a, backend=backend)
    torch.cuda.synchronize()
    return st, gpu


def assert_same(st, gpu, what):
    for name in ("mask", "visited", "ids", "status"):
        assert torch.equal(getattr(st, name), getattr(gpu, name).cpu()), f"{name} differs {what}"
    a, g = st.out, gpu.out.cpu()
    assert torch.equal(a.view(-1).view(torch.uint8), g.view(-1).view(torch.uint8)), f"out differs {what}"


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", list(S.STRATEGIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,offset", [(1, 1, 0), (37, 3, 1), (10_000, 768, 0), (10_000, 2048, 0),
                                        (50, 8, 1), (50, 6, 1)])
def test_cuda_matches_twin(strategy, dtype, n, d, offset):
    rng = np.random.default_rng(hash((strategy, str(dtype), n, d)) % 2**32)
    for b in (1, 7, 130):
        st, gpu = twin_and_cuda(rng, strategy, n, d, dtype, b, table_offset=offset)
        assert_same(st, gpu, f"({strategy}, N={n}, D={d}, {dtype}, B={b})")


@pytest.mark.gpu
def test_cuda_cupy_path_matches_twin():
    pytest.importorskip("cupy")
    rng = np.random.default_rng(5)
    for strategy in S.STRATEGIES:
        for dtype, d in ((torch.float32, 3), (torch.bfloat16, 768), (torch.float16, 2048)):
            st, gpu = twin_and_cuda(rng, strategy, 10_000, d, dtype, 9, backend="cupy")
            assert_same(st, gpu, f"cupy ({strategy}, D={d}, {dtype})")


@pytest.mark.gpu
def test_cuda_bad_values_flag_status():
    rng = np.random.default_rng(6)
    n, d, b = 10, 8, 3
    table, mask_row = make_table(n, d, torch.float32).cuda(), make_mask_row(d, torch.float32).cuda()
    st = S.init_state(b, mask_row)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, CELLS))).cuda()
    pred_id[1, 7] = n  # row 1: bad id at cell 7
    count = torch.tensor([0, 0, 65], dtype=torch.int32, device="cuda")  # row 2: bad count
    out_before = st.out.clone()
    S.sampler_step(random_probs(rng, b, False).cuda(), pred_id, st, table, mask_row,
                   "mask_predict", count=count)
    assert st.status.tolist() == [0, S.STATUS_BAD_ID_BASE + 7, S.STATUS_BAD_COUNT]
    assert torch.equal(st.out[1, 7], mask_row)          # never an out-of-bounds read
    assert torch.equal(st.out[2], out_before[2])        # a bad row is left alone
    assert torch.equal(st.out[0], table[pred_id[0]])
    with pytest.raises(ValueError, match="row 1: id out of range at cell 7"):
        S.check_status(st.status)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy,steps", [("mask_predict", 4), ("random", 70), ("confidence", 64)])
def test_cuda_graph_capture_and_replay(strategy, steps):
    """A whole run (reset + K steps, per-step inputs in static buffers) captured once and
    replayed equals the eager CUDA run and the C++ twin."""
    graph_capture_and_replay(strategy, steps, CELLS)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy,steps,cells", [
    ("mask_predict", 4, 1024), ("mask_predict", 16, 256), ("random", 300, 256),
    ("confidence", 256, 256), ("tlbr", 40, 1024), ("confidence", 30, 1024),
])
def test_cuda_graph_capture_and_replay_any_cells(strategy, steps, cells):
    """The same on 16x16 and 32x32 rows."""
    graph_capture_and_replay(strategy, steps, cells)


def graph_capture_and_replay(strategy, steps, cells):
    rng = np.random.default_rng(7)
    b, n, d, dtype = 5, 10_000, 768, torch.bfloat16
    table, mask_row = make_table(n, d, dtype).cuda(), make_mask_row(d, dtype).cuda()
    sched = S.schedule(strategy, steps, seed=3, n_cells=cells).tensors(b, device="cuda")
    probs = torch.stack([random_probs(rng, b, True, cells) for _ in range(steps)]).cuda()
    pids = torch.from_numpy(rng.integers(0, n, (steps, b, cells))).cuda()

    def run(state):
        S.reset_state(state, mask_row)
        for i in range(steps):
            kw = {k: v[i] for k, v in sched.items()}
            S.sampler_step(probs[i], pids[i], state, table, mask_row, strategy, **kw)

    eager = S.init_state(b, mask_row, cells)
    run(eager)
    cpu = S.init_state(b, mask_row.cpu(), cells)
    for i in range(steps):
        kw = {k: v[i].cpu() for k, v in sched.items()}
        S.sampler_step(probs[i].cpu(), pids[i].cpu(), cpu, table.cpu(), mask_row.cpu(), strategy, **kw)

    graphed = S.init_state(b, mask_row, cells)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(graphed)  # warm-up (first launches, CuPy/_C loading) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(graphed)
    graphed.out.fill_(float("nan"))
    graphed.ids.fill_(-7)
    graph.replay()
    torch.cuda.synchronize()
    for name in ("mask", "visited", "ids", "out", "status"):
        assert torch.equal(getattr(graphed, name), getattr(eager, name)), name
        assert torch.equal(getattr(graphed, name).cpu(), getattr(cpu, name)), name
    # new inputs in the same buffers: the replay follows them
    probs.copy_(probs.flip(-1))
    graph.replay()
    run(eager)
    torch.cuda.synchronize()
    assert torch.equal(graphed.ids, eager.ids) and torch.equal(graphed.out, eager.out)


@pytest.mark.gpu
def test_cuda_torch_compile():
    table, mask_row, prob, pred_id = small_case(b=2, d=6, device="cuda")

    def step(state, prob, pred_id, count):
        S.sampler_step(prob, pred_id, state, table, mask_row, "mask_predict", count=count)
        return state.ids.clone()

    count = torch.tensor([20, 0], dtype=torch.int32, device="cuda")
    eager = S.init_state(2, mask_row)
    compiled = S.init_state(2, mask_row)
    assert torch.equal(step(eager, prob, pred_id, count),
                       torch.compile(step, fullgraph=True)(compiled, prob, pred_id, count))
    assert torch.equal(eager.out, compiled.out)


@pytest.mark.gpu
@pytest.mark.parametrize("cells", [1, 7, 256, 513, 1024])
@pytest.mark.parametrize("strategy", list(S.STRATEGIES))
@pytest.mark.parametrize("dtype,n,d,offset,rows", [
    (torch.float32, 37, 3, 1, (1, 7, 130)), (torch.float32, 50, 6, 1, (1, 7, 130)),
    (torch.bfloat16, 10_000, 768, 0, (1, 7, 33)), (torch.float16, 10_000, 2048, 0, (1, 9)),
], ids=["f32-d3", "f32-d6", "bf16-d768", "f16-d2048"])
def test_cuda_matches_twin_any_cells(cells, strategy, dtype, n, d, offset, rows):
    """Rows of 1 to 1,024 cells: 513 and 1,024 give some threads two cells, the selection
    ranks across the whole block."""
    rng = np.random.default_rng(seed_of(cells, strategy, d))
    for b in rows:
        st, gpu = twin_and_cuda(rng, strategy, n, d, dtype, b, table_offset=offset, cells=cells)
        assert_same(st, gpu, f"({strategy}, {cells} cells, N={n}, D={d}, {dtype}, B={b})")


@pytest.mark.gpu
@pytest.mark.parametrize("cells", [256, 1024])
def test_cuda_cupy_path_matches_twin_any_cells(cells):
    pytest.importorskip("cupy")
    rng = np.random.default_rng(cells)
    for strategy in S.STRATEGIES:
        for dtype, d in ((torch.float32, 3), (torch.bfloat16, 768)):
            st, gpu = twin_and_cuda(rng, strategy, 10_000, d, dtype, 9, backend="cupy", cells=cells)
            assert_same(st, gpu, f"cupy ({strategy}, {cells} cells, D={d}, {dtype})")


@pytest.mark.gpu
@pytest.mark.parametrize("cells", [256, 1024])
def test_cuda_ties_go_to_the_lowest_index_any_cells(cells):
    """All probabilities equal on the GPU: the first `count` cells are masked."""
    n, d, b = 10, 8, 4
    table, mask_row = make_table(n, d, torch.float32).cuda(), make_mask_row(d, torch.float32).cuda()
    st = S.init_state(b, mask_row, cells)
    counts = [0, 1, cells // 2, cells]
    pred_id = torch.randint(0, n, (b, cells), device="cuda")
    S.sampler_step(torch.full((b, cells), 0.25, device="cuda"), pred_id, st, table, mask_row,
                   "mask_predict", count=torch.tensor(counts, dtype=torch.int32, device="cuda"))
    want = torch.arange(cells).view(1, -1) < torch.tensor(counts).view(-1, 1)
    assert torch.equal(st.mask.cpu(), want)
    assert torch.equal(st.out, torch.where(want.cuda()[..., None], mask_row, table[pred_id]))


@pytest.mark.gpu
@pytest.mark.parametrize("cells", [256, 1024])
def test_cuda_bad_values_flag_status_any_cells(cells):
    """Bad ids past cell 64 come back as STATUS_BAD_ID_BASE + cell (the lowest), bounds follow N."""
    rng = np.random.default_rng(cells + 6)
    n, d, b = 10, 8, 5
    table, mask_row = make_table(n, d, torch.float32).cuda(), make_mask_row(d, torch.float32).cuda()
    st = S.init_state(b, mask_row, cells)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, cells))).cuda()
    pred_id[1, [cells - 1, 200]] = n  # row 1: bad ids at cells 200 and N-1 -> 200 is named
    pred_id[3, cells - 1] = -1        # row 3: bad id at the last cell
    count = torch.tensor([0, 0, cells + 1, 0, cells], dtype=torch.int32, device="cuda")  # row 2
    out_before = st.out.clone()
    S.sampler_step(random_probs(rng, b, False, cells).cuda(), pred_id, st, table, mask_row,
                   "mask_predict", count=count)
    base = S.STATUS_BAD_ID_BASE
    assert st.status.tolist() == [0, base + 200, S.STATUS_BAD_COUNT, base + cells - 1, 0]
    assert torch.equal(st.out[1, 200], mask_row) and torch.equal(st.out[3, cells - 1], mask_row)
    assert torch.equal(st.out[2], out_before[2])  # a bad row is left alone
    assert torch.equal(st.out[0], table[pred_id[0]])
    assert torch.equal(st.out[4], mask_row.expand(cells, d))  # count N: every cell masked
    with pytest.raises(ValueError, match=rf"row 1: id out of range at cell 200, row 2: count "
                                         rf"outside 0..{cells}, row 3: id out of range at cell {cells - 1}"):
        S.check_status(st.status, cells)


# ---------------------------------------------------------------------------------------------
# Per-row strategy codes: one call, each row under its own rule; INACTIVE rows untouched.

def mixed_rows(rng, n, d, dtype, b, cells=CELLS):
    """Inputs with a per-row strategy code (every strategy and INACTIVE present) and per-row
    count/cell/next_cell valid for whichever rule a row has."""
    codes = [0, 1, 2, 3, S.INACTIVE] + list(rng.integers(0, 5, max(0, b - 5)))
    codes = i32(codes[:b])
    st = random_state(rng, b, n, d, dtype, cells=cells)
    prob = random_probs(rng, b, True, cells)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, cells)))
    kw = {"count": i32(rng.integers(0, cells + 1, b)), "cell": i32(rng.integers(-1, cells, b)),
          "next_cell": i32(rng.integers(-1, cells, b))}
    return codes, st, prob, pred_id, kw


@pytest.mark.parametrize("cells", [64, 7, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_row_strategies_equal_one_strategy_per_row(dtype, cells):
    rng = np.random.default_rng(21)
    n, d, b = 50, 8, 13
    table, mask_row = make_table(n, d, dtype), make_mask_row(d, dtype)
    codes, st, prob, pred_id, kw = mixed_rows(rng, n, d, dtype, b, cells)
    before = [t.clone() for t in (st.mask, st.visited, st.ids, st.out, st.status)]
    names = {v: k for k, v in S.STRATEGIES.items()}
    S.sampler_step(prob, pred_id, st, table, mask_row, codes, **kw)
    for r in range(b):
        code = int(codes[r])
        if code == S.INACTIVE:  # not read, not written: the poisoned output stays
            for now, old in zip((st.mask, st.visited, st.ids, st.out, st.status), before):
                assert torch.equal(now[r].view(-1).view(torch.uint8), old[r].view(-1).view(torch.uint8))
            continue
        one = S.SamplerState(*(t[r:r + 1].clone() for t in before))
        S.sampler_step(prob[r:r + 1], pred_id[r:r + 1], one, table, mask_row, names[code],
                       **{k: v[r:r + 1] for k, v in kw.items()})
        assert_state_equal(S.SamplerState(st.mask[r:r + 1], st.visited[r:r + 1], st.ids[r:r + 1],
                                          st.out[r:r + 1], st.status[r:r + 1]),
                           (one.mask, one.visited, one.ids, one.out), f"row {r} ({names[code]})")


def test_per_row_unknown_code_flags_its_row_only():
    n, d = 10, 4
    table, mask_row = make_table(n, d, torch.float32), make_mask_row(d, torch.float32)
    st = S.init_state(3, mask_row)
    prob, pred_id = torch.rand(3, CELLS), torch.zeros(3, CELLS, dtype=torch.int64)
    kw = {"count": i32([0, 0, 0]), "cell": i32([0, 0, 0])}
    with pytest.raises(ValueError, match="unknown strategy code in row 1"):
        S.sampler_step(prob, pred_id, st, table, mask_row, i32([0, 9, 0]), **kw)
    assert st.status.tolist() == [0, S.STATUS_BAD_STRATEGY, 0]
    assert (st.ids == -1).all()  # nothing but status was written
    with pytest.raises(TypeError, match="strategies"):
        S.sampler_step(prob, pred_id, st, table, mask_row, torch.zeros(3, dtype=torch.int64), **kw)
    with pytest.raises(ValueError, match="count is required with per-row"):
        S.sampler_step(prob, pred_id, st, table, mask_row, i32([0, 0, 0]), cell=kw["cell"])


@pytest.mark.gpu
@pytest.mark.parametrize("cells", [64, 256, 1024])
@pytest.mark.parametrize("backend", ["compiled", "cupy"])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 3), (torch.bfloat16, 768), (torch.float16, 2048)])
def test_cuda_per_row_strategies_match_twin(backend, dtype, d, cells):
    if backend == "cupy":
        pytest.importorskip("cupy")
    rng = np.random.default_rng(22)
    n = 10_000
    table, mask_row = make_table(n, d, dtype), make_mask_row(d, dtype)
    for b in (5, 37, 130):
        codes, st, prob, pred_id, kw = mixed_rows(rng, n, d, dtype, b, cells)
        gpu = S.SamplerState(*(t.cuda() for t in (st.mask, st.visited, st.ids, st.out, st.status)))
        S.sampler_step(prob, pred_id, st, table, mask_row, codes, **kw)
        args = (prob.cuda(), pred_id.cuda(), table.cuda(), mask_row.cuda(), gpu.mask, gpu.visited,
                gpu.ids, gpu.out, gpu.status, kw["count"].cuda(), kw["cell"].cuda(),
                kw["next_cell"].cuda(), 0, codes.cuda())
        a = SamplerStepArgs(*args)
        a.check()
        run(a, backend=backend)
        torch.cuda.synchronize()
        assert_same(st, gpu, f"per-row ({backend}, {cells} cells, D={d}, {dtype}, B={b})")


# ---------------------------------------------------------------------------------------------
# The CUDA source as the JIT path compiles it, built with nvcc where the toolkit is (no GPU needed).

def find_nvcc():
    for c in (os.environ.get("XLX_NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc",
              "/usr/local/bin/nvcc"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


@pytest.mark.skipif(find_nvcc() is None, reason="needs nvcc (the CUDA toolkit)")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_jit_source_compiles_without_spills(arch, tmp_path):
    """The source CuPy's NVRTC path compiles (the rules pasted into the kernel; the CMake build
    compiles csrc/sampler_cuda.cu from the same files) builds for sm_80 and sm_90 with every
    entry point, no spills, and the static shared memory of a 1,024-cell row (14 KiB) within the
    48 KiB a block gets without opting in."""
    src = tmp_path / "sampler_kernel.cu"
    src.write_text(B.kernel_source())
    r = subprocess.run([find_nvcc(), "-std=c++17", "-cubin", f"-arch=sm_{arch}", "-Xptxas", "-v",
                        str(src), "-o", str(tmp_path / "sampler_kernel.cubin")],
                       capture_output=True, text=True)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", log)
    assert sorted(entries) == sorted((name, arch) for name in B._KERNEL_NAMES.values())
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) == len(entries) and all(a == b == "0" for a, b in spills), log
    smem = [int(x) for x in re.findall(r"(\d+) bytes smem", log)]
    assert len(smem) == len(entries) and all(14 * 1024 <= x <= 48 * 1024 for x in smem), log


def test_argument_order_is_the_native_struct():
    """SamplerStepArgs.pointers() feeds the bindings positionally: its tensor order must be the
    pointer fields of struct SamplerStepArgs (csrc/sampler_step.h)."""
    header = (CSRC / "sampler_step.h").read_text()
    body = re.search(r"struct SamplerStepArgs \{(.*?)\};", header, re.S).group(1)
    pointers = re.findall(r"^\s*(?:const )?\w+\* (\w+);", body, re.M)
    table, mask_row = make_table(5, 3, torch.float32), make_mask_row(3, torch.float32)
    st = S.init_state(1, mask_row)
    a = SamplerStepArgs(torch.rand(1, CELLS), torch.zeros(1, CELLS, dtype=torch.int64), table,
                        mask_row, st.mask, st.visited, st.ids, st.out, st.status, None, None, None, 3)
    assert [name for name, _ in a.tensors()] == pointers
    assert a.pointers()[2] == table.data_ptr() and a.pointers()[-1] == 0
