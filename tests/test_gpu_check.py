"""benchmarks/gpu_check.sh checked on a machine without a GPU: it must go through every stage,
say plainly that there is no GPU, check its own plumbing (the smoke test ids exist, the GPU test
selection collects, the bench arguments parse, the profiler script runs), keep to 8 files in
$OUT and exit 0; a smoke id that does not exist must fail it loudly. The script gets one chance
on a GPU machine, so it must not be able to break unseen.

The script runs with CUDA_VISIBLE_DEVICES="" so that it takes its no-GPU path on any machine.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ("env", "build", "smoke", "gpu-tests", "gpu-tests-attention", "bench", "profile", "serving",
          "summary")
FILES = {"build.log", "smoke.log", "gpu-tests.log", "bench.log", "profile.txt", "serving.json",
         "summary.txt"}
BENCH_ORDER = ("sampler, codebook_head, nearest, attention, generation, model_forward, engine, training, "
               "answer, caption")


def run_script(out: Path, **extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), XLX_GPU_CHECK_SKIP_BUILD="1", XLX_PYTHON=sys.executable,
               CUDA_VISIBLE_DEVICES="", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # run from elsewhere: the script must find the repository by itself
    return subprocess.run(["bash", str(SCRIPT)], cwd=str(out.parent), env=env, capture_output=True,
                          text=True, timeout=400)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    return run_script(out), out


def test_bash_syntax():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_stage_budget_adds_up_to_under_8_minutes():
    """The limits the script uses are the ones its header documents, and with every kill grace
    they stay under 480 s."""
    text = SCRIPT.read_text()
    calls = re.findall(r"^stage ([\w-]+) (\d+) (\d+) ", text, flags=re.M)
    assert [c[0] for c in calls] == list(STAGES)
    total = sum(int(limit) + int(grace) for _, limit, grace in calls)
    assert total <= 480
    header = text.split("set -uo pipefail")[0]
    for name, limit, grace in calls:
        assert re.search(rf"#\s+{re.escape(name)}\s+{limit}\s+{grace}\s", header), name
    nominal = sum(int(limit) for _, limit, _ in calls)
    assert f"{nominal}  + {total - nominal} = {total} s" in header


def test_cpu_run_goes_through_every_stage(cpu_run):
    r, out = cpu_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert r.stdout.splitlines()[0].startswith("no GPU: ")
    for stage in STAGES:
        assert re.search(rf"^== {re.escape(stage)}: passed after \d+ s", r.stdout, flags=re.M), stage
    assert "== result: no GPU here" in r.stdout
    # a stage past its limit is killed and fails, so "passed" already means "within its limit";
    # the limits add up to under 8 minutes (test_stage_budget_adds_up_to_under_8_minutes). The
    # seconds this machine took are not asserted: a busy CPU stretches them.
    assert re.search(r"every stage passed in \d+ s", r.stdout)


def test_cpu_run_files_stay_within_the_limit(cpu_run):
    _, out = cpu_run
    names = {p.name for p in out.iterdir()}
    assert len(names) <= 8 and names <= FILES | {n for n in names if n.endswith("-quick.json")}
    assert all(p.is_file() for p in out.iterdir())  # flat: nothing a folder deep
    summary = (out / "summary.txt").read_text()
    for stage in STAGES[:-1]:
        assert f"== {stage}: passed" in summary


def test_cpu_run_checked_its_plumbing(cpu_run):
    _, out = cpu_run
    smoke = (out / "smoke.log").read_text()
    n_smoke = int(re.search(r"no GPU: (\d+) smoke tests collected, not run", smoke).group(1))
    assert n_smoke >= 7  # every id collected (one of them parametrized into many)
    tests = (out / "gpu-tests.log").read_text()
    counts = [int(n) for n in re.findall(r"no GPU: (\d+) GPU tests collected, not run", tests)]
    assert len(counts) == 2 and all(n > 0 for n in counts)
    bench = (out / "bench.log").read_text()
    assert f"families in this order: {BENCH_ORDER}" in bench
    assert "generate[B=1 MP-4|fp32|cpu]" in bench
    profile = (out / "profile.txt").read_text()
    assert "B=1 eager" in profile and "B=2 eager" in profile and "CPU ops per step" in profile
    env = (out / "build.log").read_text()  # env's report opens the build log
    for name in ("python3", "nvcc", "torch", "triton", "transformers", "GPU: none"):
        assert name in env, name
    assert "no GPU: the serving benchmark runs at the tiny size" in bench
    serving = json.loads((out / "serving.json").read_text())
    assert set(serving["modes"]["inproc"]) == {"step", "request"}
    assert "serving (cpu, 2 slots):" in (out / "summary.txt").read_text()


def test_a_missing_smoke_id_fails_loudly(tmp_path):
    r = run_script(tmp_path / "out", XLX_GPU_CHECK_STAGES="smoke",
                   XLX_GPU_CHECK_SMOKE_IDS="tests/test_native.py::test_bash_syntax_does_not_exist "
                                           "tests/test_native.py::test_info_cli")
    assert r.returncode == 1
    assert re.search(r"^== smoke: FAILED", r.stdout, flags=re.M)
    assert "SMOKE IDS DO NOT COLLECT" in r.stdout and "SOME STAGES FAILED" in r.stdout
    assert "not found" in (tmp_path / "out" / "smoke.log").read_text()


def test_profile_lists_the_host_side_by_self_time():
    """The profile's host table (printed for GPU traces) ranks calls by self CPU time: a large
    matrix product outranks a small addition traced with it."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("profile_generate", ROOT / "benchmarks" / "profile_generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a, b = torch.randn(512, 512), torch.randn(3)
    events, wall_ms = mod.trace(lambda: (a @ a @ a, b + 1), on_gpu=False)
    lines = mod.host_lines(events, top=50)
    assert lines[0].startswith("  host: ") and wall_ms > 0
    names = [line.split("calls  ")[1] for line in lines[1:]]
    assert names.index("aten::mm") < names.index("aten::add")
