"""Whole LxmertModel forward: plain HF vs xlx_fast.optimize (cases: xlx_fast/bench/cases/model_forward.py)."""
FAMILY = "model_forward"


def test_model_forward(bench_case, bench_run):
    bench_run(bench_case)
