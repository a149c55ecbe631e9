"""The native module ``xlx_fast._C``: loading it, and saying what was built and what is usable.

``_C`` is built by setup.py through CMake (C++ CPU kernels always; CUDA kernels when nvcc was
found, with the CUDA runtime linked statically so it imports without a GPU). Nothing here
raises when something is missing: ``load()`` returns ``None`` and ``load_error()`` says why, and
``report()`` states the truth, e.g. "CUDA kernels compiled: yes (sm_80, sm_90)" next to "CUDA
device: none (no NVIDIA driver / no GPU)".

Which backend runs here is decided above this module, by what a test launch shows works; this
module states the facts that decision reads (the driver, the runtime compiled in, CuPy), and
``xlx-fast info`` (:mod:`xlx_fast.cli.info`) shows both.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path

_LOAD_ERROR: str | None = None


@functools.lru_cache(maxsize=None)
def load():
    """The ``xlx_fast._C`` module, or ``None`` if it was not built or does not import."""
    global _LOAD_ERROR
    try:
        return importlib.import_module("xlx_fast._C")
    except ImportError as e:  # not built (pure-Python checkout) or built for another Python
        _LOAD_ERROR = f"{type(e).__name__}: {e}"
        return None


def load_error() -> str | None:
    """Why ``load()`` returned ``None`` (``None`` when it loaded)."""
    load()
    return _LOAD_ERROR


@functools.lru_cache(maxsize=None)
def _build_info() -> dict:
    mod = load()
    if mod is None:
        return {"cpu_kernels": False, "cuda_kernels": False, "cuda_archs": "", "cuda_runtime": "",
                "cuda_runtime_linkage": "", "compiler": ""}
    return dict(mod.build_info())


def build_info() -> dict:
    """What ``_C`` was built with: cpu_kernels, cuda_kernels, cuda_archs ("80,90"), cuda_runtime,
    cuda_runtime_linkage, compiler. All false/empty when ``_C`` is missing."""
    return dict(_build_info())


def has_cpu_kernels() -> bool:
    return _build_info()["cpu_kernels"]


def has_cuda_kernels() -> bool:
    return _build_info()["cuda_kernels"]


def cuda_device_count() -> tuple[int, str]:
    """(count, reason) as the CUDA runtime linked into ``_C`` sees it; count -1 when it cannot
    answer (no driver: error 35), with the runtime's own words in ``reason``."""
    mod = load()
    if mod is None:
        return -1, f"xlx_fast._C is not available ({load_error()})"
    n, reason = mod.cuda_device_count()
    return int(n), str(reason)


# The oldest driver branch each CUDA runtime major version runs on (NVIDIA's CUDA toolkit
# release notes, "minimum required driver version"): a static runtime of that major version
# fails with cudaErrorInsufficientDriver below it.
MIN_DRIVER = {11: 450, 12: 525, 13: 580}


@functools.lru_cache(maxsize=None)
def driver_version() -> dict | None:
    """The NVIDIA driver here: {"release": "580.159.04" (or "" if unread), "cuda": "13.0"}
    (the newest CUDA version it supports), or None when there is no driver (libcuda absent)."""
    version = ctypes.c_int(0)
    try:
        rc = ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
    except (OSError, AttributeError):  # not on the loader's path: ask torch, which found it
        rc = -1
        try:
            import torch

            if torch.cuda.is_available():
                version.value, rc = int(torch._C._cuda_getDriverVersion()), 0
        except (ImportError, AttributeError, RuntimeError):
            pass
        if rc != 0:
            return None
    cuda = f"{version.value // 1000}.{version.value % 1000 // 10}" if rc == 0 else ""
    release = ""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            words = f.readline().split()
        release = next((w for w in words if w[:1].isdigit() and w.count(".") >= 1), "")
    except OSError:
        pass
    return {"release": release, "cuda": cuda}


def driver_text(driver: dict | None) -> str:
    if driver is None:
        return "no NVIDIA driver / no GPU"
    cuda = f" (supports CUDA {driver['cuda']})" if driver["cuda"] else ""
    return f"NVIDIA driver {driver['release'] or 'of unknown release'}{cuda}"


def kernel_source_dir() -> Path:
    """Directory holding ``sampler_kernel.cuh`` and ``sampler_rules.h`` for the CuPy JIT path:
    the copy shipped in the package (``pip install .``) or the source tree's ``csrc/``."""
    shipped = Path(__file__).resolve().parent / "_csrc"
    if (shipped / "sampler_kernel.cuh").exists():
        return shipped
    return Path(__file__).resolve().parent.parent / "csrc"


def cupy_status() -> tuple[bool, str]:
    """(usable, why): whether CuPy can JIT the CUDA kernels through NVRTC here."""
    if importlib.util.find_spec("cupy") is None:
        return False, "cupy is not installed"
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, f"cupy {cupy.__version__} sees no CUDA device"
        nvrtc = cupy.cuda.nvrtc.getVersion()
        return True, f"cupy {cupy.__version__}, NVRTC {nvrtc[0]}.{nvrtc[1]}, {n} device(s)"
    except Exception as e:  # no driver, no NVRTC library, ...
        return False, f"cupy present but unusable: {type(e).__name__}: {e}"


def _triton_status() -> tuple[bool, str]:
    interp = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
    mode = "interpreter ON (TRITON_INTERPRET=1)" if interp else "interpreter off"
    if importlib.util.find_spec("triton") is None:
        return False, f"not installed; {mode}"
    try:
        import triton

        return True, f"triton {triton.__version__}; {mode}"
    except Exception as e:
        return False, f"import failed ({type(e).__name__}: {e}); {mode}"


def _torch_devices() -> str:
    try:
        import torch
    except ImportError:
        return "torch not installed"
    parts = [f"torch {torch.__version__}", "cpu"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        parts.append("cuda: " + ", ".join(f"{i}: {n}" for i, n in enumerate(names)))
    else:
        parts.append(f"cuda: none (torch built with CUDA {torch.version.cuda})"
                     if torch.version.cuda else "cuda: none (CPU-only torch build)")
    return "; ".join(parts)


def report() -> dict:
    """Everything ``info()`` prints, as a dict of strings and booleans."""
    b = build_info()
    archs = ", ".join(f"sm_{a}" for a in b["cuda_archs"].split(",") if a)
    n, reason = cuda_device_count() if b["cpu_kernels"] else (-1, f"_C unavailable ({load_error()})")
    if not b["cuda_kernels"]:  # _C cannot ask the driver: count what torch sees instead
        try:
            import torch

            if torch.cuda.is_available():
                n, reason = torch.cuda.device_count(), "counted by torch (_C has no CUDA)"
        except ImportError:
            pass
    driver = driver_version()
    if driver is None:  # the static runtime would say cudaErrorInsufficientDriver: say what it means
        n, reason = 0, "no NVIDIA driver / no GPU: libcuda.so.1 not found"
    cupy_ok, cupy_why = cupy_status()
    triton_ok, triton_why = _triton_status()
    return {
        "python": sys.version.split()[0],
        "native_module": "xlx_fast._C" if load() is not None else f"missing ({load_error()})",
        "cpu_kernels": b["cpu_kernels"],
        "cuda_kernels": b["cuda_kernels"],
        "cuda_archs": archs,
        "cuda_runtime": (f"{b['cuda_runtime']} ({b['cuda_runtime_linkage']})"
                         if b["cuda_kernels"] else ""),
        "compiler": b["compiler"],
        "cuda_devices": n,
        "cuda_device_reason": reason,
        "cupy_jit": cupy_ok,
        "cupy_reason": cupy_why,
        "triton": triton_ok,
        "triton_reason": triton_why,
        "torch_devices": _torch_devices(),
        "sampler_step_cpu": "C++ twin (xlx_fast._C)" if b["cpu_kernels"] else "unavailable",
        "nvidia_driver": driver_text(driver),
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def report_lines(r: dict) -> list[str]:
    """``report()``'s dict as the lines ``xlx-fast info`` prints."""
    if r["cuda_devices"] > 0:
        device = f"{r['cuda_devices']} visible"
    else:
        device = f"none ({r['cuda_device_reason']})"
    return [
        f"xlx_fast native module : {r['native_module']} (Python {r['python']})",
        f"C++ CPU kernels        : {_yes(r['cpu_kernels'])}" + (f" ({r['compiler']})" if r["compiler"] else ""),
        f"CUDA kernels compiled  : {_yes(r['cuda_kernels'])}"
        + (f" ({r['cuda_archs']}; CUDA runtime {r['cuda_runtime']})" if r["cuda_kernels"] else ""),
        f"NVIDIA driver          : {r['nvidia_driver']}",
        f"CUDA device            : {device}",
        f"CuPy JIT (NVRTC)       : {_yes(r['cupy_jit'])} ({r['cupy_reason']})",
        f"Triton                 : {_yes(r['triton'])} ({r['triton_reason']})",
        f"torch devices          : {r['torch_devices']}",
        f"sampler_step on CPU    : {r['sampler_step_cpu']}",
    ]
