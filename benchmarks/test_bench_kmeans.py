"""k-means training: faiss.Kmeans vs xlx_fast.vocab.kmeans, CPU only (cases: xlx_fast/bench/cases/kmeans.py)."""
FAMILY = "kmeans"


def test_kmeans(bench_case, bench_run):
    bench_run(bench_case)
