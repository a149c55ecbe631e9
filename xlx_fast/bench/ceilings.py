"""Device ceilings measured in the same run as the cases: matmul TFLOP/s per dtype, copy GB/s.

Rows report their achieved TFLOP/s or GB/s as a share of these, so a speed-up is read next to
how much of the machine the fast path actually uses (SPEC §5). They are measured, not taken from
a data sheet: a 2-core CI box and an H100 are each compared with what torch reaches on them.

- matmul: ``torch.matmul`` of two square n×n matrices, 2·n³ FLOPs per call. n is chosen per
  dtype on the CPU from a first short measurement (a 256³ product, after a warm-up) so that one
  call takes about a tenth of the time budget, capped at 2048: a CPU whose bf16 GEMM is emulated
  at 0.3 GFLOP/s gets a small n instead of minutes of measuring. CUDA uses n = 8192. fp32 runs at
  whatever ``torch.get_float32_matmul_precision()`` says (recorded next to the number), the
  same switch the fast kernels read.
- copy: ``dst.copy_(src)`` of a buffer well beyond the last-level cache (1 GiB on CUDA, 256 MiB
  on the CPU), counting bytes read plus bytes written.

Each ceiling is timed for about ``CEILING_SECONDS`` (at least 2 repetitions) and is the fastest
repetition, not the median: a ceiling is what the device can reach, and on a shared CPU the
median mostly measures the neighbours.

Not every measured number is a ceiling: on a CPU without native bf16 arithmetic torch's bf16
GEMM is emulated and far slower than an op that widens bf16 to fp32, so its "percent of
ceiling" would be meaningless (thousands of percent). ``measure`` lists such dtypes under
``not_ceilings`` with the reason; the printed table shows no percentage for them (nor any above
100%), while the JSON keeps every number.
"""
from __future__ import annotations

import time

import torch

from .harness import DTYPE_NAMES, FULL, TimingPlan, time_ms

# (largest matmul n, copy bytes) per device type and size; "tiny" only checks that the code runs.
_SIZES = {
    ("cuda", "base"): (8192, 1 << 30),
    ("cpu", "base"): (2048, 256 << 20),
    ("cuda", "tiny"): (256, 1 << 20),
    ("cpu", "tiny"): (128, 1 << 20),
}
CEILING_SECONDS = 1.0  # time spent timing each ceiling on the CPU (CUDA: do_bench's windows)
_PROBE_N = 256


def _plan(plan: TimingPlan, seconds: float) -> TimingPlan:
    """``plan`` with its CPU budget bounded by ``seconds`` (the GPU windows are ms already)."""
    return TimingPlan(min_reps=2, max_reps=plan.max_reps, budget_s=min(plan.budget_s, seconds),
                      gpu_warmup_ms=plan.gpu_warmup_ms, gpu_rep_ms=plan.gpu_rep_ms)


def matmul_n(seconds_per_call: float, n_max: int, probe_n: int, probe_s: float) -> int:
    """The square size whose product takes about ``seconds_per_call`` at the rate a
    ``probe_n``³ product reached in ``probe_s`` seconds: a multiple of 64 in [64, n_max]
    (cubic in n, so the rate of the probe is assumed to hold at the larger size)."""
    rate = 2.0 * probe_n ** 3 / max(probe_s, 1e-9)
    n = int(round((rate * seconds_per_call / 2.0) ** (1.0 / 3.0), 6)) // 64 * 64
    return max(64, min(n_max, n))


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, plan: TimingPlan = FULL) -> float:
    """TFLOP/s of torch.matmul on n×n×n at ``dtype``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)

    def mm():
        return torch.matmul(a, b)

    mm()  # warm-up (library initialisation, heuristics)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = time_ms(mm, device, plan, stat="min")
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def sized_matmul_n(device: torch.device, dtype: torch.dtype, n_max: int,
                   seconds: float = CEILING_SECONDS) -> int:
    """The matmul size for a ceiling timed in about ``seconds``: from one warmed-up probe on
    the CPU; ``n_max`` on CUDA (a small probe there measures launch latency, not the rate, and
    do_bench bounds the time by its own windows)."""
    if device.type == "cuda":
        return n_max
    probe = min(_PROBE_N, n_max)
    gen = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(probe, probe, generator=gen).to(device, dtype)
    torch.matmul(a, a)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    torch.matmul(a, a)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return matmul_n(seconds / 10, n_max, probe, time.perf_counter() - t0)


def copy_gbps(device: torch.device, nbytes: int, plan: TimingPlan = FULL) -> float:
    """GB/s (10⁹ bytes) of a device-to-same-device copy, read + write counted."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)

    def copy():
        return dst.copy_(src)

    copy()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = time_ms(copy, device, plan, stat="min")
    return 2.0 * src.numel() * 4 / (ms * 1e-3) / 1e9


def not_ceilings(device: torch.device, dtypes, flags: set[str] | None = None) -> dict:
    """{dtype name: reason} for matmul numbers that are not ceilings (bf16 emulated on a CPU)."""
    from .machine import native_bf16

    out = {}
    if device.type == "cpu" and torch.bfloat16 in dtypes:
        native, why = native_bf16(flags)
        if not native:
            out["bf16"] = why
    return out


def measure(device, dtypes, size: str = "base", plan: TimingPlan = FULL,
            seconds: float = CEILING_SECONDS) -> dict:
    """All ceilings for ``device`` at ``dtypes``, each timed in about ``seconds``::

        {"matmul_tflops": {"fp32": .., "bf16": ..}, "matmul_n": {"fp32": n, ..},
         "copy_gbps": .., "copy_bytes": b, "fp32_matmul_precision": "highest",
         "not_ceilings": {"bf16": "reason"}}
    """
    device = torch.device(device)
    key = (device.type, size)
    if key not in _SIZES:
        raise ValueError(f"no ceiling sizes for device {device.type!r} at size {size!r}")
    n_max, nbytes = _SIZES[key]
    timing = _plan(plan, seconds)
    sizes = {DTYPE_NAMES[dt]: sized_matmul_n(device, dt, n_max, seconds) for dt in dtypes}
    return {
        "matmul_tflops": {DTYPE_NAMES[dt]: matmul_tflops(device, dt, sizes[DTYPE_NAMES[dt]], timing)
                          for dt in dtypes},
        "matmul_n": sizes,
        "copy_gbps": copy_gbps(device, nbytes, timing),
        "copy_bytes": nbytes,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "not_ceilings": not_ceilings(device, dtypes),
    }
