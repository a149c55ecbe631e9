"""Serving pieces without Ray: the schema's 422s, the metrics text, per-request painting, the
scheduler's policies, deadlines and queue bound on the real engine, the load generator, and the
CLIs (bench-serve in-process with Ray, pydantic and aiohttp made unimportable)."""
import asyncio
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import xlx_fast
from xlx_fast import reference
from xlx_fast.engine import Engine, Request
from xlx_fast.bench.loadgen import check_target, make_trace, poisson_offsets, run_open_loop, summarize, Outcome
from xlx_fast.serving.metrics import ServerMetrics
from xlx_fast.serving.painter import paint
from xlx_fast.serving.scheduler import DeadlineExceeded, QueueFull, Scheduler
from xlx_fast.text import CaptionTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    """Tiny model with a sharpened head (ids robust to rounding, SPEC §4) painting 32x32."""
    from xlx_fast.serving.model_spec import ModelSpec

    model, _ = ModelSpec.from_dict({"size": "tiny", "seed": 3, "head_scale": 3.0}).build()
    return model


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer.fallback()


def requests_for(tok, items):
    out = []
    for prompt, seed, steps, strategy, temp in items:
        ids, mask = tok([prompt])
        out.append(Request(input_ids=ids[0], attention_mask=mask[0], seed=seed, steps=steps,
                           strategy=strategy, temperature=temp))
    return out


# -- schema -------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,field", [({"n": 9}, "n"), ({"temperature": float("nan")}, "temperature"),
                                        ({"prompt": "   "}, "prompt"), ({"extra": 1}, "extra"),
                                        ({"seed": 2**63}, "seed"), ({"steps": "four"}, "steps")])
def test_schema_422_names_the_field(body, field):
    from pydantic import ValidationError

    from xlx_fast.serving.schema import ImageRequest, validation_error

    with pytest.raises(ValidationError) as e:
        ImageRequest.model_validate_json(json.dumps({"prompt": "a cat", **body}).replace("NaN", "NaN"))
    err = validation_error(e.value.errors())
    assert err.status == 422 and err.param == field and err.message.startswith(field + ":")


def test_schema_server_limits():
    from xlx_fast.serving.schema import ImageRequest, RequestError, check_against_server

    ok = ImageRequest(prompt="x", strategy="confidence")
    assert check_against_server(ok, image_size=256, max_steps=100) == 64  # AR default: one per cell
    for req, field in ((ImageRequest(prompt="x", size="32x32"), "size"),
                       (ImageRequest(prompt="x", steps=101), "steps")):
        with pytest.raises(RequestError) as e:
            check_against_server(req, image_size=256, max_steps=100)
        assert e.value.status == 422 and e.value.param == field


# -- metrics ------------------------------------------------------------------------------------

def test_metrics_text_parses_with_the_values_recorded():
    from prometheus_client.parser import text_string_to_metric_families

    m = ServerMetrics()
    for v in (0.003, 0.2, 7.0, 100.0):
        m.e2e.observe(v)
    m.rejections.inc("queue_full")
    m.rejections.inc("queue_full")
    m.queue_depth.set(5)
    fams = {f.name: f for f in text_string_to_metric_families(m.render())}
    e2e = {(s.name, s.labels.get("le")): s.value for s in fams["xlx_e2e_seconds"].samples}
    assert e2e[("xlx_e2e_seconds_bucket", "0.005")] == 1
    assert e2e[("xlx_e2e_seconds_bucket", "0.25")] == 2
    assert e2e[("xlx_e2e_seconds_bucket", "10.0")] == 3
    assert e2e[("xlx_e2e_seconds_bucket", "+Inf")] == 4
    assert e2e[("xlx_e2e_seconds_count", None)] == 4
    assert e2e[("xlx_e2e_seconds_sum", None)] == pytest.approx(107.203)
    rej = {s.labels["reason"]: s.value for s in fams["xlx_rejections"].samples}
    assert rej["queue_full"] == 2 and rej["too_large"] == 0
    assert fams["xlx_queue_depth"].samples[0].value == 5


# -- painting -----------------------------------------------------------------------------------

def test_batched_painting_gives_each_row_its_own_seeds_noise(tiny):
    g = torch.Generator().manual_seed(0)
    codes = tiny.centroids[torch.randint(0, tiny.n_clusters, (3, 64), generator=g)]
    seeds = [5, 2**40 + 1, 5]
    batch = paint(tiny, codes, seeds)
    assert batch.dtype == torch.uint8 and batch.shape == (3, 32, 32, 3)
    for r, s in enumerate(seeds):
        alone = reference.paint(tiny, codes[r:r + 1], seed=s)[0]
        expect = (alone.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        assert torch.equal(batch[r], expect)  # a CPU paints row by row: exactly the image alone
    # the whole batch from one generator would mix rows' noise: the noise really is per row
    shared = (reference.paint(tiny, codes, seed=5)[1].clamp(0, 1) * 255).round().permute(1, 2, 0)
    assert (batch[1].float() - shared).abs().max() > 1


def test_a_cpu_paints_one_row_per_generator_call(tiny, monkeypatch):
    """Batched painting costs more per image than painting alone on a CPU (the activations leave
    the cache), so each row gets its own generator call there, whatever the batch."""
    from xlx_fast.serving.painter import rows_per_call

    assert rows_per_call(torch.device("cpu")) == 1 and rows_per_call(torch.device("cuda")) is None
    sizes = []
    forward = tiny.generator.forward
    monkeypatch.setattr(tiny.generator, "forward", lambda grid, g: sizes.append(len(grid)) or forward(grid, g))
    codes = tiny.centroids[torch.randint(0, tiny.n_clusters, (5, 64), generator=torch.Generator().manual_seed(1))]
    assert paint(tiny, codes, [0, 1, 2, 3, 4]).shape[0] == 5
    assert sizes == [1] * 5


# -- scheduler on the real engine -----------------------------------------------------------------

ITEMS = [("a red bus", 1, 5, "mask_predict", 0.0), ("two dogs", 2, 7, "confidence", 0.0),
         ("a kitchen", 3, 3, "random", 0.0), ("a giraffe", 4, 6, "tlbr", 0.0),
         ("snow", 5, 4, "mask_predict", 0.8), ("a train", 6, 9, "mask_predict", 0.0)]


def _serve(model, tok, policy, items, slots=2, max_queue=16, paint_images=False, staggered=True, **kw):
    async def go():
        sched = Scheduler(Engine(model, slots=slots), model, max_queue=max_queue, policy=policy,
                          batch_wait_ms=20, paint_images=paint_images, **kw)
        if staggered:
            sched.start()
        jobs = []
        for r in requests_for(tok, items):
            jobs.append(sched.submit([r]))
            if staggered:
                await asyncio.sleep(0.003)  # staggered arrivals: joins at different steps
        sched.start()  # (a no-op when started above)
        res = await asyncio.gather(*(sched.result(j) for j in jobs))
        await sched.stop()
        return [x[0].ids for x in res], sched
    return asyncio.run(go())


@pytest.mark.parametrize("policy", ["step", "request", "sequential"])
def test_every_policy_returns_the_requests_own_ids(tiny, tok, policy):
    fast = copy.deepcopy(tiny)
    ids, sched = _serve(fast, tok, policy, ITEMS)
    for got, (prompt, seed, steps, strategy, temp) in zip(ids, ITEMS):
        x, m = tok([prompt])
        alone = xlx_fast.generate(fast, x, m, steps=steps, strategy=strategy, seed=seed,
                                  temperature=temp).ids[0].tolist()
        assert got == alone, (policy, prompt)
    occ = sched.metrics.occupancy
    if policy == "sequential":
        assert occ.sum == occ.count * 0.5  # one row of two slots, always
    assert sched.metrics.requests.value("ok") == len(ITEMS)


def test_policies_by_name_or_object(tiny, tok):
    """The scheduler takes a policy object or a name from one table; an unknown name is refused
    naming the choices."""
    from xlx_fast.serving.policies import POLICIES, Sequential, StaticBatch, policy_named

    assert list(POLICIES) == ["step", "request", "sequential"]
    assert policy_named("request", batch_wait_ms=20).batch_wait_s == 0.02
    with pytest.raises(ValueError, match="policy must be one of step, request, sequential"):
        Scheduler(Engine(tiny, slots=2), tiny, policy="fifo")
    assert isinstance(Scheduler(Engine(tiny, slots=2), tiny, policy=StaticBatch(5)).policy, StaticBatch)
    fast = copy.deepcopy(tiny)
    ids, sched = _serve(fast, tok, Sequential(), ITEMS[:3])
    assert sched.metrics.occupancy.sum == sched.metrics.occupancy.count * 0.5
    x, m = tok([ITEMS[0][0]])
    assert ids[0] == xlx_fast.generate(fast, x, m, steps=5, seed=1).ids[0].tolist()


def test_step_policy_joins_between_steps(tiny, tok):
    # 6 requests (5, 7, 3, 6, 4, 9 steps) queued before the loop starts, on 2 slots: joining at
    # step boundaries finishes in 21 steps (a freed slot takes the next request at once); whole
    # batches of two take 7 + 6 + 9 = 22; and the slots are never exceeded
    _, step = _serve(copy.deepcopy(tiny), tok, "step", ITEMS, staggered=False)
    _, batch = _serve(copy.deepcopy(tiny), tok, "request", ITEMS, staggered=False)
    assert step.metrics.engine_steps.value() == 21 and batch.metrics.engine_steps.value() == 22
    assert step.metrics.occupancy.sum / step.metrics.occupancy.count <= 1.0


def test_queue_bound_deadline_and_cancel(tiny, tok):
    async def go():
        sched = Scheduler(Engine(tiny, slots=1), tiny, max_queue=2, paint_images=False)
        long = requests_for(tok, [("long", 1, 300, "mask_predict", 0.0)] * 5)
        a = sched.submit([long[0]])
        b = sched.submit([long[1]])  # queue holds a and b before the loop starts
        with pytest.raises(QueueFull) as e:
            sched.submit([long[2]])
        assert e.value.retry_after_s >= 1
        sched.start()
        await asyncio.sleep(0.05)      # a admitted, b waiting
        c = sched.submit([long[3]], timeout_s=0.05)
        with pytest.raises(DeadlineExceeded):
            await sched.result(c)      # expired in the queue
        a.future.cancel()              # the caller of a went away
        await asyncio.sleep(0.3)
        assert b.admitted_at is not None  # a's slot went to b at a step boundary
        steps_at_cancel = sched.steps_run
        b.future.cancel()
        d = sched.submit(requests_for(tok, [("short", 2, 2, "mask_predict", 0.0)]))
        res = await sched.result(d)
        assert len(res[0].ids) == 64
        await sched.stop()
        m = sched.metrics
        assert m.requests.value("cancelled") == 2 and m.requests.value("timeout") == 1
        assert m.rejections.value("queue_full") == 1
        assert sched.steps_run - steps_at_cancel < 300  # b did not run to its end
    asyncio.run(go())


def _gated_painter(monkeypatch, sched_module):
    """Real painting behind a gate the test opens: [calls] and the threading.Event to open it."""
    import threading

    gate, calls = threading.Event(), []

    def gated(model, codes, seeds):
        calls.append(len(seeds))
        assert gate.wait(30), "the test never opened the gate"
        return paint(model, codes, seeds)

    monkeypatch.setattr(sched_module, "paint", gated)
    return calls, gate


def test_painting_overlaps_the_next_steps(tiny, tok, monkeypatch):
    """A finished request is painted while the loop goes on stepping the others: with painting
    held, a long request still advances, and the short one's image arrives once released."""
    from xlx_fast.serving import scheduler as sched_module

    calls, gate = _gated_painter(monkeypatch, sched_module)

    async def go():
        sched = Scheduler(Engine(tiny, slots=2), tiny, paint_images=True)
        short, long = requests_for(tok, [("short", 1, 1, "mask_predict", 0.0),
                                          ("long", 2, 40, "mask_predict", 0.0)])
        a, b = sched.submit([short]), sched.submit([long])
        sched.start()
        while not calls:  # the short request reached the painter
            await asyncio.sleep(0.01)
        held_at = sched.steps_run
        while sched.steps_run < held_at + 5:  # inline painting would stop the steps here
            await asyncio.sleep(0.01)
        assert not a.future.done()
        gate.set()
        (row,) = await sched.result(a)
        assert row.image.shape == (32, 32, 3) and row.image.dtype == torch.uint8
        (row_b,) = await sched.result(b)
        await sched.stop()
        x, m = tok(["short"])
        alone = reference.paint(tiny, xlx_fast.generate(tiny, x, m, steps=1, seed=1).codes, seed=1)[0]
        expect = (alone.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        assert torch.equal(row.image, expect)  # its own seed's noise, painted alone
    asyncio.run(asyncio.wait_for(go(), 60))


def _steps_at_answer(model, tok, policy, items) -> list[int]:
    """The loop's step count when each job (all queued before the loop starts) was answered."""
    async def go():
        sched = Scheduler(Engine(model, slots=len(items)), model, policy=policy, batch_wait_ms=20,
                          paint_images=False)
        jobs = [sched.submit([r]) for r in requests_for(tok, items)]
        at = {}
        for i, j in enumerate(jobs):
            j.future.add_done_callback(lambda _, i=i: at.setdefault(i, sched.steps_run))
        sched.start()
        await asyncio.gather(*(sched.result(j) for j in jobs))
        await sched.stop()
        return [at[i] for i in range(len(jobs))]
    return asyncio.run(asyncio.wait_for(go(), 60))


def test_request_policy_answers_its_static_batch_together(tiny, tok):
    """The request-level baseline is a static batch: a 2-step row of a batch with a 12-step row
    is answered when the batch is done; the step scheduler answers it after its own 2 steps."""
    items = [("short", 1, 2, "mask_predict", 0.0), ("long", 2, 12, "mask_predict", 0.0)]
    assert _steps_at_answer(tiny, tok, "request", items) == [12, 12]
    assert _steps_at_answer(tiny, tok, "step", items) == [2, 12]


def test_a_cpu_painter_answers_job_by_job(tiny, tok, monkeypatch):
    """Two jobs finishing at the same step are painted one after the other on a CPU, and the
    first is answered before the second's painting starts."""
    from xlx_fast.serving import scheduler as sched_module

    calls, answered_before = [], []

    def spy(model, codes, seeds):
        calls.append(len(seeds))
        answered_before.append([j.future.done() for j in jobs])
        return paint(model, codes, seeds)

    monkeypatch.setattr(sched_module, "paint", spy)
    jobs = []

    async def go():
        sched = Scheduler(Engine(tiny, slots=2), tiny, paint_images=True)
        jobs.extend(sched.submit([r]) for r in requests_for(
            tok, [("first", 1, 3, "mask_predict", 0.0), ("second", 2, 3, "mask_predict", 0.0)]))
        sched.start()
        await asyncio.gather(*(sched.result(j) for j in jobs))
        await sched.stop()
    asyncio.run(asyncio.wait_for(go(), 60))
    assert calls == [1, 1] and answered_before == [[False, False], [True, False]]


def test_a_failed_painting_fails_its_jobs_not_the_replica(tiny, tok, monkeypatch):
    from xlx_fast.serving import scheduler as sched_module

    calls = []

    def flaky(model, codes, seeds):
        calls.append(len(seeds))
        if len(calls) == 1:
            raise RuntimeError("generator out of memory")
        return paint(model, codes, seeds)

    monkeypatch.setattr(sched_module, "paint", flaky)

    async def go():
        sched = Scheduler(Engine(tiny, slots=1), tiny, paint_images=True)
        sched.start()
        first = sched.submit(requests_for(tok, [("first", 1, 1, "mask_predict", 0.0)]))
        with pytest.raises(RuntimeError, match="painting failed.*out of memory"):
            await sched.result(first)
        second = sched.submit(requests_for(tok, [("second", 2, 1, "mask_predict", 0.0)]))
        (row,) = await sched.result(second)
        await sched.stop()
        assert row.image.shape == (32, 32, 3) and sched.broken is None
        assert sched.metrics.requests.value("error") == 1 and sched.metrics.requests.value("ok") == 1
    asyncio.run(asyncio.wait_for(go(), 60))


def test_painting_backlog_is_bounded(tiny, tok, monkeypatch):
    """With the painter held and a backlog of one batch, the loop stops after three finished
    steps (one painting, one waiting, one blocked handing over) instead of piling rows up."""
    from xlx_fast.serving import scheduler as sched_module

    calls, gate = _gated_painter(monkeypatch, sched_module)

    async def go():
        sched = Scheduler(Engine(tiny, slots=1), tiny, paint_images=True, max_paint_backlog=1)
        jobs = [sched.submit([r]) for r in requests_for(tok, [("one step", i, 1, "mask_predict", 0.0)
                                                             for i in range(6)])]
        sched.start()
        await asyncio.sleep(1.0)
        assert sched.steps_run == 3 and calls == [1]
        gate.set()
        results = await asyncio.gather(*(sched.result(j) for j in jobs))
        await sched.stop()
        assert len(results) == 6 and sched.steps_run == 6
        assert sum(calls) == 6
    asyncio.run(asyncio.wait_for(go(), 60))


# -- load generator -----------------------------------------------------------------------------

def test_poisson_offsets_and_trace():
    off = poisson_offsets(50.0, 4000, seed=1)
    gaps = [b - a for a, b in zip([0.0] + off, off)]
    assert all(g > 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.06)
    assert make_trace(10, seed=3) == make_trace(10, seed=3) != make_trace(10, seed=4)
    with pytest.raises(ValueError, match="rate"):
        poisson_offsets(0, 3)


def test_open_loop_is_bounded_by_count_and_time():
    async def send(body):
        await asyncio.sleep(0.01)
        return Outcome(200 if body["seed"] % 2 else 429, 0.0, 0.01)

    trace = [{"seed": i} for i in range(10)]
    run = asyncio.run(run_open_loop(send, trace, 1000.0, max_requests=7, max_seconds=10))
    assert len(run["outcomes"]) == 7
    run = asyncio.run(run_open_loop(send, trace, 20.0, max_requests=10_000, max_seconds=0.3))
    assert 1 <= len(run["outcomes"]) < 20
    s = summarize({"outcomes": [Outcome(200, 0, x / 100) for x in range(1, 101)]
                   + [Outcome(429, 0, 0.0)], "duration_s": 2.0}, 50.0, slo_s=0.5)
    assert s["ok"] == 100 and s["rejected"] == {"429": 1}
    assert s["e2e_p50_s"] == pytest.approx(0.5, abs=0.011) and s["e2e_max_s"] == 1.0
    assert s["goodput_rps"] == 25.0 and s["throughput_rps"] == 50.0


def test_load_generator_targets_loopback_only():
    assert check_target("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_target("http://localhost:1") == "http://localhost:1"
    with pytest.raises(ValueError, match="loopback"):
        check_target("http://10.1.2.3:8000")
    assert check_target("http://10.1.2.3:8000", allow_remote=True) == "http://10.1.2.3:8000"


# -- command lines ------------------------------------------------------------------------------

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ray", "pydantic", "aiohttp", "fastapi", "prometheus_client"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
from xlx_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(args, block=False, timeout=300):
    code = BLOCK if block else "import sys; from xlx_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_bench_serve_in_process_without_ray(tmp_path):
    r = _cli(["bench-serve", "--size", "tiny", "--slots", "2", "--requests", "6", "--max-seconds", "3",
              "--load", "1,3", "--out-dir", str(tmp_path), "--name", "b"], block=True)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "b.json").read_text())
    inproc = res["modes"]["inproc"]
    assert set(inproc) == {"sequential", "request", "step"}
    # the step scheduler's saturation, measured first at 2x the static estimate, is the basis
    probe, *step_rows = inproc["step"]
    assert probe["probe"] and probe["offered_rps"] == pytest.approx(2 * res["capacity_rps"])
    basis = res["load_basis"]["inproc"]
    assert basis["rps"] == probe["throughput_rps"] > 0 and "measured" in basis["what"]
    for rows in (step_rows, inproc["request"], inproc["sequential"]):
        assert [round(x["offered_rps"] / basis["rps"], 6) for x in rows] == [1.0, 3.0]
    for rows in inproc.values():
        assert all(x["sent"] <= 6 and x["ok"] + sum(x["rejected"].values()) == x["sent"] for x in rows)
        assert all(x["e2e_p50_s"] <= x["e2e_p99_s"] <= x["e2e_max_s"] for x in rows if x["ok"])
        # where the time went: steps run, their mean time, the share of the run spent stepping
        assert all(x["engine_steps"] >= 1 and 0 < x["stepping_share"] <= 1 for x in rows if x["ok"])
    # painting on the same device bounds the saturation against generate alone
    s, st = res["summary"]["inproc"], res["static_generate"]
    bound = s["painting_bound_vs_static_generate"]
    assert bound < 1 and bound == pytest.approx(st["generate_paint_images_per_s"] / st["generate_images_per_s"])
    assert s["step_saturation_vs_static_generate"] == pytest.approx(
        bound * s["step_saturation_vs_static_generate_paint"])
    assert "saturation probe" in r.stdout and "loads are fractions of" in r.stdout
    # one row per other route (captions, answers), on the step scheduler, same bounds
    tasks = res["tasks"]["inproc"]
    assert set(tasks) == {"captions", "answers"} and res["meta"]["model"]["captions"]
    for task, row in tasks.items():
        assert 1 <= row["sent"] <= 6 and row["ok"] + sum(row["rejected"].values()) == row["sent"]
        assert row["offered_rps"] == pytest.approx(0.7 * res["static_tasks"][task]["per_s"])
        assert f"step: {task}" in r.stdout
    assert "inproc step saturation probe at" in r.stderr  # progress, one line per load level
    assert (tmp_path / "b.png").stat().st_size > 1000


@pytest.mark.parametrize("arch,grid,tasks", [("xlxmert", 16, {"captions", "answers"}),
                                             ("xuniter", 8, {"answers"})])
def test_bench_serve_loads_the_served_grid_and_architecture(tmp_path, arch, grid, tasks):
    """The caption load is grids of the served model's cells (256 at 16x16; 64 were sent before,
    and refused), and an architecture without the caption engine loads the answers route only."""
    r = _cli(["bench-serve", "--size", "tiny", "--arch", arch, "--grid", str(grid), "--slots", "2",
              "--schedulers", "step", "--requests", "3", "--max-seconds", "2", "--load", "1",
              "--out-dir", str(tmp_path), "--name", "b", "--no-plot"], block=True)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["meta"]["model"]["arch"] == arch and res["meta"]["model"]["grid"] == grid
    rows = res["tasks"]["inproc"]
    assert set(rows) == tasks
    # every request answered or shed for time (429/504); a malformed one would be a 422
    assert all(row["ok"] >= 1 and set(row["rejected"]) <= {"429", "504"} for row in rows.values()), rows


def test_caption_trace_has_the_served_cells():
    from xlx_fast.bench.loadgen import make_task_trace

    trace = make_task_trace("captions", 3, cells=256, n_clusters=50)
    assert all(len(body["cluster_ids"]) == 256 and max(body["cluster_ids"]) < 50 for body in trace)
    answers = make_task_trace("answers", 3, cells=256, images=2)
    assert all(len(g) == 64 for body in answers for g in body["cluster_ids"])  # the 8x8 answer model


@pytest.mark.parametrize("args,msg", [
    (["serve", "--checkpoint", "x.pth"], "centroids"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--replicas", "0"], "--replicas"),
    (["bench-serve", "--schedulers", "fifo"], "--schedulers"),
    (["bench-serve", "--url", "http://8.8.8.8:80", "--rps", "1"], "--allow-remote"),
    (["bench-serve", "--load", "0.5,-1"], "--load"),
    (["bench-serve", "--arch", "xuniter", "--checkpoint", "x.pth"], "checkpoint loader"),
])
def test_cli_user_errors(args, msg, capsys):
    from xlx_fast.cli import main

    assert main(args) == 2  # refused before Ray or a model starts
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], lines


def test_a_bad_request_fails_alone(tiny, tok):
    """The engine refuses one request of an admission batch: only that job fails."""
    async def go():
        sched = Scheduler(Engine(tiny, slots=4), tiny, paint_images=False)
        good = requests_for(tok, [("good one", 1, 3, "mask_predict", 0.0), ("good two", 2, 2, "tlbr", 0.0)])
        bad = requests_for(tok, [("bad", 3, 3, "mask_predict", 0.0)])[0]
        bad.steps = 0
        jobs = [sched.submit([good[0]]), sched.submit([bad]), sched.submit([good[1]])]
        sched.start()
        res = await asyncio.gather(*(sched.result(j) for j in jobs), return_exceptions=True)
        await sched.stop()
        return res, sched
    res, sched = asyncio.run(go())
    assert isinstance(res[1], ValueError) and "steps" in str(res[1])
    assert len(res[0][0].ids) == 64 and len(res[2][0].ids) == 64
    assert sched.broken is None and sched.metrics.requests.value("error") == 1


def test_a_nan_request_fails_alone(tiny, tok):
    """NaN weights that one caption reaches: the engine returns that row with an error, its job
    fails naming the engine, the job sharing its step is answered with its own ids, and the
    replica serves on."""
    model = copy.deepcopy(tiny)
    poison = 777
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[poison] = float("nan")
    good = requests_for(tok, [("good", 1, 3, "mask_predict", 0.0), ("after", 2, 2, "tlbr", 0.0)])
    bad = Request(input_ids=torch.tensor([101, poison, 102]), seed=3, steps=3)

    async def go():
        sched = Scheduler(Engine(model, slots=2), model, paint_images=False)
        jobs = [sched.submit([bad]), sched.submit([good[0]])]
        sched.start()
        res = await asyncio.gather(*(sched.result(j) for j in jobs), return_exceptions=True)
        later = await sched.result(sched.submit([good[1]]))
        await sched.stop()
        return res, later, sched
    (failed, (row,)), (later,), sched = asyncio.run(asyncio.wait_for(go(), 60))
    assert isinstance(failed, RuntimeError) and "flagged request" in str(failed) and "NaN" in str(failed)
    x, m = tok(["good"])
    assert row.ids == xlx_fast.generate(model, x, m, steps=3, seed=1).ids[0].tolist()
    assert len(later.ids) == 64 and sched.broken is None
    assert sched.metrics.requests.value("error") == 1 and sched.metrics.requests.value("ok") == 2


def test_server_options_from_serve_run_strings():
    from xlx_fast.serving.service import ServerOptions

    opts = ServerOptions.from_dict({"slots": "16", "batch_wait_ms": "2.5", "policy": "request"})
    assert (opts.slots, opts.batch_wait_ms, opts.policy) == (16, 2.5, "request")
    with pytest.raises(ValueError, match="slots"):
        ServerOptions.from_dict({"slots": "many"})
    with pytest.raises(ValueError, match="slots"):
        ServerOptions.from_dict({"slots": 0})
    with pytest.raises(ValueError, match="unknown field"):
        ServerOptions.from_dict({"slot": 4})
    with pytest.raises(ValueError, match="dtype"):
        ServerOptions.from_dict({"model": {"dtype": "fp8"}})


def test_serve_cpu_replicas_get_the_cores_as_threads():
    """Ray hands a replica's CPU count to torch as its thread count: a CPU replica gets this
    machine's cores shared among the replicas (one CPU would halve a 2-core server), a GPU
    replica one CPU, and an explicit count is kept."""
    import argparse

    from xlx_fast.cli import serve as serve_cli

    def num_cpus(*argv):
        p = argparse.ArgumentParser()
        serve_cli.add_parser(p)
        return serve_cli.app_args(p.parse_args(list(argv)))["deployment"]["ray_actor_options"]["num_cpus"]

    cores = os.cpu_count()
    assert num_cpus() == cores
    assert num_cpus("--replicas", "2") == max(1, cores // 2)
    assert num_cpus("--replicas", str(4 * cores)) == 1
    assert num_cpus("--device", "cuda") == 1
    assert num_cpus("--cpus-per-replica", "0.5") == 0.5
    with pytest.raises(ValueError, match="--cpus-per-replica"):
        num_cpus("--cpus-per-replica", "-1")


def test_health_error_names_no_path():
    """/health answers without the key: a model that failed to load says why, by file name."""
    from xlx_fast.serving.service import ImageService, public_error

    svc = ImageService({"model": {"size": "tiny", "checkpoint": "/nonexistent/secret/E.pth",
                                  "centroids": "/nonexistent/secret/c.npy",
                                  "generator": "/nonexistent/secret/G.pth"}})
    assert svc.wait_built(60) and svc.load_error is not None
    reply = asyncio.run(svc.health())
    body = json.loads(reply.body)
    assert reply.status == 503 and body["status"] == "error", body
    assert "secret" not in body["error"] and "/" not in body["error"], body["error"]
    assert "E.pth" in body["error"] or "c.npy" in body["error"], body["error"]
    assert public_error(OSError("cannot read C:\\models\\G.pth or /a/b.npy; see http://x/y")) == \
        "OSError: cannot read G.pth or b.npy; see http://x/y"


def test_serve_loopback_hosts():
    from xlx_fast.cli.serve import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.5", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))
