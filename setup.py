"""Build script: the pure-Python package plus the native module ``xlx_fast._C``.

``_C`` is built by CMake + ninja (see CMakeLists.txt) from setuptools' ``build_ext``, so both
``pip install .`` and ``pip install -e .`` build it. Environment switches:

- ``XLX_NO_CUDA=1``      build the C++ CPU kernels only, even when nvcc is present.
- ``XLX_CUDA_ARCHS``     CUDA architectures, CMake syntax (default ``80;90``).
- ``XLX_NVCC``           path of nvcc (else PATH, then /usr/local/cuda/bin, /usr/local/bin).
- ``XLX_BUILD_TYPE``     CMake build type (default ``Release``).

nvcc is searched for here rather than by CMake alone so that the usual install locations work
even when they are not on PATH. The build directory persists under ``build/`` so rebuilds are
incremental; it is wiped when the build tools (cmake, ninja, Python) change, as happens between
isolated builds whose tool paths are temporary.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# Files the CuPy JIT path compiles at run time; shipped inside the package for non-editable installs.
KERNEL_SOURCES = ("csrc/sampler_rules.h", "csrc/sampler_kernel.cuh")


def _find_tool(name: str, module: str | None = None) -> str:
    found = shutil.which(name)
    if found:
        return found
    if module:  # the PyPI wheels of cmake / ninja expose their binary directory
        try:
            mod = __import__(module)
            candidate = Path(getattr(mod, "BIN_DIR", getattr(mod, "CMAKE_BIN_DIR", ""))) / name
            if candidate.exists():
                return str(candidate)
        except ImportError:
            pass
    raise RuntimeError(f"xlx_fast: the build needs {name!r} (pip install {module or name})")


def _find_nvcc() -> str | None:
    if os.environ.get("XLX_NO_CUDA", "").strip() not in ("", "0"):
        return None
    candidates = [os.environ.get("XLX_NVCC"), shutil.which("nvcc")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "bin", "nvcc"))
    candidates += ["/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        cmake = _find_tool("cmake", "cmake")
        ninja = _find_tool("ninja", "ninja")
        nvcc = _find_nvcc()
        archs = os.environ.get("XLX_CUDA_ARCHS", "80;90")

        stamp = "\n".join([cmake, ninja, sys.executable, pybind11.get_cmake_dir(), str(nvcc)])
        stamp_file = build_dir / "xlx_tools.txt"
        if build_dir.exists() and (not stamp_file.exists() or stamp_file.read_text() != stamp):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        stamp_file.write_text(stamp)

        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('XLX_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DXLX_OUTPUT_DIR={out_dir}",
            f"-DXLX_CUDA_ARCHS={archs}",
        ]
        if nvcc:
            args += ["-DXLX_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
        else:
            args += ["-DXLX_WITH_CUDA=OFF"]
        print(f"xlx_fast: building _C with CUDA {'at ' + nvcc + ' for ' + archs if nvcc else 'off'}")
        subprocess.check_call(args)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(self.parallel or os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", jobs])

        # The CuPy JIT path compiles the kernel source at run time: ship it with the package.
        # (In an editable install the package finds csrc/ in the source tree instead.)
        if not self.inplace and not getattr(self, "editable_mode", False):
            dest = out_dir / "_csrc"  # out_dir is the package directory holding _C
            dest.mkdir(parents=True, exist_ok=True)
            for rel in KERNEL_SOURCES:
                shutil.copy2(ROOT / rel, dest / Path(rel).name)


setup(ext_modules=[CMakeExtension("xlx_fast._C")], cmdclass={"build_ext": CMakeBuild})
