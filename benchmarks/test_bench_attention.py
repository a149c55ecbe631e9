"""Attention at LXMERT shapes: HF eager formula vs xlx_fast vs SDPA (cases: xlx_fast/bench/cases/attention.py)."""
FAMILY = "attention"


def test_attention(bench_case, bench_run):
    bench_run(bench_case)
