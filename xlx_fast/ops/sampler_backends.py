"""Where a sampler step runs: the C++ twin on the CPU, and on CUDA the kernel compiled into
``xlx_fast._C`` or the same source JIT-compiled by CuPy (NVRTC), whichever works here.

The CUDA backend is decided by what works, not by what was built, once per device and process
on the first CUDA call (``cuda_backend_choice``): a static CUDA 13 runtime needs an NVIDIA driver
>= 580, so on a machine with an older driver the compiled kernel cannot even count the devices,
while CuPy's NVRTC path (e.g. cupy-cuda12x) compiles the same source for the driver at hand.
Each backend gets one test launch (``_probe``); ``decide_sampler_backend`` maps the outcomes to
a choice: the compiled kernel if its test launch worked, else CuPy if its test launch worked,
else none, and every call then raises a ``RuntimeError`` naming the driver and runtime versions
and what to do (there is no silent fallback). The test launch syncs, so the first CUDA call must
not be inside a CUDA graph capture (``generate`` warms up before capturing). ``xlx-fast info``
shows the choice and why.

The three backends are registered with the op registry (``sampler_step``: "compiled" and
"cupy" on CUDA, "cpu" on the CPU; exact, so every tolerance is 0); ``run`` picks through it.
The CUDA backends' capability is the probed choice: the one chosen is usable, CuPy when not
tried (the compiled kernel works) is usable by name only if it imports, and the compiled
kernel, when nothing works, gives the whole reason (driver, runtime, the fix).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import native
from ..strategies import CODES
from ._common import FLOAT_DTYPES
from .registry import Capability, register_op, select_impl
from .sampler_args import CELLS, SamplerStepArgs

_KERNEL_NAMES = {16: "xlx_sampler_step_w16", 8: "xlx_sampler_step_w8", 4: "xlx_sampler_step_w4",
                 2: "xlx_sampler_step_w2", 1: "xlx_sampler_step_w1"}
_THREADS = 512  # kSamplerThreads in csrc/sampler_kernel.cuh


def run(a: SamplerStepArgs, backend: str | None = None) -> None:
    """One step on the tensors' device, through the backend the registry picks there
    (``backend``: that one by name, e.g. "cupy" in tests, or an error saying why not)."""
    select_impl("sampler_step", a.pred_prob.device, a.table.dtype, force=backend).impl(a)


def _run_cpu(a: SamplerStepArgs) -> None:
    """The C++ twin: every row is decided first; a bad row writes only ``status`` and raises."""
    row, code = native.load().sampler_step_cpu(*a.pointers(), a.strategy, a.batch, a.cells,
                                               a.n_table, a.row_bytes)
    if row >= 0:
        raise ValueError("sampler_step: " + a.status_message(code, row)
                         + " (nothing but status was written)")


# --------------------------------------------------------------------------------------------
# Choosing the CUDA backend.


@dataclass(frozen=True)
class Probe:
    """The outcome of trying one backend: ``ok`` True (a test launch gave the right answer),
    False (it failed or could not be tried; ``why`` says which), None (not tried)."""

    ok: bool | None
    why: str


@dataclass(frozen=True)
class BackendChoice:
    """``backend``: "compiled", "cupy", or None (nothing works: ``why`` is the error text);
    ``probes``: what each backend's probe found, by name."""

    backend: str | None
    why: str
    probes: tuple = ()

    def probe(self, backend: str) -> Probe | None:
        return dict(self.probes).get(backend)


def decide_sampler_backend(compiled: Probe, cupy: Probe, driver: dict | None,
                           runtime: str) -> BackendChoice:
    """The sampler step's CUDA backend from the probes' outcomes (a pure function).

    ``runtime`` is the CUDA runtime compiled into ``_C`` ("13.0", "" when it has no CUDA).
    Preference: the compiled kernel (no JIT at start, no CuPy needed), then CuPy's JIT of the
    same source. With neither, the reason names the driver, the runtime, both probes and the fix.
    """
    probes = (("compiled", compiled), ("cupy", cupy))
    if compiled.ok:
        return BackendChoice("compiled", f"compiled kernel of xlx_fast._C (CUDA {runtime} runtime, "
                                         f"static): {compiled.why}", probes)
    if cupy.ok:
        return BackendChoice("cupy", f"CuPy NVRTC JIT of csrc/sampler_kernel.cuh: {cupy.why}; "
                                     f"the compiled kernel is not usable: {compiled.why}", probes)
    if driver is None:
        fix = "run on a machine with an NVIDIA GPU and driver, or keep the tensors on the CPU"
    else:
        major = int(runtime.split(".")[0]) if runtime[:1].isdigit() else None
        need = (f" (a CUDA {major} runtime needs driver >= {native.MIN_DRIVER[major]})"
                if major in native.MIN_DRIVER else "")
        fix = (f"update the NVIDIA driver{need}, or install CuPy for the driver's CUDA version "
               "(e.g. pip install cupy-cuda12x) so the JIT path runs, or rebuild xlx_fast with an "
               "nvcc the driver supports (pip install --no-build-isolation -e . with it on PATH)")
    runtime_text = (f"xlx_fast._C has a static CUDA {runtime} runtime" if runtime
                    else "xlx_fast._C has no CUDA kernels")
    return BackendChoice(None, f"no usable CUDA backend for sampler_step on this machine "
                               f"({native.driver_text(driver)}; {runtime_text}). Compiled kernel: "
                               f"{compiled.why}. CuPy: {cupy.why}. To fix: {fix}.", probes)


# device index -> BackendChoice, filled by the first CUDA call on that device
_CHOICES: dict = {}


def cuda_backend_choice(device) -> BackendChoice:
    """The CUDA backend for ``device`` (probed on first use, then remembered for the process):
    see ``decide_sampler_backend``. Never raises for an unusable backend (the choice's
    ``backend`` is then None and ``why`` the error text), except when the first call on a
    device comes inside a CUDA graph capture, where the test launch cannot sync."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CHOICES:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "sampler_step's first CUDA call on this device is inside a CUDA graph capture, "
                "where its backend probe (one test launch and a sync) cannot run: call it once "
                "before capturing (a warm-up run)")
        compiled = _probe(index, "compiled")
        cupy = (Probe(None, "not tried (the compiled kernel works)") if compiled.ok
                else _probe(index, "cupy"))
        _CHOICES[index] = decide_sampler_backend(
            compiled, cupy, native.driver_version(), native.build_info()["cuda_runtime"])
    return _CHOICES[index]


def cuda_choice_here(driver, reason: str) -> tuple[str, str]:
    """(backend or "none", why) for ``xlx-fast info``: the probe's choice where there is a GPU
    (``driver``: ``native.driver_version()``; ``reason``: why no device was counted)."""
    if driver is None:
        return "none", "no NVIDIA driver / no GPU"
    if not torch.cuda.is_available():
        return "none", f"torch sees no CUDA device ({reason})"
    choice = cuda_backend_choice(torch.device("cuda", torch.cuda.current_device()))
    return choice.backend or "none", choice.why


def _probe(index: int, backend: str) -> Probe:
    """Whether ``backend`` can run one step correctly on cuda:``index`` (one row, mask_predict
    from the initial state: every cell decided, the 21 lowest-probability cells re-masked)."""
    if backend == "compiled":
        if not native.has_cuda_kernels():
            why = native.load_error() or "it was built without CUDA kernels (no nvcc, or XLX_NO_CUDA)"
            return Probe(False, f"xlx_fast._C: {why}")
        n, reason = native.cuda_device_count()
        if n < 1:  # e.g. cudaErrorInsufficientDriver: the static runtime is newer than the driver
            return Probe(False, f"its CUDA runtime cannot use this GPU: {reason}")
    else:
        ok, why = native.cupy_status()
        if not ok:
            return Probe(False, why)
    dev = torch.device("cuda", index)
    try:
        n_table, d = 5, 3
        table = torch.arange(n_table * d, dtype=torch.float32, device=dev).view(n_table, d)
        mask_row = torch.full((d,), -1.0, device=dev)
        prob = (torch.randperm(CELLS, generator=torch.Generator().manual_seed(0)).float() + 1) / 65
        pred_id = torch.arange(CELLS, dtype=torch.int64) % n_table
        count = 21
        # the state before step 0: every cell masked, nothing visited or decided
        a = SamplerStepArgs(
            prob.view(1, CELLS).to(dev), pred_id.view(1, CELLS).to(dev), table, mask_row,
            mask=torch.ones(1, CELLS, dtype=torch.bool, device=dev),
            visited=torch.zeros(1, CELLS, dtype=torch.bool, device=dev),
            ids=torch.full((1, CELLS), -1, dtype=torch.int64, device=dev),
            out=mask_row.expand(1, CELLS, d).contiguous(),
            status=torch.zeros(1, dtype=torch.int32, device=dev),
            count=torch.tensor([count], dtype=torch.int32, device=dev), cell=None, next_cell=None,
            strategy=CODES["mask_predict"])
        a.check()
        _LAUNCH[backend](a)
        torch.cuda.synchronize(dev)
        masked = torch.zeros(CELLS, dtype=torch.bool)
        masked[torch.argsort(prob, stable=True)[:count]] = True
        want_out = torch.where(masked[:, None], mask_row.cpu(), table.cpu()[pred_id])
        right = (torch.equal(a.ids.cpu()[0], pred_id) and torch.equal(a.mask.cpu()[0], masked)
                 and torch.equal(a.out.cpu()[0], want_out) and int(a.status.cpu()[0]) == 0)
    except Exception as e:  # a failed launch (no kernel image for this GPU, driver too old, ...)
        return Probe(False, f"its test launch failed: {type(e).__name__}: {e}")
    if not right:
        return Probe(False, "its test launch ran but gave a wrong answer")
    return Probe(True, f"a test launch on cuda:{index} gave the right answer")


# --------------------------------------------------------------------------------------------
# The launches.


def _stream(a: SamplerStepArgs) -> int:
    """The current stream of the tensors' device (the capture stream inside a CUDA graph)."""
    return torch.cuda.current_stream(a.pred_prob.device).cuda_stream


def _launch_compiled(a: SamplerStepArgs) -> None:
    mod = native.load()
    if mod is None or not native.has_cuda_kernels():
        raise RuntimeError("xlx_fast._C was built without CUDA kernels")
    with torch.cuda.device(a.pred_prob.device):
        mod.sampler_step_cuda(*a.pointers(), a.strategy, a.batch, a.cells, a.n_table, a.row_bytes,
                              _stream(a))


@functools.lru_cache(maxsize=None)
def _cupy_status() -> tuple[bool, str]:
    """``native.cupy_status()`` once per process: it asks the driver, too slow for every step."""
    return native.cupy_status()


def _gather_width(row_bytes, *addresses) -> int:
    bits = row_bytes
    for x in addresses:
        bits |= x
    for w in (16, 8, 4, 2):
        if bits % w == 0:
            return w
    return 1


def kernel_source() -> str:
    """The CUDA source the JIT path compiles: csrc/sampler_kernel.cuh with sampler_rules.h
    pasted where it is included (NVRTC gets one self-contained source; "#pragma once" is
    dropped: it warns in a main file). Tests compile the same text with nvcc."""
    src_dir = native.kernel_source_dir()
    rules = (src_dir / "sampler_rules.h").read_text()
    kernel = (src_dir / "sampler_kernel.cuh").read_text()
    return kernel.replace('#include "sampler_rules.h"', rules).replace("#pragma once", "")


@functools.lru_cache(maxsize=None)
def _cupy_module(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=kernel_source(), options=("--std=c++17",))


def _launch_cupy(a: SamplerStepArgs) -> None:
    ok, why = _cupy_status()
    if not ok:
        raise RuntimeError(
            "sampler_step on CUDA needs xlx_fast._C built with CUDA (reinstall with nvcc on "
            f"PATH, without XLX_NO_CUDA) or CuPy for the NVRTC JIT path ({why})")
    import cupy
    import numpy as np

    device_index = a.pred_prob.device.index
    width = _gather_width(a.row_bytes, a.table.data_ptr(), a.mask_row.data_ptr(), a.out.data_ptr())
    args = tuple(np.uint64(p) for p in a.pointers()) + (np.int32(a.strategy), np.int32(a.cells),
                                                         np.int64(a.n_table), np.int64(a.row_bytes))
    with torch.cuda.device(a.pred_prob.device):
        stream = _stream(a)
    # RawKernel launches on CuPy's current stream: make it torch's (the capture stream in a graph).
    with cupy.cuda.Device(device_index), cupy.cuda.ExternalStream(stream):
        fn = _cupy_module(device_index).get_function(_KERNEL_NAMES[width])
        fn((a.batch,), (_THREADS,), args)


_LAUNCH = {"compiled": _launch_compiled, "cupy": _launch_cupy}


# --------------------------------------------------------------------------------------------
# The registry's view: what each backend needs, from the probed choice.


def _compiled_unusable(device) -> str | None:
    choice = cuda_backend_choice(device)
    if choice.backend == "compiled":
        return None
    return choice.why if choice.backend is None else choice.probe("compiled").why


def _cupy_unusable(device) -> str | None:
    choice = cuda_backend_choice(device)
    probe = choice.probe("cupy")
    if choice.backend == "cupy" or (probe.ok is None and _cupy_status()[0]):
        return None
    return probe.why if probe.ok is not None else _cupy_status()[1]


def _cpu_unusable(device) -> str | None:
    if native.load() is None:
        return f"xlx_fast._C did not load ({native.load_error()}); reinstall with 'pip install -e .'"
    return None


_EXACT = {dtype: 0.0 for dtype in FLOAT_DTYPES}  # ids, masks and gathered rows are exact
register_op("sampler_step", "compiled", impl=_launch_compiled, preference_rank=0, tolerances=_EXACT,
            capability=Capability(devices=("cuda",), dtypes=FLOAT_DTYPES, probe=_compiled_unusable))
register_op("sampler_step", "cupy", impl=_launch_cupy, preference_rank=1, tolerances=_EXACT,
            capability=Capability(devices=("cuda",), dtypes=FLOAT_DTYPES, probe=_cupy_unusable))
register_op("sampler_step", "cpu", impl=_run_cpu, preference_rank=0, tolerances=_EXACT,
            capability=Capability(devices=("cpu",), dtypes=FLOAT_DTYPES, probe=_cpu_unusable))
