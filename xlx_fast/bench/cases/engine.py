"""The step-level engine against static batches (``xlx-fast bench --ops engine``).

Two workloads on the embedded default model (random weights, fp32/bf16/fp16 as asked):

- ``uniform``: B identical-shape requests (Mask-Predict-4), B = 8 on the CPU, 64 on CUDA.
  Baseline: one static ``xlx_fast.generate`` call on the batch. Fast: the same requests through
  ``Engine.admit``/``step`` (default buckets). Target: engine >= 0.95x the baseline (the
  request API and per-row data must be nearly free). ``generate`` itself runs on an engine with
  a single bucket, so this measures the request path's overhead over the batch path. A peer
  row, ``static loop``, is the pre-engine loop (one strategy and one schedule for the batch,
  a scalar-strategy sampler call, eager): what the per-row machinery costs against it.
- ``mixed``: 4x more requests than slots, steps drawn from 1..10, strategies cycling through all
  four, all submitted at t = 0 (CPU: 4 slots, 16 requests; CUDA: 64 slots, 256 requests). Baseline: static batches of ``slots`` requests in arrival order,
  each a ``generate`` call that runs until its slowest row is done. Fast: one engine with
  continuous refill (a finished row's slot is refilled before the next step). Target:
  >= 1.3x images/s (the speed-up column, same images on both sides). Per-request latency
  percentiles (submission at t = 0 to result; from the checked run) are in the row's extras.

Agreement: share of ids equal to the baseline's (the same requests; with random weights a
near-tie may flip between batch compositions, SPEC §4: the bound is a share).
"""
from __future__ import annotations

import random
import time

import torch

from ...strategies import NAMES
from ..harness import FAST, PEER, Agreement, Case, Prepared, Spec, id_share, NotAvailable
from .generation import captions, model

MIN_SHARE = {torch.float32: 0.95, torch.bfloat16: 0.6, torch.float16: 0.6}
TARGET = {"uniform": 0.95, "mixed": 1.3}


def release() -> None:
    from . import generation

    generation.release()


def _sizes(spec: Spec, workload: str) -> tuple[int, int]:
    """(slots, requests). The CPU's mixed workload runs 4 slots (16 requests): at 8 slots one
    static baseline run of the base model takes minutes on 2 cores."""
    if spec.size == "tiny":
        return 2, 8
    if spec.device.type == "cuda":
        return 64, 256
    return (8, 8) if workload == "uniform" else (4, 16)


def _mixed_requests(n: int):
    rng = random.Random(1234)
    return [dict(steps=rng.randint(1, 10), strategy=NAMES[i % len(NAMES)], seed=i) for i in range(n)]


def _static_loop(fast_model, ids, mask, steps, strategy):
    """The pre-engine loop: one schedule and one strategy for the whole batch."""
    from xlx_fast.step_plan import extended_mask, language, prepare, vision
    from xlx_fast.ops.codebook_head import codebook_head
    from xlx_fast.ops.sampler_step import init_state, sampler_step
    from xlx_fast.strategies import schedule

    t = prepare(fast_model)
    b = ids.shape[0]
    ext = extended_mask(fast_model, mask)
    lang = language(fast_model, ids, ext)
    state = init_state(b, t.mask_row)
    sched = schedule(strategy, steps, 0).tensors(b, ids.device)
    for i in range(steps):
        visual = vision(fast_model, lang, ext, state.out + t.box)
        prob, pred = codebook_head(fast_model.obj_predict_head.transform(visual), t.head_weight,
                                   t.head_bias, check_nan=False)
        sampler_step(prob, pred, state, t.table, t.mask_row, strategy,
                     **{k: v[i] for k, v in sched.items()})
    return state.ids


def _percentiles(latencies):
    s = sorted(latencies)

    def p(q):
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]

    return {"p50 s": p(0.5), "p90 s": p(0.9), "p99 s": p(0.99)}


def _raise_flagged(finished) -> None:
    """A row the sampler flagged has no picture: the case fails rather than time its ids."""
    if finished.error is not None:
        raise RuntimeError(f"engine row {finished.request.tag}: {finished.error}")


def uniform_case(spec: Spec, dtype: torch.dtype) -> Case:
    device = spec.device
    slots, _ = _sizes(spec, "uniform")

    def build() -> Prepared:
        import xlx_fast
        from xlx_fast.engine import Engine, Request

        ids, mask = captions(slots, device)
        base = model(spec.size, dtype, device, "engine-static")  # generate's model (optimized)
        eng_model = model(spec.size, dtype, device, "engine")
        engine = Engine(eng_model, slots=slots, max_length=ids.shape[1])
        engine.warmup()
        xlx_fast.optimize(base)

        def run_generate():
            return xlx_fast.generate(base, ids, mask, steps=4).ids

        def run_engine():
            engine.admit([Request(input_ids=ids[r], attention_mask=mask[r], steps=4, tag=r)
                          for r in range(slots)])
            out = [None] * slots
            while engine.active():
                for f in engine.step():
                    _raise_flagged(f)
                    out[f.request.tag] = f.ids
            return torch.stack(out).to(device)

        backends = {"engine": run_engine}
        backends["static loop"] = (lambda: _static_loop(eng_model, ids, mask, 4, "mask_predict")) \
            if device.type == "cpu" else NotAvailable("eager pre-engine loop: CPU row only")

        def compare(ref_ids, out_ids, name) -> Agreement:
            share = id_share(out_ids, ref_ids)
            ok = share >= MIN_SHARE[dtype]
            extra = {"target speed-up": TARGET["uniform"]} if name == "engine" else {}
            return Agreement("id agree", share, MIN_SHARE[dtype], ok, extra=extra)

        return Prepared(reference=run_generate, backends=backends, compare=compare)

    return Case(op="engine", shape=f"uniform B={slots} MP-4", dtype=dtype, device=device,
                backends={"engine": FAST, "static loop": PEER}, build=build)


def mixed_case(spec: Spec, dtype: torch.dtype) -> Case:
    device = spec.device
    slots, n = _sizes(spec, "mixed")

    def build() -> Prepared:
        import xlx_fast
        from xlx_fast.engine import Engine, Request

        ids, mask = captions(n, device)
        params = _mixed_requests(n)
        base = model(spec.size, dtype, device, "engine-static")
        eng_model = model(spec.size, dtype, device, "engine")
        engine = Engine(eng_model, slots=slots, max_length=ids.shape[1])
        engine.warmup()
        xlx_fast.optimize(base)

        def run_static():
            t0, out, lat = time.perf_counter(), [], []
            for s in range(0, n, slots):
                chunk = params[s:s + slots]
                res = xlx_fast.generate(base, ids[s:s + slots], mask[s:s + slots],
                                        steps=[p["steps"] for p in chunk],
                                        strategy=[p["strategy"] for p in chunk],
                                        seed=[p["seed"] for p in chunk])
                out.append(res.ids)
                lat += [time.perf_counter() - t0] * len(chunk)  # the batch waits for its slowest row
            return torch.cat(out), lat

        def run_engine():
            t0 = time.perf_counter()
            queue = [Request(input_ids=ids[r], attention_mask=mask[r], tag=r, **params[r]) for r in range(n)]
            done, lat = [None] * n, [0.0] * n
            while queue or engine.active():
                take = min(engine.free_slots(), len(queue))
                if take:
                    engine.admit(queue[:take])
                    queue = queue[take:]
                for f in engine.step():
                    _raise_flagged(f)
                    done[f.request.tag] = f.ids
                    lat[f.request.tag] = time.perf_counter() - t0
            return torch.stack(done).to(device), lat

        def compare(ref, out, _name) -> Agreement:
            share = id_share(out[0], ref[0])
            ok = share >= MIN_SHARE[dtype]
            extra = {"target speed-up": TARGET["mixed"]}
            extra.update({f"static {k}": v for k, v in _percentiles(ref[1]).items()})
            extra.update({f"engine {k}": v for k, v in _percentiles(out[1]).items()})
            return Agreement("id agree", share, MIN_SHARE[dtype], ok, extra=extra)

        return Prepared(reference=run_static, backends={"engine": run_engine}, compare=compare)

    return Case(op="engine", shape=f"mixed slots={slots} requests={n} steps 1..10", dtype=dtype,
                device=device, backends={"engine": FAST}, build=build)


def cases(spec: Spec):
    for dtype in spec.dtypes:
        yield uniform_case(spec, dtype)
        yield mixed_case(spec, dtype)
