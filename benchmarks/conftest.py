"""pytest-benchmark front end over the case definitions in ``xlx_fast.bench.cases``.

Each ``test_bench_<family>.py`` names its family; the cases come from the package (the same
objects ``xlx-fast bench`` runs) and are parametrized as (case, backend) pairs. All backends of a
case share one benchmark group; the case is built and checked against the reference once, before
its first backend is timed, and a disagreement fails every test of the case.

Options: ``--bench-device cpu|cuda`` (default: cuda when available), ``--bench-sweep quick|full``
(default quick), ``--bench-dtype fp32,bf16``, and ``--bench-model base|tiny``.
Run: ``pytest benchmarks/ --benchmark-only``.
"""
from __future__ import annotations

import time

import pytest
import torch

from xlx_fast.bench import cases as bench_cases
from xlx_fast.bench import harness

ROUND_BUDGET_S = {"quick": 1.0, "full": 5.0}


def pytest_addoption(parser):
    group = parser.getgroup("xlx_fast benchmarks")
    group.addoption("--bench-device", choices=["cpu", "cuda"], default=None,
                    help="device for the benchmark cases (default: cuda when available, else cpu)")
    group.addoption("--bench-sweep", choices=["quick", "full"], default="quick",
                    help="sweep size (default quick)")
    group.addoption("--bench-dtype", default="fp32,bf16", help="comma-separated dtypes (default fp32,bf16)")
    group.addoption("--bench-model", choices=["base", "tiny"], default="base",
                    help="model dimensions: base (the real ones) or tiny (checks the machinery only)")


def _spec(config) -> harness.Spec:
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda, but torch sees no CUDA device here")
    names = [n for n in config.getoption("--bench-dtype").split(",") if n]
    unknown = [n for n in names if n not in harness.DTYPES]
    if unknown or not names:
        raise pytest.UsageError(f"--bench-dtype: unknown {unknown}; choose from {list(harness.DTYPES)}")
    names.sort(key=list(harness.DTYPES).index)  # fp32 first: half rows compare with the fp32 reference
    return harness.Spec(device=device, dtypes=tuple(harness.DTYPES[n] for n in names),
                        quick=config.getoption("--bench-sweep") == "quick",
                        size=config.getoption("--bench-model"))


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    family = metafunc.module.FAMILY
    params = []
    for case in bench_cases.cases(family, _spec(metafunc.config)):
        for backend in (harness.REFERENCE, *case.backends):
            params.append(pytest.param((family, case, backend), id=f"{case.id}-{backend}"))
    metafunc.parametrize("bench_case", params)


class _Current:
    """The one case built at a time: prepared, checked, and released when the next case starts
    (pytest runs a case's backends one after another, in parametrization order)."""

    family = case_id = prepared = agreements = error = None
    seconds: dict = {}

    @classmethod
    def get(cls, family, case):
        if cls.case_id != case.id:
            cls.drop(next_family=family)
            cls.family, cls.case_id, cls.seconds = family, case.id, {}
            try:
                cls.prepared = case.prepare()
                _, cls.agreements = harness.check(case, cls.prepared, cls.seconds)
            except Exception as e:  # fail every backend of this case with the same error
                cls.error = e
        if cls.error is not None:
            raise cls.error
        return cls.prepared, cls.agreements, cls.seconds

    @classmethod
    def drop(cls, next_family=None):
        if cls.prepared is not None and cls.prepared.release is not None:
            cls.prepared.release()
        if cls.family is not None and cls.family != next_family:
            bench_cases.release(cls.family)
        cls.prepared = cls.agreements = cls.error = None


def pytest_sessionfinish(session):
    _Current.drop()


@pytest.fixture
def bench_run(benchmark, request):
    """Time one backend of one case with pytest-benchmark, after the case's agreement check."""
    sweep = request.config.getoption("--bench-sweep")

    def run(bench_case):
        family, case, backend = bench_case
        prepared, agreements, seconds = _Current.get(family, case)
        benchmark.group = case.id
        if backend == harness.REFERENCE:
            fn = prepared.reference
        else:
            status = agreements[backend]
            if isinstance(status, harness.NotAvailable):
                pytest.skip(status.reason)
            fn = prepared.backends[backend]
            benchmark.extra_info.update(agreement_metric=status.metric, agreement=status.value,
                                        agreement_limit=status.limit, **status.extra)
        benchmark.extra_info.update(op=case.op, shape=case.shape, backend=backend,
                                    dtype=harness.DTYPE_NAMES[case.dtype], flops=case.flops,
                                    bytes=case.bytes)
        if case.device.type == "cuda":
            # SPEC §5 times GPUs with CUDA events: record do_bench's median next to pytest's timer
            benchmark.extra_info["do_bench_ms"] = harness.time_ms(fn, case.device)

            def timed():
                fn()
                torch.cuda.synchronize(case.device)
        else:
            timed = fn
        # the agreement check ran every backend once: that was the warm-up
        per_call = max(seconds.get(backend, 0.0), 1e-6)
        rounds = int(min(100, max(2, ROUND_BUDGET_S[sweep] / per_call)))
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)

    return run


def pytest_report_header(config):
    spec = _spec(config)
    return (f"xlx_fast benchmarks: device {spec.device}, dtypes "
            f"{[harness.DTYPE_NAMES[d] for d in spec.dtypes]}, "
            f"{'quick' if spec.quick else 'full'} sweep, {spec.size} model; started {time.strftime('%H:%M:%S')}")
