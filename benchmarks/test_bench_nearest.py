"""Codebook nearest neighbour: cdist+argmin vs xlx_fast vs torch mm+argmin and FAISS (cases: xlx_fast/bench/cases/nearest.py)."""
FAMILY = "nearest"


def test_nearest(bench_case, bench_run):
    bench_run(bench_case)
