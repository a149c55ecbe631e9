"""Where one fast ``generate`` spends its device time: a torch.profiler trace, as text.

For each batch size, on the embedded default model (seeded random weights, the real shapes):
build and ``optimize`` the model, run ``xlx_fast.generate`` once to compile, tune and capture
(outside the trace), then trace one more call twice:

- ``graph``: the call as users get it (CUDA graph replay on a GPU), the time that matters;
- ``eager``: the same loop without the graph, whose kernel count divided by the steps is the
  number of launches per step a graph saves (and a fused kernel would remove).

For each trace it writes the top kernels by device time with their call counts, the total
device time, the wall time of the call, kernel launches per step, and on a GPU the host's side:
the operators and runtime calls that took the most CPU time themselves (a ``cudaStreamSynchronize``
or a blocking ``cudaMemcpyAsync`` there is the host waiting for the device; the wall time minus
the device time is what the host adds at this batch size). On a machine without a
GPU the same code traces CPU operators instead (self CPU time), which is only a check that this
module works: ``benchmarks/gpu_check.sh`` runs it that way with ``--size tiny`` on CPUs.

Usage::

    python benchmarks/profile_generate.py --batches 1 64 --out profile.txt
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

STEPS = 4  # Mask-Predict-4, the paper's best setting (SPEC §1)
# Host-side API calls that start device work (the runtime's, the driver's, a graph's).
HOST_LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                     "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")


def _device_time(evt, on_gpu: bool) -> float:
    """Self time of an aggregated event in µs: device time for kernels, CPU time otherwise."""
    if on_gpu:
        value = getattr(evt, "self_device_time_total", None)
        return float(value if value is not None else evt.self_cuda_time_total)
    return float(evt.self_cpu_time_total)


def _is_kernel(evt) -> bool:
    from torch.autograd import DeviceType

    return getattr(evt, "device_type", None) == DeviceType.CUDA


def trace(call, on_gpu: bool):
    """Run ``call()`` once under the profiler; (events aggregated by name, wall ms)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        call()
        if on_gpu:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    return prof.key_averages(), wall_ms


def summarize(events, on_gpu: bool, steps: int, top: int) -> list[str]:
    """Text lines: the ``top`` entries by self device time (kernels on a GPU, operators on a
    CPU) with call counts and shares, then totals and launches per step."""
    if on_gpu:
        rows = [e for e in events if _is_kernel(e) and _device_time(e, True) > 0]
    else:  # operators that did work themselves (aten::*, xlx_fast::*, ...)
        rows = [e for e in events if "::" in e.key and _device_time(e, False) > 0]
    rows.sort(key=lambda e: _device_time(e, on_gpu), reverse=True)
    total_us = sum(_device_time(e, on_gpu) for e in rows)
    launches = sum(e.count for e in rows)
    unit = "kernel" if on_gpu else "CPU op"
    lines = [f"  {'self ms':>9} {'share':>6} {'calls':>6} {'µs/call':>9}  {unit}"]
    for e in rows[:top]:
        t = _device_time(e, on_gpu)
        name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        lines.append(f"  {t / 1e3:9.3f} {100 * t / max(total_us, 1e-9):5.1f}% {e.count:6d} "
                     f"{t / max(e.count, 1):9.1f}  {name}")
    if len(rows) > top:
        rest = sum(_device_time(e, on_gpu) for e in rows[top:])
        lines.append(f"  {rest / 1e3:9.3f} {100 * rest / max(total_us, 1e-9):5.1f}% "
                     f"{sum(e.count for e in rows[top:]):6d} {'':9}  ({len(rows) - top} more)")
    lines.append(f"  total {unit} time {total_us / 1e3:.3f} ms in {launches} {unit}s over "
                 f"{steps} steps: {launches / steps:.1f} {unit}s per step")
    if on_gpu:  # what the host asked for: one graph launch replaces the kernel launches
        calls = {e.key: e.count for e in events if e.key in HOST_LAUNCH_CALLS}
        n = sum(calls.values())
        lines.append(f"  host launch calls {n} ({', '.join(f'{k} {v}' for k, v in sorted(calls.items()))}"
                     f"): {n / steps:.1f} per step")
        lines += host_lines(events, top=12)
    return lines


def host_lines(events, top: int) -> list[str]:
    """The ``top`` host-side entries (operators, runtime calls) by self CPU time."""
    rows = [e for e in events if not _is_kernel(e) and e.self_cpu_time_total > 0]
    rows.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    lines = [f"  host: {total / 1e3:.3f} ms of self CPU time in {len(rows)} kinds of call; the most:"]
    for e in rows[:top]:
        name = e.key if len(e.key) <= 70 else e.key[:67] + "..."
        lines.append(f"    {e.self_cpu_time_total / 1e3:8.3f} ms {e.count:6d} calls  {name}")
    return lines


def profile_batch(model, batch: int, on_gpu: bool, top: int) -> list[str]:
    import xlx_fast
    from xlx_fast.bench.cases.generation import captions

    ids, mask = captions(batch, model.centroids.device)
    lines = []
    modes = (("graph", True), ("eager", False)) if on_gpu else (("eager", False),)
    for mode, graph in modes:
        def call():
            return xlx_fast.generate(model, ids, mask, steps=STEPS, cuda_graph=graph)

        t0 = time.perf_counter()
        call()  # compile, autotune, capture: kept out of the trace
        if on_gpu:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        events, wall_ms = trace(call, on_gpu)
        lines.append(f"B={batch} {mode}: first call {first_s:.1f} s (compile/tune/capture), "
                     f"traced call {wall_ms:.2f} ms wall")
        lines += summarize(events, on_gpu, STEPS, top)
        lines.append("")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--size", choices=["base", "tiny"], default="base",
                   help="tiny: the test-size model (a check that this script works)")
    p.add_argument("--top", type=int, default=25, help="kernels listed per trace")
    p.add_argument("--out", default=None, help="also write the text here")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batches):
        print("error: --batches must be >= 1", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device here", file=sys.stderr)
        return 2
    on_gpu = device.type == "cuda"

    from xlx_fast.models import XLxmertForImageGeneration

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    name = torch.cuda.get_device_name(device) if on_gpu else "CPU (no GPU: operator profile only)"
    head = [f"profile of xlx_fast.generate, Mask-Predict-{STEPS}, {args.size} default model, "
            f"{args.dtype}, on {name}; torch {torch.__version__}", ""]
    print("\n".join(head), flush=True)
    lines = list(head)
    model = XLxmertForImageGeneration.from_default(seed=0, size=args.size, with_generator=False)
    model = model.to(device, dtype).eval()
    for batch in args.batches:
        block = profile_batch(model, batch, on_gpu, args.top)
        print("\n".join(block), flush=True)
        lines += block
        if args.out:  # after every batch: a run cut short keeps what it finished
            with open(args.out, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
