"""Training: eager loss heads / loss step vs xlx_fast.training (cases: xlx_fast/bench/cases/training.py)."""
FAMILY = "training"


def test_training(bench_case, bench_run):
    bench_run(bench_case)
