"""The native module xlx_fast._C: it imports (even without a GPU), says what it was built with,
and xlx_fast.info() / `xlx-fast info` tell the truth about it."""
from __future__ import annotations

import io
import json
import shutil
import subprocess

import pytest
import torch

from xlx_fast import native
from xlx_fast.cli import info as cli_info
from xlx_fast.ops import sampler_backends as B


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
    cli_info.info(file=buf)
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
    from xlx_fast.ops import frozen_weights

    line = next(t for t in text.splitlines() if t.startswith("frozen weights on CPU  : "))
    for dtype, library in (("float32", "MKL"), ("bfloat16", "oneDNN")):
        assert (f"{dtype} ({library})" in line) == frozen_weights.available(getattr(torch, dtype))
    assert line.split(": ", 1)[1].startswith("yes" if frozen_weights.available() else "no")


def test_info_names_a_dtype_freezing_cannot_pack_here(monkeypatch):
    from xlx_fast.ops import frozen_weights

    monkeypatch.setitem(frozen_weights._USABLE, torch.bfloat16, False)  # a CPU without AMX/AVX512-BF16
    buf = io.StringIO()
    cli_info.info(file=buf)
    line = next(t for t in buf.getvalue().splitlines() if t.startswith("frozen weights on CPU"))
    assert "bfloat16 (oneDNN)" not in line
    if frozen_weights.available():
        assert "not bfloat16 (no native bfloat16 on this CPU)" in line


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

    assert xlx_fast.info is cli_info.info


# -- the sampler's CUDA backend: chosen by what works ---------------------------------------------

OK_COMPILED = B.Probe(True, "a test launch on cuda:0 gave the right answer")
BAD_COMPILED = B.Probe(False, "its CUDA runtime cannot use this GPU: cudaErrorInsufficientDriver "
                              "(error 35): CUDA driver version is insufficient for CUDA runtime version")
NO_C = B.Probe(False, "xlx_fast._C: it was built without CUDA kernels (no nvcc, or XLX_NO_CUDA)")
OK_CUPY = B.Probe(True, "a test launch on cuda:0 gave the right answer")
BAD_CUPY = B.Probe(False, "cupy is not installed")
UNTRIED = B.Probe(None, "not tried (the compiled kernel works)")
OLD_DRIVER = {"release": "535.154.05", "cuda": "12.2"}
NEW_DRIVER = {"release": "580.159.04", "cuda": "13.0"}


@pytest.mark.parametrize("compiled", [OK_COMPILED, BAD_COMPILED, NO_C], ids=["compiled-ok", "compiled-bad", "no-C"])
@pytest.mark.parametrize("cupy", [OK_CUPY, BAD_CUPY, UNTRIED], ids=["cupy-ok", "cupy-bad", "cupy-untried"])
@pytest.mark.parametrize("driver", [None, OLD_DRIVER, NEW_DRIVER], ids=["no-driver", "driver-535", "driver-580"])
def test_backend_decision_for_every_probe_outcome(compiled, cupy, driver):
    runtime = "" if compiled is NO_C else "13.0"
    choice = B.decide_sampler_backend(compiled, cupy, driver, runtime)
    if compiled.ok:  # preferred whenever its launch worked, whatever CuPy says
        assert choice.backend == "compiled"
        assert "CUDA 13.0 runtime" in choice.why and compiled.why in choice.why
    elif cupy.ok:
        assert choice.backend == "cupy"
        assert cupy.why in choice.why and compiled.why in choice.why  # says why not the compiled one
    else:
        assert choice.backend is None
        why = choice.why
        assert why.startswith("no usable CUDA backend for sampler_step")
        assert compiled.why in why and cupy.why in why
        if driver is None:
            assert "no NVIDIA driver / no GPU" in why and "cudaErrorInsufficientDriver" not in why.split(".")[0]
        else:
            assert f"NVIDIA driver {driver['release']} (supports CUDA {driver['cuda']})" in why
            assert "cupy-cuda12x" in why and "nvcc" in why
        if runtime:
            assert "static CUDA 13.0 runtime" in why
            if driver is not None:
                assert "driver >= 580" in why
        else:
            assert "no CUDA kernels" in why


def test_min_driver_table_covers_the_runtimes_we_build():
    assert native.MIN_DRIVER[13] == 580 and native.MIN_DRIVER[12] == 525
    built = native.build_info()["cuda_runtime"]
    if built:
        assert int(built.split(".")[0]) in native.MIN_DRIVER


def test_dispatch_probes_once_and_tries_cupy_only_when_needed(monkeypatch):
    """The real dispatch code with the probes' outcomes injected (no GPU here)."""
    from xlx_fast.ops import sampler_backends as S

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(native, "driver_version", lambda: OLD_DRIVER)
    for outcomes, want in ((("compiled", OK_COMPILED), "compiled"),
                           (("compiled", BAD_COMPILED, "cupy", OK_CUPY), "cupy"),
                           (("compiled", BAD_COMPILED, "cupy", BAD_CUPY), None)):
        results = dict(zip(outcomes[::2], outcomes[1::2]))
        calls = []

        def fake_probe(index, backend):
            calls.append((index, backend))
            return results[backend]

        monkeypatch.setattr(S, "_probe", fake_probe)
        monkeypatch.setattr(S, "_CHOICES", {})
        dev = torch.device("cuda", 3)
        first = S.cuda_backend_choice(dev)
        again = S.cuda_backend_choice(dev)
        assert first is again and first.backend == want
        assert calls == [(3, b) for b in outcomes[::2]]  # once per process and device
        if want is None:
            assert "535.154.05" in first.why and "cupy-cuda12x" in first.why


def test_registry_picks_what_the_probes_found(monkeypatch):
    """The op's dispatch goes through the registry, whose CUDA capabilities are the probed
    choice: the chosen backend runs, CuPy (untried) runs only by name and only if it imports,
    and with nothing usable the error carries the choice's whole reason."""
    from xlx_fast.ops import registry

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(native, "driver_version", lambda: OLD_DRIVER)
    dev = torch.device("cuda", 3)
    for results, want in (({"compiled": OK_COMPILED}, "compiled"),
                          ({"compiled": BAD_COMPILED, "cupy": OK_CUPY}, "cupy"),
                          ({"compiled": BAD_COMPILED, "cupy": BAD_CUPY}, None)):
        monkeypatch.setattr(B, "_probe", lambda index, backend, results=results: results[backend])
        monkeypatch.setattr(B, "_CHOICES", {})
        if want is None:
            with pytest.raises(RuntimeError, match="no sampler_step backend.*535.154.05.*cupy-cuda12x"):
                registry.select_impl("sampler_step", dev, torch.float32)
        else:
            assert registry.select_impl("sampler_step", dev, torch.float32).backend == want
            assert registry.explain("sampler_step", dev, torch.float32)["runs"] == want
    monkeypatch.setattr(B, "_probe", lambda index, backend: OK_COMPILED)
    monkeypatch.setattr(B, "_CHOICES", {})
    for cupy_status, usable in (((True, "cupy 13"), True), ((False, "cupy is not installed"), False)):
        monkeypatch.setattr(B, "_cupy_status", lambda status=cupy_status: status)
        if usable:
            assert registry.select_impl("sampler_step", dev, torch.float32, force="cupy").backend == "cupy"
        else:
            with pytest.raises(RuntimeError, match="cupy is not installed"):
                registry.select_impl("sampler_step", dev, torch.float32, force="cupy")
    assert registry.select_impl("sampler_step", "cpu", torch.bfloat16).backend == "cpu"


def test_dispatch_refuses_to_probe_inside_a_graph_capture(monkeypatch):
    from xlx_fast.ops import sampler_backends as S

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(S, "_CHOICES", {})
    monkeypatch.setattr(S, "_probe", lambda *a: pytest.fail("probed during a capture"))
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        S.cuda_backend_choice(torch.device("cuda", 0))


def test_no_driver_is_said_plainly(monkeypatch):
    monkeypatch.setattr(native, "driver_version", lambda: None)
    r = cli_info.report()
    assert r["nvidia_driver"] == "no NVIDIA driver / no GPU"
    assert r["cuda_device_reason"].startswith("no NVIDIA driver / no GPU")
    assert r["sampler_step_cuda"] == "none" and r["sampler_step_cuda_reason"] == "no NVIDIA driver / no GPU"
    buf = io.StringIO()
    cli_info.info(file=buf)
    text = buf.getvalue()
    assert "cudaErrorInsufficientDriver" not in text
    assert "sampler_step on CUDA   : none (no NVIDIA driver / no GPU)" in text


def test_driver_version_here():
    d = native.driver_version()
    if torch.cuda.is_available():
        assert d is not None and d["cuda"].count(".") == 1
    elif d is None:
        assert native.driver_text(d) == "no NVIDIA driver / no GPU"


@pytest.mark.gpu
def test_gpu_sampler_backend_probe_runs_the_chosen_backend():
    """On a GPU: a backend is chosen, the compiled one wherever the driver supports its
    runtime, and a step through the op (no backend forced) equals the C++ twin."""
    from xlx_fast.ops import sampler_step as S

    choice = S.cuda_backend_choice(torch.device("cuda"))
    assert choice.backend in ("compiled", "cupy"), choice.why
    driver = native.driver_version()
    runtime = native.build_info()["cuda_runtime"]
    if runtime and driver and driver["cuda"]:
        supported = tuple(map(int, driver["cuda"].split("."))) >= tuple(map(int, runtime.split(".")))
        assert (choice.backend == "compiled") == supported, choice.why
    buf = io.StringIO()
    cli_info.info(file=buf)
    assert f"sampler_step on CUDA   : {choice.backend} (" in buf.getvalue()
    gen = torch.Generator().manual_seed(11)
    n, d, b = 300, 40, 3
    table = torch.randn(n, d, generator=gen)
    mask_row = torch.randn(d, generator=gen)
    prob = torch.rand(b, S.CELLS, generator=gen)
    pred_id = torch.randint(0, n, (b, S.CELLS), generator=gen)
    count = torch.tensor([0, 20, 64], dtype=torch.int32)
    cpu = S.init_state(b, mask_row)
    S.sampler_step(prob, pred_id, cpu, table, mask_row, "mask_predict", count=count)
    gpu = S.init_state(b, mask_row.cuda())
    gpu.out.fill_(float("nan"))  # poisoned: every element must be written
    S.sampler_step(prob.cuda(), pred_id.cuda(), gpu, table.cuda(), mask_row.cuda(), "mask_predict",
                   count=count.cuda())
    for name in ("mask", "visited", "ids", "out", "status"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU twin of this test is "
                    "test_gpu_sampler_backend_probe_runs_the_chosen_backend")
def test_real_probes_on_this_machine_without_a_gpu(monkeypatch):
    """No mocks but the capture check (torch without CUDA cannot answer it): the compiled
    kernel's runtime cannot reach a driver here, exactly as on a machine whose driver is too old
    for the static runtime, and the choice says so instead of launching. (CI has no GPU, so it
    always runs there; on a GPU machine the probe succeeds and its GPU twin checks that.)"""
    from xlx_fast.ops import sampler_backends as S

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(S, "_CHOICES", {})
    compiled = S._probe(0, "compiled")
    assert compiled.ok is False
    if native.has_cuda_kernels():
        n, reason = native.cuda_device_count()
        assert n < 0 and reason in compiled.why and "cannot use this GPU" in compiled.why
    cupy = S._probe(0, "cupy")
    assert cupy.ok is False and cupy.why == native.cupy_status()[1]
    choice = S.cuda_backend_choice(torch.device("cuda", 0))
    assert choice.backend is None
    assert compiled.why in choice.why and cupy.why in choice.why
    assert native.driver_text(native.driver_version()) in choice.why
