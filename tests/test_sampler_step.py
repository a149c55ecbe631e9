"""The sampler step (xlx_fast.ops.sampler_step) against a plain statement of its rules.

The oracle below restates the rules in NumPy, independently of the kernels and of
xlx_fast.reference: stable argsort for Mask-Predict, first maximum over unvisited cells for
AR-confidence, fixed cells for TLBR/random. The C++ twin must match it id for id and row for row
(bitwise), in every table dtype, with odd row sizes, many ties, per-row counts and K > 64. GPU
tests compare the CUDA kernel with the C++ twin and replay it from a CUDA graph.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from xlx_fast.ops import sampler_step as S
from xlx_fast.ops.sampler_args import SamplerStepArgs
from xlx_fast.ops.sampler_backends import run

CELLS = 64
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# The oracle: the rules of one step, in plain NumPy.

def oracle_step(prob, pred_id, mask, visited, ids, table, mask_row, strategy,
                count=None, cell=None, next_cell=None):
    """Returns (mask, visited, ids, out) after one step; inputs are not modified."""
    prob, pred_id = prob.numpy(), pred_id.numpy()
    mask, visited, ids = mask.numpy().copy(), visited.numpy().copy(), ids.numpy().copy()
    b_rows = prob.shape[0]
    new_mask = np.zeros_like(mask)
    for b in range(b_rows):
        decided = np.zeros(CELLS, dtype=bool)
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


def random_probs(rng, b, ties):
    p = rng.random((b, CELLS), dtype=np.float32)
    if ties:  # few distinct values: most comparisons are ties
        p = np.floor(p * 4).astype(np.float32) / 4
    return torch.from_numpy(p)


def random_state(rng, b, n, d, dtype, *, poison=True):
    """A consistent mid-run state: every id valid, random mask/visited, poisoned output."""
    st = S.SamplerState(
        mask=torch.from_numpy(rng.random((b, CELLS)) < 0.5),
        visited=torch.from_numpy(rng.random((b, CELLS)) < 0.5),
        ids=torch.from_numpy(rng.integers(0, n, (b, CELLS))),
        out=torch.full((b, CELLS, d), float("nan") if poison else 0.0).to(dtype),
        status=torch.zeros(b, dtype=torch.int32),
    )
    return st


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


def strategy_args(rng, strategy, b):
    """Per-row count/cell/next_cell, different in every row, edge values included."""
    if strategy == "mask_predict":
        counts = [0, 64, 1, 63] + list(rng.integers(0, 65, max(0, b - 4)))
        return {"count": i32(counts[:b])}
    if strategy == "tlbr":
        return {"cell": i32([-1, 0, 63] + list(rng.integers(0, 64, max(0, b - 3))))[:b]}
    if strategy == "random":
        cells = [-1, 5, 63] + list(rng.integers(0, 64, max(0, b - 3)))
        nexts = [7, -1, 63] + list(rng.integers(-1, 64, max(0, b - 3)))
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


def run_and_compare(rng, strategy, n, d, dtype, b=6, ties=False):
    table, mask_row = make_table(n, d, dtype), make_mask_row(d, dtype)
    st = random_state(rng, b, n, d, dtype)
    prob = random_probs(rng, b, ties)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, CELLS)))
    kw = strategy_args(rng, strategy, b)
    ref = oracle_step(prob, pred_id, st.mask, st.visited, st.ids, table, mask_row, strategy,
                      **{k: v.numpy() for k, v in kw.items()})
    S.sampler_step(prob, pred_id, st, table, mask_row, strategy, **kw)
    assert_state_equal(st, ref, f"({strategy}, N={n}, D={d}, {dtype})")


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


# ---------------------------------------------------------------------------------------------
# torch.library: fake tensors, meta, torch.compile.

def small_case(b=3, n=11, d=4, dtype=torch.float32, device="cpu"):
    rng = np.random.default_rng(0)
    table, mask_row = make_table(n, d, dtype).to(device), make_mask_row(d, dtype).to(device)
    prob = random_probs(rng, b, False).to(device)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, CELLS))).to(device)
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

def bad_case(strategy="mask_predict", b=2, n=11, d=4):
    table, mask_row, prob, pred_id = small_case(b=b, n=n, d=d)
    st = S.init_state(b, mask_row)
    kw = {"count": i32([16] * b)} if strategy == "mask_predict" else {}
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


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA kernel vs the C++ twin, graph capture.

def twin_and_cuda(rng, strategy, n, d, dtype, b, backend=None, table_offset=0):
    """Run one step on CPU (twin) and CUDA from the same inputs; returns both states."""
    table_full = make_table(n + table_offset, d, dtype)
    table = table_full[table_offset:]  # an offset view: a misaligned base pointer
    mask_row = make_mask_row(d, dtype)
    st = random_state(rng, b, n, d, dtype)
    prob = random_probs(rng, b, ties=True)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, CELLS)))
    kw = strategy_args(rng, strategy, b)
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
    assert st.status.tolist() == [0, 1 + 7, S.STATUS_BAD_COUNT]
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
    rng = np.random.default_rng(7)
    b, n, d, dtype = 5, 10_000, 768, torch.bfloat16
    table, mask_row = make_table(n, d, dtype).cuda(), make_mask_row(d, dtype).cuda()
    sched = S.schedule(strategy, steps, seed=3).tensors(b, device="cuda")
    probs = torch.stack([random_probs(rng, b, ties=True) for _ in range(steps)]).cuda()
    pids = torch.from_numpy(rng.integers(0, n, (steps, b, CELLS))).cuda()

    def run(state):
        S.reset_state(state, mask_row)
        for i in range(steps):
            kw = {k: v[i] for k, v in sched.items()}
            S.sampler_step(probs[i], pids[i], state, table, mask_row, strategy, **kw)

    eager = S.init_state(b, mask_row)
    run(eager)
    cpu = S.init_state(b, mask_row.cpu())
    for i in range(steps):
        kw = {k: v[i].cpu() for k, v in sched.items()}
        S.sampler_step(probs[i].cpu(), pids[i].cpu(), cpu, table.cpu(), mask_row.cpu(), strategy, **kw)

    graphed = S.init_state(b, mask_row)
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


# ---------------------------------------------------------------------------------------------
# Per-row strategy codes: one call, each row under its own rule; INACTIVE rows untouched.

def mixed_rows(rng, n, d, dtype, b):
    """Inputs with a per-row strategy code (every strategy and INACTIVE present) and per-row
    count/cell/next_cell valid for whichever rule a row has."""
    codes = [0, 1, 2, 3, S.INACTIVE] + list(rng.integers(0, 5, max(0, b - 5)))
    codes = i32(codes[:b])
    st = random_state(rng, b, n, d, dtype)
    prob = random_probs(rng, b, ties=True)
    pred_id = torch.from_numpy(rng.integers(0, n, (b, CELLS)))
    kw = {"count": i32(rng.integers(0, 65, b)), "cell": i32(rng.integers(-1, 64, b)),
          "next_cell": i32(rng.integers(-1, 64, b))}
    return codes, st, prob, pred_id, kw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_row_strategies_equal_one_strategy_per_row(dtype):
    rng = np.random.default_rng(21)
    n, d, b = 50, 8, 13
    table, mask_row = make_table(n, d, dtype), make_mask_row(d, dtype)
    codes, st, prob, pred_id, kw = mixed_rows(rng, n, d, dtype, b)
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
@pytest.mark.parametrize("backend", ["compiled", "cupy"])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 3), (torch.bfloat16, 768), (torch.float16, 2048)])
def test_cuda_per_row_strategies_match_twin(backend, dtype, d):
    if backend == "cupy":
        pytest.importorskip("cupy")
    rng = np.random.default_rng(22)
    n = 10_000
    table, mask_row = make_table(n, d, dtype), make_mask_row(d, dtype)
    for b in (5, 37, 130):
        codes, st, prob, pred_id, kw = mixed_rows(rng, n, d, dtype, b)
        gpu = S.SamplerState(*(t.cuda() for t in (st.mask, st.visited, st.ids, st.out, st.status)))
        S.sampler_step(prob, pred_id, st, table, mask_row, codes, **kw)
        args = (prob.cuda(), pred_id.cuda(), table.cuda(), mask_row.cuda(), gpu.mask, gpu.visited,
                gpu.ids, gpu.out, gpu.status, kw["count"].cuda(), kw["cell"].cuda(),
                kw["next_cell"].cuda(), 0, codes.cuda())
        a = SamplerStepArgs(*args)
        a.check()
        run(a, backend=backend)
        torch.cuda.synchronize()
        assert_same(st, gpu, f"per-row ({backend}, D={d}, {dtype}, B={b})")


def test_argument_order_is_the_native_struct():
    """SamplerStepArgs.pointers() feeds the bindings positionally: its tensor order must be the
    pointer fields of struct SamplerStepArgs (csrc/sampler_step.h)."""
    import re
    from pathlib import Path

    header = (Path(__file__).resolve().parent.parent / "csrc" / "sampler_step.h").read_text()
    body = re.search(r"struct SamplerStepArgs \{(.*?)\};", header, re.S).group(1)
    pointers = re.findall(r"^\s*(?:const )?\w+\* (\w+);", body, re.M)
    table, mask_row = make_table(5, 3, torch.float32), make_mask_row(3, torch.float32)
    st = S.init_state(1, mask_row)
    a = SamplerStepArgs(torch.rand(1, CELLS), torch.zeros(1, CELLS, dtype=torch.int64), table,
                        mask_row, st.mask, st.visited, st.ids, st.out, st.status, None, None, None, 3)
    assert [name for name, _ in a.tensors()] == pointers
    assert a.pointers()[2] == table.data_ptr() and a.pointers()[-1] == 0
