"""The native module xlx_fast._C: it imports (even without a GPU), says what it was built with,
and xlx_fast.info() / `xlx-fast info` tell the truth about it."""
from __future__ import annotations

import io
import json
import shutil
import subprocess

import torch

from xlx_fast import native


def test_c_module_imports_and_reports_its_build():
    mod = native.load()
    assert mod is not None, native.load_error()
    info = native.build_info()
    assert info["cpu_kernels"] is True
    assert isinstance(info["cuda_kernels"], bool)
    if info["cuda_kernels"]:
        archs = info["cuda_archs"].split(",")
        assert archs and all(a.isdigit() for a in archs), info["cuda_archs"]
        assert info["cuda_runtime_linkage"] == "static"
        assert info["cuda_runtime"].count(".") == 1
    else:
        assert info["cuda_archs"] == ""


def test_cuda_device_count_answers_without_crashing():
    n, reason = native.cuda_device_count()
    assert isinstance(n, int) and isinstance(reason, str)
    if native.has_cuda_kernels() and torch.cuda.is_available():
        assert n >= 1
    if not torch.cuda.is_available():
        assert n <= 0 and reason  # e.g. error 35: no driver


def test_module_links_neither_libtorch_nor_a_shared_cuda_runtime():
    ldd = shutil.which("ldd")
    assert ldd is not None, "ldd (glibc's libc-bin) is needed to inspect the module's links"
    libs = subprocess.run([ldd, native.load().__file__], capture_output=True, text=True).stdout
    assert "libtorch" not in libs and "libc10" not in libs
    assert "libcudart" not in libs  # static runtime: imports where no CUDA toolkit is installed


def test_kernel_sources_for_the_jit_path_are_found():
    d = native.kernel_source_dir()
    assert (d / "sampler_kernel.cuh").exists() and (d / "sampler_rules.h").exists()


def test_info_prints_the_truth():
    buf = io.StringIO()
    native.info(file=buf)
    text = buf.getvalue()
    built = native.build_info()
    assert f"CUDA kernels compiled  : {'yes' if built['cuda_kernels'] else 'no'}" in text
    if built["cuda_kernels"]:
        for a in built["cuda_archs"].split(","):
            assert f"sm_{a}" in text
    n, reason = native.cuda_device_count()
    assert ("CUDA device            : none" in text) == (n <= 0)
    for key in ("C++ CPU kernels", "CuPy JIT", "Triton", "interpreter", "torch devices",
                "sampler_step on CUDA"):
        assert key in text


def test_info_cli(capsys):
    from xlx_fast.cli import main

    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cpu_kernels"] is True
    assert report["cuda_kernels"] == native.has_cuda_kernels()
    assert main(["info"]) == 0
    assert "CUDA kernels compiled" in capsys.readouterr().out


def test_lazy_top_level_info():
    import xlx_fast

    assert xlx_fast.info is native.info
