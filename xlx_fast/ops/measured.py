"""Pick an op's backend by measuring it, once per shape: never a slower kernel than the stock one.

A custom kernel earns its place at a shape by a measured win (SPEC §6). For the ops whose stock
twin can run on the same device (SDPA beside the attention kernel, torch's addmm + epilogue
beside the fused linear, torch's linear + softmax + max beside the codebook head), the op's
first call at a new shape key -- shapes, strides, dtypes and the scalar arguments -- times every
candidate on that call's own inputs and remembers the fastest for the process. Later calls at
that key look the answer up (a dict lookup: nothing is timed again).

How it times: on CUDA, each candidate runs once untimed (Triton compiles there), then
``REPEATS`` times between CUDA events on the current stream; the median wins, ties to the
preferred (lower rank) candidate. On a CPU nothing is measured: each op has one automatic CPU
backend.

When it cannot time: inside a CUDA graph capture (a timing needs a sync) or while
``torch.compile`` traces, an unseen key takes the preferred candidate, as the rank alone would,
and is not remembered, so the next eager call measures. ``generate`` and the engine run every
step once eagerly before capturing it, so the captured graph replays the measured choice.

:func:`choices` lists what was decided and the times behind it (``xlx-fast info`` in a process
that ran the ops, and the benchmarks' notes).
"""
from __future__ import annotations

import contextlib
import statistics
from typing import Callable

import torch

from . import registry

__all__ = ["install", "choose", "select", "choices", "forget", "shape_key", "REPEATS"]

REPEATS = 5
MEASURED_DEVICES = ("cuda",)
_DECIDED: dict = {}  # (op, device, dtype, key) -> (backend, {backend: ms})


def shape_key(*args) -> tuple:
    """What makes two calls the same for timing: each tensor's shape, strides and dtype (None
    stays None), every other argument as it is."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((tuple(a.shape), a.stride(), a.dtype))
        else:
            out.append(a)
    return tuple(out)


def _cuda_ms(trial: Callable[[], object], device: torch.device) -> float:
    trial()  # untimed: compiles, warms caches
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        trial()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cannot_time(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def select(op: str, device: torch.device, dtype, force, trial, *key_parts):
    """The implementation for one call of ``op``: on a device where backends are measured, with
    this call's shape key and trial (the chooser times them once per key); elsewhere by rank,
    without building a key (a CPU call pays nothing for measuring)."""
    if device.type not in MEASURED_DEVICES:
        return registry.select_impl(op, device, dtype, force=force)
    return registry.select_impl(op, device, dtype, force=force, key=shape_key(*key_parts), trial=trial)


def choose(op: str, candidates: list, device: torch.device, dtype, key, trial, *,
           timer: Callable | None = None, devices: tuple[str, ...] = MEASURED_DEVICES,
           cannot_time: Callable[[torch.device], bool] = _cannot_time):
    """The registry's chooser (see the module docstring). ``timer(run, device) -> ms``,
    ``devices`` and ``cannot_time`` are for tests; the defaults time CUDA calls only."""
    if device.type not in devices or len(candidates) < 2:
        return candidates[0]
    slot = (op, str(device), dtype, key)
    decided = _DECIDED.get(slot)
    if decided is None:
        if cannot_time(device):
            return candidates[0]
        timer = timer or _cuda_ms
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            ms = {impl.backend: timer(lambda impl=impl: trial(impl), device) for impl in candidates}
        best = min(candidates, key=lambda impl: ms[impl.backend])  # ties: the earlier (preferred)
        decided = _DECIDED[slot] = (best.backend, ms)
    return next(impl for impl in candidates if impl.backend == decided[0])


def choices() -> list[dict]:
    """Every decision so far: op, device, dtype, shape key, the backend chosen and the median ms
    of each candidate."""
    return [{"op": op, "device": dev, "dtype": str(dt).removeprefix("torch."), "key": key,
             "chosen": backend, "ms": dict(ms)}
            for (op, dev, dt, key), (backend, ms) in _DECIDED.items()]


def forget() -> None:
    """Drop every decision (tests; a process that changed GPU clocks)."""
    _DECIDED.clear()


def install(op: str) -> None:
    """Let ``op`` be chosen by measurement (its calls pass ``key`` and ``trial``)."""
    registry.set_chooser(op, choose)
