"""Codebook head: linear+softmax+max vs xlx_fast (cases: xlx_fast/bench/cases/codebook_head.py)."""
FAMILY = "codebook_head"


def test_codebook_head(bench_case, bench_run):
    bench_run(bench_case)
