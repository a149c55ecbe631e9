"""The step-level engine (xlx_fast.engine): per-request results against the reference, batch
invariance, cancellation, bucket padding, bad input, and the hashed seeds.

The reference runs on one model, the engine on a deep copy (the engine optimizes its model).
The head is sharpened as in tests/test_generation.py so that ids do not hang on float rounding
and exact equality is a fair demand (SPEC §4).
"""
import copy
import math

import pytest
import torch

import xlx_fast
from xlx_fast import reference
from xlx_fast.engine import MAX_STEPS, Engine, Finished, Request
from xlx_fast.models import XLxmertForImageGeneration
from xlx_fast.seeds import cell_seeds, mix, seed_key

from test_generation import sharpen

MAXLEN = 12


@pytest.fixture(scope="module")
def tiny():
    return sharpen(XLxmertForImageGeneration.from_default(seed=1, size="tiny"), 3.0).eval()


@pytest.fixture(scope="module")
def fast(tiny):
    return copy.deepcopy(tiny)


def caption(length, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(1000, 30000, (length,), generator=g)
    ids[0] = 101
    return ids


# A mix of every strategy, step counts, lengths, temperatures, seeds (a 64-bit one included).
MIX = [
    dict(length=5, seed=3, steps=4, strategy="mask_predict"),
    dict(length=12, seed=2**63 + 5, steps=9, strategy="random"),
    dict(length=7, seed=-4, steps=3, strategy="confidence"),
    dict(length=9, seed=7, steps=6, strategy="tlbr"),
    dict(length=3, seed=11, steps=1, strategy="mask_predict"),
    dict(length=10, seed=5, steps=5, strategy="mask_predict", temperature=0.7),
    dict(length=6, seed=8, steps=70, strategy="random"),
    dict(length=8, seed=9, steps=4, strategy="confidence", temperature=1.3),
]


def request(spec, tag=None):
    return Request(input_ids=caption(spec["length"], spec["seed"] % 1000), seed=spec["seed"],
                   steps=spec["steps"], strategy=spec["strategy"],
                   temperature=spec.get("temperature", 0.0), tag=tag)


def run_all(engine, joins):
    """joins: {step number: [Request]}; admits each list before that step; returns {tag: Finished}."""
    out, t = {}, 0
    while engine.active() or any(k >= t for k in joins):
        if t in joins:
            engine.admit(joins[t])
        for f in engine.step():
            out[f.request.tag] = f
        t += 1
        assert t < 500
    return out


def alone(model, spec):
    e = Engine(model, slots=1, max_length=MAXLEN)
    return run_all(e, {0: [request(spec, "x")]})["x"]


def assert_same_finished(a, b):
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.masks, b.masks)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def alone_results(fast):
    return [alone(fast, spec) for spec in MIX]


# -- against the reference --------------------------------------------------------------------

@pytest.mark.parametrize("i", [0, 1, 2, 3, 4, 6])
def test_greedy_request_equals_reference(tiny, alone_results, i):
    spec = MIX[i]
    req = request(spec)
    ref = reference.sample(tiny, req.input_ids[None], steps=spec["steps"], strategy=spec["strategy"],
                           seed=spec["seed"])
    f = alone_results[i]
    assert f.ids.shape == (64,) and f.ids.dtype == torch.int64 and f.ids.device.type == "cpu"
    assert f.masks.shape == (spec["steps"], 64) and f.masks.dtype == torch.bool
    assert f.probs.dtype == torch.float32 and f.codes.dtype == tiny.centroids.dtype
    assert not f.cancelled
    assert torch.equal(f.ids, ref.ids[0])
    assert torch.equal(f.masks, ref.masks[:, 0])
    assert torch.equal(f.codes, ref.codes[0])
    torch.testing.assert_close(f.probs, ref.probs[0], rtol=1e-3, atol=1e-6)


def test_sampling_request_is_seeded_and_differs_from_greedy(fast, alone_results):
    spec = MIX[5]
    again = alone(fast, spec)
    assert torch.equal(again.ids, alone_results[5].ids)
    other = alone(fast, dict(spec, seed=spec["seed"] + 1))
    greedy = alone(fast, dict(spec, temperature=0.0))
    assert not torch.equal(other.ids, alone_results[5].ids)
    assert not torch.equal(greedy.ids, alone_results[5].ids)
    assert ((other.ids >= 0) & (other.ids < fast.n_clusters)).all()


# -- batch invariance ---------------------------------------------------------------------------

@pytest.mark.parametrize("slots,joins", [
    (8, {0: list(range(8))}),                                    # one full batch
    (4, {0: [0, 1, 2], 1: [3], 2: [4], 5: [5], 6: [6], 9: [7]}),  # join at other steps
    (3, {0: [6, 1], 2: [0], 3: [2], 4: [3], 7: [4, 5], 12: [7]}),  # other slots and neighbours
])
def test_batch_invariance(fast, alone_results, slots, joins):
    e = Engine(fast, slots=slots, max_length=MAXLEN)
    e.warmup()
    pending = {t: [request(MIX[i], i) for i in idx] for t, idx in joins.items()}
    out, t = {}, 0
    while e.active() or any(k >= t for k in pending):
        if t in pending:
            # admit what fits; the rest waits for the next step
            fits = pending.pop(t)
            now, later = fits[:e.free_slots()], fits[e.free_slots():]
            e.admit(now)
            if later:
                pending.setdefault(t + 1, [])[:0] = later
        for f in e.step():
            out[f.request.tag] = f
        t += 1
        assert t < 600
    assert sorted(out) == list(range(len(MIX)))
    for i, f in out.items():
        assert_same_finished(f, alone_results[i])


def test_bucket_padding_never_changes_an_active_row(fast, alone_results):
    # 3 rows run at bucket 4 (one idle row) in one engine, bucket 8 (five idle rows) in another
    for buckets in ([1, 2, 4, 8], [8]):
        e = Engine(fast, slots=8, max_length=MAXLEN, buckets=buckets)
        e.admit([request(MIX[i], i) for i in (0, 2, 3)])
        # poison the idle slots: an idle row must be neither read into nor written by a step
        e.state.ids[3:8] = 12345
        e.state.out[3:8] = float("nan")
        e.state.status[3:8] = 7
        out = run_all(e, {})
        assert (e.state.ids[3:8] == 12345).all() and (e.state.status[3:8] == 7).all()
        assert torch.isnan(e.state.out[3:8]).all()
        for i in (0, 2, 3):
            assert_same_finished(out[i], alone_results[i])


def test_cpu_steps_run_exactly_the_occupied_rows(fast, alone_results, monkeypatch):
    """Without graphs every size is a bucket: 3, then 2, then 1 occupied rows are stepped as 3,
    2 and 1 rows (a padded row costs a CPU as much as a real one), with the same results."""
    e = Engine(fast, slots=8, max_length=MAXLEN)
    assert e.buckets == list(range(1, 9))
    sizes = []
    core = e._core
    monkeypatch.setattr(e, "_core", lambda b, sample: (sizes.append(b), core(b, sample)))
    specs = [dict(MIX[0], steps=2), dict(MIX[2], steps=4), dict(MIX[3], steps=6)]
    e.admit([request(spec, i) for i, spec in enumerate(specs)])
    out = run_all(e, {})
    assert sizes == [3, 3, 2, 2, 1, 1]
    assert Engine(fast, slots=8, max_length=MAXLEN, cuda_graph=False).buckets == list(range(1, 9))
    for i, spec in enumerate(specs):
        assert torch.equal(out[i].ids, alone(fast, spec).ids)


def test_compaction_moves_rows_into_a_smaller_bucket(fast, alone_results):
    e = Engine(fast, slots=8, max_length=MAXLEN)
    # slots 0..6 hold 1-step requests, slot 7 a long one: after step 1 only slot 7 is left
    quick = dict(length=4, seed=1, steps=1, strategy="mask_predict")
    e.admit([request(quick, f"q{i}") for i in range(7)] + [request(MIX[6], 6)])
    first = e.step()
    assert len(first) == 7 and e.active() == 1
    out = run_all(e, {})
    assert e._rows[0] is None  # the slot was compacted to 0 and then freed
    assert_same_finished(out[6], alone_results[6])


# -- cancellation, slot reuse, errors ---------------------------------------------------------

def test_cancel_frees_the_slot_and_the_slot_is_reused(fast, alone_results):
    e = Engine(fast, slots=2, max_length=MAXLEN)
    h = e.admit([request(MIX[6], "long"), request(MIX[3], 3)])
    e.step()
    e.step()
    e.cancel(h[0])
    assert e.free_slots() == 0  # freed at the next boundary, not now
    got = e.step()
    cancelled = [f for f in got if f.request.tag == "long"]
    assert len(cancelled) == 1 and cancelled[0].cancelled
    assert cancelled[0].masks.shape == (2, 64)  # the two steps it ran
    assert torch.equal(cancelled[0].masks, alone_results[6].masks[:2])
    assert e.free_slots() == 1
    e.admit([request(MIX[0], 0)])
    out = run_all(e, {})
    assert_same_finished(out[0], alone_results[0])
    assert_same_finished(out[3], alone_results[3])
    e.cancel(h[1])  # already finished: ignored
    with pytest.raises(ValueError, match="handle"):
        e.cancel(10_000)
    assert e.step() == [] and e.active() == 0


def test_bad_request_admits_nothing_and_leaves_other_rows_alone(fast, alone_results):
    e = Engine(fast, slots=4, max_length=MAXLEN)
    e.admit([request(MIX[3], 3)])
    e.step()
    bad = request(MIX[0], 0)
    bad.temperature = float("nan")
    with pytest.raises(ValueError, match=r"requests\[1\]\.temperature"):
        e.admit([request(MIX[2], 2), bad])
    assert e.active() == 1
    with pytest.raises(ValueError, match="free slot"):
        e.admit([request(MIX[i], i) for i in (0, 1, 2, 4)])
    assert e.active() == 1
    out = run_all(e, {})
    assert list(out) == [3]
    assert_same_finished(out[3], alone_results[3])


def _bad(field, value):
    def make():
        r = request(MIX[0])
        setattr(r, field, value(r) if callable(value) else value)
        return r
    return make


@pytest.mark.parametrize("make,exc,match", [
    (_bad("input_ids", lambda r: r.input_ids.float()), TypeError, r"requests\[0\]\.input_ids"),
    (_bad("input_ids", lambda r: r.input_ids[None]), ValueError, r"requests\[0\]\.input_ids"),
    (_bad("input_ids", torch.zeros(0, dtype=torch.int64)), ValueError, r"requests\[0\]\.input_ids"),
    (_bad("input_ids", torch.full((MAXLEN + 1,), 101)), ValueError, "max_length"),
    (_bad("input_ids", torch.tensor([101, 40000])), ValueError, r"requests\[0\]\.input_ids"),
    (_bad("input_ids", [101, 102]), TypeError, r"requests\[0\]\.input_ids"),
    (_bad("attention_mask", torch.ones(3, dtype=torch.bool)), ValueError, "attention_mask"),
    (_bad("attention_mask", lambda r: torch.ones(r.input_ids.shape, dtype=torch.float32)),
     TypeError, "attention_mask"),
    (_bad("attention_mask", lambda r: torch.full(r.input_ids.shape, 7)), ValueError, "attention_mask"),
    (_bad("steps", 0), ValueError, r"requests\[0\]\.steps"),
    (_bad("steps", -3), ValueError, r"requests\[0\]\.steps"),
    (_bad("steps", MAX_STEPS + 1), ValueError, r"requests\[0\]\.steps"),
    (_bad("steps", 2.0), TypeError, r"requests\[0\]\.steps"),
    (_bad("strategy", "beam"), ValueError, r"requests\[0\]\.strategy"),
    (_bad("strategy", None), ValueError, r"requests\[0\]\.strategy"),
    (_bad("temperature", -0.5), ValueError, r"requests\[0\]\.temperature"),
    (_bad("temperature", float("nan")), ValueError, r"requests\[0\]\.temperature"),
    (_bad("temperature", float("inf")), ValueError, r"requests\[0\]\.temperature"),
    (_bad("temperature", 1e308), ValueError, r"requests\[0\]\.temperature.*float32"),  # inf there
    # 1/τ overflows float32 below MIN_TEMPERATURE: the row's probabilities would be NaN
    (_bad("temperature", 1e-40), ValueError, r"requests\[0\]\.temperature must be 0 \(greedy\) or at least"),
    (_bad("temperature", 10**400), ValueError, r"requests\[0\]\.temperature"),  # past a double
    (_bad("temperature", "hot"), TypeError, r"requests\[0\]\.temperature"),
    (_bad("seed", 1.5), TypeError, r"requests\[0\]\.seed"),
    (_bad("seed", True), TypeError, r"requests\[0\]\.seed"),
    (lambda: "a caption", TypeError, r"requests\[0\]"),
])
def test_bad_request_fields(fast, make, exc, match):
    e = Engine(fast, slots=2, max_length=MAXLEN)
    with pytest.raises(exc, match=match):
        e.admit([make()])
    assert e.active() == 0


def test_tlbr_steps_over_64_rejected(fast):
    e = Engine(fast, slots=1, max_length=MAXLEN)
    with pytest.raises(ValueError, match=r"requests\[0\]\.steps"):
        e.admit([request(dict(MIX[3], steps=65))])


POISON = 777  # a token id no MIX caption holds (theirs are >= 1000)


@pytest.fixture(scope="module")
def poisoned(tiny):
    """NaN weights that one caption reaches and the others do not: its word embedding row."""
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[POISON] = float("nan")
    return model


def test_a_nan_row_fails_alone_and_its_slot_is_freed(poisoned):
    """On a CPU the sampler refuses a whole step for one row with NaN probabilities: that row
    comes back at once with an error naming it and its slot is freed, the step still advances
    the other rows exactly as alone, and later steps and joiners work."""
    e = Engine(poisoned, slots=2, max_length=MAXLEN)
    bad = Request(input_ids=torch.tensor([101, POISON, 2000, 102]), steps=5, tag="bad")
    handles = e.admit([bad, request(MIX[5], "sampled")])  # a sampling neighbour: seeds per step
    (f,) = e.step()
    assert f.request.tag == "bad" and f.error is not None
    assert f"request {handles[0]}" in f.error and "NaN" in f.error
    assert e.active() == 1 and e.free_slots() == 1
    e.admit([request(MIX[2], "joiner")])
    out = run_all(e, {})
    assert sorted(out) == ["joiner", "sampled"] and e.active() == 0
    for tag, spec in (("sampled", MIX[5]), ("joiner", MIX[2])):
        assert out[tag].error is None
        assert_same_finished(out[tag], alone(poisoned, spec))


def test_generate_raises_for_a_flagged_row(poisoned):
    ids = torch.stack([torch.tensor([101, 2000, 2001, 102]), torch.tensor([101, 2000, POISON, 102])])
    with pytest.raises(ValueError, match=r"row 1: sampler step flagged request \d+: NaN"):
        xlx_fast.generate(poisoned, ids, steps=3)
    # the cached engine was left empty: the good row alone still generates
    assert xlx_fast.generate(poisoned, ids[:1], steps=3).ids.shape == (1, 64)


@pytest.mark.parametrize("kwargs,match", [
    (dict(slots=0), "slots"), (dict(slots=2.5), "slots"), (dict(max_length=0), "max_length"),
    (dict(max_length=10_000), "max_length"), (dict(buckets=[1, 2]), "buckets"),
    (dict(cuda_graph=True), "cuda_graph"),
])
def test_bad_engine_arguments(fast, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(fast, **{"slots": 4, **kwargs})


def test_shorter_caption_padding_equals_alone(tiny, fast):
    # the same caption at engine widths 5 (no padding) and 12 (7 padded keys)
    spec = dict(length=5, seed=21, steps=4, strategy="mask_predict")
    a = run_all(Engine(fast, slots=1, max_length=5), {0: [request(spec, "x")]})["x"]
    b = alone(fast, spec)
    assert_same_finished(a, b)


def test_explicit_attention_mask_equals_default(fast):
    spec = dict(length=8, seed=4, steps=4, strategy="confidence")
    r = request(spec, "x")
    r.attention_mask = r.input_ids != 0
    a = run_all(Engine(fast, slots=1, max_length=MAXLEN), {0: [r]})["x"]
    assert_same_finished(a, alone(fast, spec))


# -- generate on the engine: per-row parameters vs the reference per row ----------------------

def test_generate_per_row_parameters_equal_reference_per_row(tiny, fast):
    ids = torch.stack([torch.nn.functional.pad(caption(n, n), (0, MAXLEN - n)) for n in (5, 9, 12, 7)])
    steps, strategies, seeds = [4, 7, 64, 9], ["mask_predict", "random", "tlbr", "random"], [1, 2**70, 3, -8]
    got = xlx_fast.generate(fast, ids, steps=steps, strategy=strategies, seed=seeds)
    assert got.masks.shape == (64, 4, 64)
    for r in range(4):
        ref = reference.sample(tiny, ids[r:r + 1], steps=steps[r], strategy=strategies[r], seed=seeds[r])
        assert torch.equal(got.ids[r], ref.ids[0])
        assert torch.equal(got.masks[:steps[r], r], ref.masks[:, 0])
        assert not got.masks[steps[r]:, r].any()
        assert torch.equal(got.codes[r], ref.codes[0])


def test_generate_uniform_batch_with_per_row_seeds_equals_reference(tiny, fast):
    ids = torch.stack([torch.nn.functional.pad(caption(n, n), (0, MAXLEN - n)) for n in (4, 12, 6)])
    seeds = [5, 6, 2**64 + 1]
    ref = reference.sample(tiny, ids, steps=10, strategy="random", seed=seeds)
    got = xlx_fast.generate(fast, ids, steps=10, strategy="random", seed=torch.tensor([5, 6, 0]))
    assert torch.equal(got.ids[:2], ref.ids[:2])
    got = xlx_fast.generate(fast, ids, steps=10, strategy="random", seed=seeds)
    assert torch.equal(got.ids, ref.ids) and torch.equal(got.masks, ref.masks)


def test_generate_rows_do_not_depend_on_neighbours(fast):
    ids = torch.stack([torch.nn.functional.pad(caption(n, n), (0, MAXLEN - n)) for n in (4, 12, 6)])
    both = xlx_fast.generate(fast, ids, steps=5, temperature=[0.0, 0.9, 0.9], seed=[1, 2, 2])
    one = xlx_fast.generate(fast, ids[1:2], steps=5, temperature=0.9, seed=2)
    assert torch.equal(both.ids[1], one.ids[0])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(steps=[4, 4]), ValueError, "steps"),
    (dict(steps=torch.tensor([4.0, 4.0, 4.0])), TypeError, "steps"),
    (dict(seed=[1, 2]), ValueError, "seed"),
    (dict(seed=[1, 2, 2.5]), TypeError, "seed"),
    (dict(strategy=["mask_predict", "beam", "tlbr"]), ValueError, "strategy"),
    (dict(temperature=[0.0, -1.0, 0.0]), ValueError, "temperature"),
    (dict(temperature=[0.0, float("nan"), 0.0]), ValueError, "temperature"),
    (dict(temperature=torch.zeros(2, 3)), ValueError, "temperature"),
    (dict(steps=[4, 0, 4]), ValueError, "steps"),
    (dict(steps=MAX_STEPS + 1), ValueError, "steps"),
])
def test_generate_bad_per_row_arguments(fast, kwargs, exc, match):
    ids = torch.stack([caption(6, n) for n in range(3)])
    with pytest.raises(exc, match=match):
        xlx_fast.generate(fast, ids, **kwargs)


def test_generate_engine_cache_is_bounded_and_seed_free(fast):
    ids = torch.stack([caption(6, n) for n in range(2)])
    fast.__dict__.pop("_xlx_engines", None)
    for seed in range(6):
        xlx_fast.generate(fast, ids, steps=2, temperature=1.0, seed=seed)
    assert len(fast._xlx_engines) == 1  # seeds and temperatures are data, not keys
    for b in range(1, 8):
        xlx_fast.generate(fast, ids[:1].expand(b, -1), steps=1)
    assert len(fast._xlx_engines) == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_engine_runs_every_strategy(tiny, dtype):
    model = copy.deepcopy(tiny).to(dtype)
    ref_model = copy.deepcopy(model)
    e = Engine(model, slots=4, max_length=MAXLEN)
    specs = [MIX[0], MIX[2], MIX[3], MIX[1], MIX[5]]
    out = run_all(e, {0: [request(s, i) for i, s in enumerate(specs[:4])], 3: [request(specs[4], 4)]})
    agree = []
    for i, s in enumerate(specs):
        f = out[i]
        assert f.codes.dtype == dtype
        assert ((f.ids >= 0) & (f.ids < model.n_clusters)).all() or s["strategy"] != "mask_predict"
        if s.get("temperature", 0.0) == 0.0:
            ref = reference.sample(ref_model, request(s).input_ids[None], steps=s["steps"],
                                   strategy=s["strategy"], seed=s["seed"])
            agree.append((ref.ids[0] == f.ids).float().mean().item())
    assert min(agree) >= 0.9, agree


# -- seeds: hashed, never multiplied ----------------------------------------------------------

def test_splitmix64_matches_its_published_first_output():
    # SplitMix64 from state 0: first output 0xE220A8397B1DCDAF (Steele, Lea, Flood 2014)
    assert mix(0) == 0xE220A8397B1DCDAF


def test_seed_keys_take_any_int_and_differ():
    seeds = [0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), 2**200 + 3]
    keys = [seed_key(s) for s in seeds]
    assert len(set(keys)) == len(seeds)
    assert all(0 <= k < 2**64 for k in keys)
    a = cell_seeds(seed_key(2**64), 3)
    assert a.dtype.name == "int64" and a.shape == (64,) and len(set(a.tolist())) == 64
    assert (cell_seeds(seed_key(2**64), 3) == a).all()
    assert not (cell_seeds(seed_key(2**64), 4) == a).any()
    with pytest.raises(TypeError, match="seed"):
        seed_key(1.0)


def test_finished_fields(alone_results):
    f = alone_results[0]
    assert isinstance(f, Finished)
    assert f.request.seed == MIX[0]["seed"]
    assert not math.isnan(float(f.probs.sum()))


# -- the benchmark cases run at the tiny size (machinery only; timings are not asserted) -----

def test_engine_bench_cases_at_tiny_size():
    from xlx_fast.bench import cases as bench_cases, harness

    spec = harness.Spec(device=torch.device("cpu"), dtypes=(torch.float32,), quick=True, size="tiny")
    ceilings = {"matmul_tflops": {"fp32": 1.0}, "copy_gbps": 10.0, "matmul_n": 8, "copy_bytes": 8,
                "fp32_matmul_precision": "highest"}
    machine = {"device_name": "test-cpu", "torch": torch.__version__, "triton": "x"}
    try:
        uniform, mixed = bench_cases.cases("engine", spec)
        rows = harness.run_case(uniform, ceilings, machine, harness.SMOKE)
        assert {r["backend"] for r in rows} == {"engine", "static loop"}
        assert all(r["id_agreement"] == 1.0 for r in rows)
        (row,) = harness.run_case(mixed, ceilings, machine, harness.SMOKE)
        extra = row["agreement_extra"]
        assert row["id_agreement"] >= 0.95
        for who in ("static", "engine"):
            assert 0 < extra[f"{who} p50 s"] <= extra[f"{who} p90 s"] <= extra[f"{who} p99 s"]
    finally:
        bench_cases.release("engine")


# -- CUDA: graph-captured steps vs eager steps vs the reference; capture only at warm-up -------

def _drive(engine, specs, joins, device):
    pending = {t: [request(specs[i], i) for i in idx] for t, idx in joins.items()}
    for reqs in pending.values():
        for r in reqs:
            r.input_ids = r.input_ids.to(device)
    return run_all(engine, pending)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_engine_graph_equals_eager_and_reference(dtype):
    base = sharpen(XLxmertForImageGeneration.from_default(seed=0, with_generator=False), 1.5)
    model = base.to("cuda", dtype).eval()
    ref_model = copy.deepcopy(model)
    specs = [MIX[0], MIX[1], MIX[2], MIX[3], MIX[5], MIX[7]]
    joins = {0: [0, 1, 2], 2: [3], 4: [4, 5]}  # 4 slots: two free after step 3 (3 and 4 steps)
    graphed = Engine(copy.deepcopy(model), slots=4, max_length=MAXLEN)
    graphed.warmup()
    captured = graphed.captures
    out_g = _drive(graphed, specs, joins, "cuda")
    assert graphed.captures == captured  # nothing captured during traffic
    eager = Engine(copy.deepcopy(model), slots=4, max_length=MAXLEN, cuda_graph=False)
    out_e = _drive(eager, specs, joins, "cuda")
    agree = []
    for i, spec in enumerate(specs):
        # the same ids and masks; the probabilities to rounding: the eager engine runs a joiners'
        # language pass at the joiners' count, the graphed one at their bucket's, and cuBLAS picks
        # another fp32 GEMM kernel for another row count (seen on an H200: last bits differ)
        assert torch.equal(out_g[i].ids, out_e[i].ids) and torch.equal(out_g[i].masks, out_e[i].masks)
        torch.testing.assert_close(out_g[i].probs, out_e[i].probs, rtol=1e-4, atol=1e-6)
        if spec.get("temperature", 0.0) == 0.0:
            ref = reference.sample(ref_model, request(spec).input_ids[None].cuda(), steps=spec["steps"],
                                   strategy=spec["strategy"], seed=spec["seed"])
            agree.append((ref.ids[0].cpu() == out_g[i].ids).float().mean().item())
    assert min(agree) == 1.0 if dtype == torch.float32 else min(agree) >= 0.9, agree


@pytest.mark.gpu
def test_cuda_every_bucket_captured_at_warmup_and_none_in_traffic():
    model = copy.deepcopy(sharpen(XLxmertForImageGeneration.from_default(seed=1, size="tiny"), 3.0)).cuda().eval()
    e = Engine(model, slots=8, max_length=MAXLEN)
    assert e.buckets == [1, 2, 4, 8]
    e.warmup()
    assert e.captures == 3 * len(e.buckets)  # greedy step, sampling step, joiners' language pass
    assert set(e._graphs) == {(b, s) for b in e.buckets for s in (False, True)}
    assert set(e._lang_graphs) == set(e.buckets)
    alone_eager = {}
    for i, spec in enumerate(MIX):
        one = Engine(model, slots=1, max_length=MAXLEN, cuda_graph=False)
        alone_eager[i] = _drive(one, MIX, {0: [i]}, "cuda")[i]
    # mixed traffic: joins of 1..5 rows, a cancellation, sampling and greedy rows, compaction
    h = e.admit([request(MIX[6], "cancel-me")])
    pending = {0: [0, 1, 2, 3, 4], 1: [5], 4: [7]}
    out, t = {}, 0
    while e.active() or any(k >= t for k in pending):
        if t in pending:
            e.admit([request(MIX[i], i) for i in pending[t]])
        if t == 3:
            e.cancel(h[0])
        for f in e.step():
            out[f.request.tag] = f
        t += 1
        assert t < 100
    assert out["cancel-me"].cancelled
    assert e.captures == 3 * len(e.buckets)
    for i in (0, 1, 2, 3, 4, 5, 7):
        assert torch.equal(out[i].ids, alone_eager[i].ids), i  # bucket padding changes nothing
        assert torch.equal(out[i].masks, alone_eager[i].masks), i


@pytest.mark.gpu
def test_cuda_step_without_finishing_rows_never_syncs():
    model = copy.deepcopy(sharpen(XLxmertForImageGeneration.from_default(seed=1, size="tiny"), 3.0)).cuda().eval()
    e = Engine(model, slots=4, max_length=MAXLEN)
    e.warmup()
    specs = [dict(MIX[0], steps=6), dict(MIX[3], steps=6), dict(MIX[5], steps=6)]
    e.admit([request(s, i) for i, s in enumerate(specs)])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):  # no row finishes before step 6
            assert e.step() == []
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(e.step()) == 3
