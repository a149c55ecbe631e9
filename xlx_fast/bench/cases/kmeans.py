"""k-means training: FAISS ``faiss.Kmeans`` vs ``xlx_fast.vocab.kmeans`` (CPU, fp32).

Data: N synthetic clustered features, fp32: k planted centres drawn from N(0, 1), each point a
centre plus N(0, 1) noise per coordinate. Both implementations run the same number of Lloyd
iterations (each: assign every point to its nearest centroid, then move each centroid to the mean
of its points) from the same starting centroids: k distinct data points drawn with the case's
seed and handed to both (``init_centroids``), since FAISS and xlx_fast draw their own starts from
different random streams. No subsampling happens (N ≤ k × 256, FAISS's default cap). The noise is
wide enough that no cluster comes out empty in these few iterations: FAISS and xlx_fast re-seed
an empty cluster from different random streams too, and with tighter clusters (more empties) the
objectives after 5 iterations differ by a few percent by chance alone, not by error.

Reference (the timed baseline): ``faiss.Kmeans(d, k, niter=n_iter, seed=seed).train(x,
init_centroids=...)``. Fast: ``xlx_fast.vocab.kmeans(x, k, n_iter, seed, init_centroids=...)``.
A timed call is one whole training run of ``n_iter`` iterations (the shape says how many): the time
of one iteration is the row's time divided by ``n_iter``; FAISS's index setup per call is included
(it is negligible next to the assignments).

Agreement: the final objective — the sum of squared distances of the points to their nearest
final centroid, computed in float64 for both outputs — within 1% of FAISS's (two-sided). The
relative difference of the centroids themselves is reported next to it.

FLOPs: the assignment GEMM, 2·N·k·D per iteration, times ``n_iter`` (updates, norms and argmins
left out); the row also shows ``torch.matmul``'s rate on the same n_iter GEMMs.

CPU only: on CUDA there is no FAISS GPU build to compare with here, so the family has no CUDA
cases; other dtypes have none either (both implementations train in fp32).
"""
from __future__ import annotations

import torch

from ..harness import FAST, Agreement, Case, NotAvailable, Prepared, Spec, fast_module, rel_error

N_ITER, SEED = 5, 0
OBJECTIVE_TOLERANCE = 0.01
NOISE = 1.0  # see the module docstring: no empty clusters, so the runs are comparable
SIZES = {  # (N, D, k)
    "tiny": ((1000, 16, 16),),
    "quick": ((10_000, 64, 128),),
    "full": ((20_000, 128, 256),),
}


def make_inputs(n: int, d: int, k: int, seed: int = SEED):
    """(features [n, d], starting centroids [k, d]: k distinct features), fp32 on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=gen)
    planted = torch.randint(0, k, (n,), generator=gen)
    x = (centres[planted] + NOISE * torch.randn(n, d, generator=gen)).contiguous()
    init = x[torch.randperm(n, generator=gen)[:k]].clone()
    return x, init


def objective(x: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum over the points of the squared distance to the nearest centroid, in float64."""
    xd, cd = x.double(), centroids.double()
    d2 = xd.square().sum(1, keepdim=True) - 2 * xd @ cd.T + cd.square().sum(1)
    return float(d2.min(1).values.clamp_min(0).sum())


def faiss_kmeans(x: torch.Tensor, init: torch.Tensor, n_iter: int, seed: int):
    try:
        import faiss
    except ImportError:
        return None
    xs, inits = x.numpy(), init.numpy()

    def run():
        km = faiss.Kmeans(xs.shape[1], inits.shape[0], niter=n_iter, seed=seed, verbose=False)
        km.train(xs, init_centroids=inits)
        return torch.from_numpy(km.centroids)

    return run


def make_case(spec: Spec, n: int, d: int, k: int) -> Case:
    device = spec.device

    def build() -> Prepared:
        vocab = fast_module("xlx_fast.vocab")
        x, init = make_inputs(n, d, k)
        reference = faiss_kmeans(x, init, N_ITER, SEED)
        if reference is None:
            raise RuntimeError("the kmeans benchmark's reference is FAISS: pip install faiss-cpu")
        if vocab is None:
            fast = NotAvailable("n/a — not implemented (xlx_fast/vocab.py)")
        else:
            def fast():
                return vocab.kmeans(x, k=k, n_iter=N_ITER, seed=SEED, progress=False,
                                    init_centroids=init).centroids

        ref_objective = {}

        def compare(ref, out, _name) -> Agreement:
            if "value" not in ref_objective:
                ref_objective["value"] = objective(x, ref)
            obj_ref, obj_out = ref_objective["value"], objective(x, out)
            diff = abs(obj_out - obj_ref) / obj_ref
            return Agreement("rel err", diff, OBJECTIVE_TOLERANCE, diff <= OBJECTIVE_TOLERANCE,
                             detail="" if diff <= OBJECTIVE_TOLERANCE else
                             f"objective {obj_out:.6g} vs FAISS's {obj_ref:.6g}",
                             extra={"centroid err": rel_error(out.float(), ref.float())})

        def same_gemm():
            for _ in range(N_ITER):
                torch.matmul(x, init.T)

        return Prepared(reference=reference, backends={"xlx_fast": fast}, compare=compare,
                        same_gemm=same_gemm)

    return Case(op="kmeans", shape=f"N={n} D={d} k={k} iters={N_ITER}", dtype=torch.float32,
                device=device, backends={"xlx_fast": FAST}, build=build,
                flops=2.0 * n * k * d * N_ITER, bound="compute")


def cases(spec: Spec):
    if spec.device.type != "cpu" or torch.float32 not in spec.dtypes:
        return
    sizes = SIZES["tiny" if spec.size == "tiny" else "quick" if spec.quick else "full"]
    for n, d, k in sizes:
        yield make_case(spec, n, d, k)
