"""Sampler step: the reference's torch ops vs the native step (cases: xlx_fast/bench/cases/sampler.py)."""
FAMILY = "sampler"


def test_sampler(bench_case, bench_run):
    bench_run(bench_case)
