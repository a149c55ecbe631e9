"""End to end: Mask-Predict-4, the reference loop vs xlx_fast.generate (cases: xlx_fast/bench/cases/generation.py)."""
FAMILY = "generation"


def test_generation(bench_case, bench_run):
    bench_run(bench_case)
