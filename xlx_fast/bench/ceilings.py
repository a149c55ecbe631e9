"""Device ceilings measured in the same run as the cases: matmul TFLOP/s per dtype, copy GB/s.

Rows report their achieved TFLOP/s or GB/s as a share of these, so a speed-up is read next to
how much of the machine the fast path actually uses (SPEC §5). They are measured, not taken from
a data sheet: a 2-core CI box and an H100 are each compared with what torch reaches on them.

- matmul: ``torch.matmul`` of two square n×n matrices (n = 8192 on CUDA, 2048 on the CPU),
  2·n³ FLOPs per call. fp32 runs at whatever ``torch.get_float32_matmul_precision()`` says
  (recorded next to the number), the same switch the fast kernels read.
- copy: ``dst.copy_(src)`` of a buffer well beyond the last-level cache (1 GiB on CUDA, 256 MiB
  on the CPU), counting bytes read plus bytes written.

Each is the fastest repetition, not the median: a ceiling is what the device can reach, and on a
shared CPU the median mostly measures the neighbours. A row above 100% therefore means the op
beat torch's square GEMM at that dtype (e.g. a bf16 op that widens to fp32 on a CPU without bf16
arithmetic, where torch's bf16 GEMM is slower than its fp32 one).
"""
from __future__ import annotations

import torch

from .harness import DTYPE_NAMES, FULL, TimingPlan, time_ms

# (matmul n, copy bytes) per device type and size; "tiny" only checks that the code runs.
_SIZES = {
    ("cuda", "base"): (8192, 1 << 30),
    ("cpu", "base"): (2048, 256 << 20),
    ("cuda", "tiny"): (256, 1 << 20),
    ("cpu", "tiny"): (128, 1 << 20),
}


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


def measure(device, dtypes, size: str = "base", plan: TimingPlan = FULL) -> dict:
    """All ceilings for ``device`` at ``dtypes``::

        {"matmul_tflops": {"fp32": .., "bf16": ..}, "copy_gbps": ..,
         "matmul_n": n, "copy_bytes": b, "fp32_matmul_precision": "highest"}
    """
    device = torch.device(device)
    key = (device.type, size)
    if key not in _SIZES:
        raise ValueError(f"no ceiling sizes for device {device.type!r} at size {size!r}")
    n, nbytes = _SIZES[key]
    return {
        "matmul_tflops": {DTYPE_NAMES[dt]: matmul_tflops(device, dt, n, plan) for dt in dtypes},
        "copy_gbps": copy_gbps(device, nbytes, plan),
        "matmul_n": n,
        "copy_bytes": nbytes,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
    }
