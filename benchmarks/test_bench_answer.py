"""The answer task (VQA, NLVR2): eager reference vs xlx_fast.answer (cases: xlx_fast/bench/cases/answer.py)."""
FAMILY = "answer"


def test_answer(bench_case, bench_run):
    bench_run(bench_case)
