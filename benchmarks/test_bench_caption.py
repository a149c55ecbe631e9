"""End to end: captioning by Mask-Predict-4, the reference loop vs xlx_fast.caption (cases: xlx_fast/bench/cases/caption.py)."""
FAMILY = "caption"


def test_caption(bench_case, bench_run):
    bench_run(bench_case)
