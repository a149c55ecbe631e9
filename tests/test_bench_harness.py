"""The benchmark machinery itself: agreement checks, rows, JSON schema, ceilings, the CLI.

Nothing here asserts on a timing: the CPU is shared and noisy. What matters is that a fast path
that disagrees fails loudly, that a missing one is reported as missing, and that a run writes a
valid JSON and a PNG.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from xlx_fast.bench import ceilings, harness, machine, report
from xlx_fast.bench import cases as bench_cases

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
MACHINE = {"device_name": "test-cpu", "torch": torch.__version__, "triton": "x"}
CEILINGS = {"matmul_tflops": {"fp32": 1.0}, "copy_gbps": 10.0, "matmul_n": 8, "copy_bytes": 8,
            "fp32_matmul_precision": "highest"}


def toy_case(backends: dict, kinds: dict | None = None, ids: bool = False) -> harness.Case:
    """reference: 2·x (or its argmax ids); backends given as name -> callable or NotAvailable."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    kinds = kinds or {name: harness.FAST for name in backends}

    def build():
        if ids:
            return harness.Prepared(reference=lambda: (2 * x).argmax(1),
                                    backends={k: (v if isinstance(v, harness.NotAvailable) else (lambda v=v: v(x)))
                                              for k, v in backends.items()},
                                    compare=lambda ref, out, _n: harness.ids_agree(out, ref))
        return harness.Prepared(reference=lambda: 2 * x,
                                backends={k: (v if isinstance(v, harness.NotAvailable) else (lambda v=v: v(x)))
                                          for k, v in backends.items()},
                                compare=lambda ref, out, _n: harness.close(out, ref, torch.float32))

    return harness.Case(op="toy", shape="64x16", dtype=torch.float32, device=CPU, backends=kinds,
                        build=build, flops=2.0 * 64 * 16, bound="compute")


def test_agreeing_fast_path_passes_and_gets_a_row():
    case = toy_case({"good": lambda x: x + x})
    rows = harness.run_case(case, CEILINGS, MACHINE, harness.SMOKE)
    assert len(rows) == 1
    row = rows[0]
    assert row["backend"] == "good" and row["kind"] == "fast"
    assert row["fast_ms"] > 0 and row["reference_ms"] > 0 and row["speedup"] > 0
    assert row["max_error"] == 0.0 and row["agreement_metric"] == "rel err"
    assert row["pct_of_ceiling"] is not None


def test_wrong_fast_path_fails_loudly():
    case = toy_case({"good": lambda x: x + x, "bad": lambda x: 2 * x + 1e-3})
    with pytest.raises(harness.AgreementError, match="'bad' disagrees"):
        harness.run_case(case, CEILINGS, MACHINE, harness.SMOKE)


def test_wrong_ids_fail_loudly():
    case = toy_case({"bad": lambda x: (2 * x).argmin(1)}, ids=True)
    with pytest.raises(harness.AgreementError, match="id agree"):
        harness.run_case(case, CEILINGS, MACHINE, harness.SMOKE)


def test_ids_must_be_equal_where_decided():
    ref = torch.tensor([1, 2, 3, 4])
    out = torch.tensor([1, 2, 3, 5])
    assert not harness.ids_agree(out, ref, min_share=0.5, decided=torch.tensor([0, 0, 0, 1], dtype=torch.bool)).ok
    assert harness.ids_agree(out, ref, min_share=0.5, decided=torch.tensor([1, 1, 1, 0], dtype=torch.bool)).ok


def test_crashing_fast_path_raises_but_crashing_peer_is_reported():
    def boom(x):
        raise RuntimeError("kernel exploded")

    with pytest.raises(RuntimeError, match="kernel exploded"):
        harness.run_case(toy_case({"fast": boom}), CEILINGS, MACHINE, harness.SMOKE)
    rows = harness.run_case(toy_case({"fast": lambda x: x * 2, "peer": boom},
                                     {"fast": harness.FAST, "peer": harness.PEER}),
                            CEILINGS, MACHINE, harness.SMOKE)
    peer = [r for r in rows if r["backend"] == "peer"][0]
    assert peer["fast_ms"] is None and "kernel exploded" in peer["note"]


def test_inexact_peer_is_timed_and_flagged_not_raised():
    rows = harness.run_case(toy_case({"fast": lambda x: x * 2, "peer": lambda x: 2 * x + 1e-3},
                                     {"fast": harness.FAST, "peer": harness.PEER}),
                            CEILINGS, MACHINE, harness.SMOKE)
    peer = [r for r in rows if r["backend"] == "peer"][0]
    assert peer["fast_ms"] is not None and "outside the bound" in peer["note"]
    assert "OUTSIDE BOUND" in report.format_table(rows)


def test_missing_fast_path_is_a_row_that_says_so():
    case = toy_case({"xlx_fast": harness.not_implemented("xlx_fast/ops/toy.py")})
    (row,) = harness.run_case(case, CEILINGS, MACHINE, harness.SMOKE)
    assert row["fast_ms"] is None and row["speedup"] is None
    assert row["note"].startswith("n/a — not implemented")
    assert "n/a — not implemented" in report.format_table([row])


def test_fast_module_missing_is_none_but_broken_raises(tmp_path, monkeypatch):
    pkg = tmp_path / "benchpkg_for_tests"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "broken.py").write_text("raise ImportError('a dependency is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert harness.fast_module("benchpkg_for_tests.not_there") is None
    assert harness.fast_module("no_such_top_level_package.x") is None
    with pytest.raises(ImportError, match="dependency is missing"):
        harness.fast_module("benchpkg_for_tests.broken")


def test_ceilings_present_and_positive():
    c = ceilings.measure(CPU, (torch.float32, torch.bfloat16), size="tiny", plan=harness.SMOKE)
    assert set(c["matmul_tflops"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in c["matmul_tflops"].values())
    assert set(c["matmul_n"]) == {"fp32", "bf16"} and all(64 <= n <= 128 for n in c["matmul_n"].values())
    assert c["copy_gbps"] > 0 and c["copy_bytes"] > 0
    assert ("bf16" in c["not_ceilings"]) != machine.native_bf16()[0]


def test_ceiling_size_follows_the_probe_rate():
    # a 256^3 product (33.5 MFLOP) in 0.1 s is 0.34 GFLOP/s (emulated bf16): a 0.1 s call is
    # then n = (0.34e9 * 0.1 / 2)^(1/3) = 256; at 100 GFLOP/s it is 1710 -> 1664 (multiple of 64)
    assert ceilings.matmul_n(0.1, 2048, 256, 0.1) == 256
    assert ceilings.matmul_n(0.1, 2048, 256, 2 * 256 ** 3 / 100e9) == 1664
    assert ceilings.matmul_n(0.1, 2048, 256, 1e-7) == 2048  # capped
    assert ceilings.matmul_n(0.1, 2048, 256, 100.0) == 64  # floor


def test_emulated_bf16_ceiling_is_sized_by_its_probe(monkeypatch):
    """The bf16 ceiling is sized by its probe, so that even where bf16 is emulated it takes about
    a second, not minutes: each timed product is sized to a tenth of the budget at the probe's
    rate (test_ceiling_size_follows_the_probe_rate checks that arithmetic), and its repetitions
    stop at the budget. Checked by structure: a clock on a shared machine proves nothing."""
    sized, plans = [], []
    real_matmul_n, real_time_ms = ceilings.matmul_n, ceilings.time_ms

    def matmul_n(*args):
        sized.append((args, real_matmul_n(*args)))
        return sized[-1][1]

    def time_ms(fn, device, plan, **kwargs):
        plans.append(plan)
        return real_time_ms(fn, device, plan, **kwargs)

    monkeypatch.setattr(ceilings, "matmul_n", matmul_n)
    monkeypatch.setattr(ceilings, "time_ms", time_ms)
    c = ceilings.measure(CPU, (torch.bfloat16,), plan=harness.QUICK, seconds=1.0)
    ((args, n),) = sized
    assert args[0] == pytest.approx(0.1) and args[1] == 2048 and c["matmul_n"]["bf16"] == n
    assert len(plans) == 2 and all(p.budget_s <= 1.0 and p.min_reps == 2 for p in plans)
    assert c["matmul_tflops"]["bf16"] > 0


def test_native_bf16_detection_reads_the_flags():
    assert machine.native_bf16({"fpu", "avx2", "avx512f", "avx512_bf16"}) == (True, "CPU has avx512_bf16")
    assert machine.native_bf16({"amx_bf16", "avx512_bf16"})[0]
    ok, why = machine.native_bf16({"fpu", "avx2", "avx512f"})
    assert not ok and "avx512_bf16" in why and "emulated" in why
    assert not machine.native_bf16(set())[0]  # unknown flags: taken as emulated
    flags = machine.cpu_flags()
    assert machine.native_bf16()[0] == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert ceilings.not_ceilings(CPU, (torch.bfloat16,), {"avx2"}) == {"bf16": machine.native_bf16({"avx2"})[1]}
    assert ceilings.not_ceilings(CPU, (torch.bfloat16,), {"avx512_bf16"}) == {}
    assert ceilings.not_ceilings(CPU, (torch.float32,), {"avx2"}) == {}


def test_machine_info_names_versions_and_build():
    info = machine.info(CPU)
    for key in ("cpu", "device_name", "torch", "triton", "xlx_fast", "xlx_fast_native", "date"):
        assert info[key], key
    assert machine.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_json_schema_round_trip(tmp_path):
    rows = harness.run_case(toy_case({"good": lambda x: x + x}), CEILINGS, MACHINE, harness.SMOKE)
    rows += harness.run_case(toy_case({"xlx_fast": harness.not_implemented("toy")}), CEILINGS, MACHINE,
                             harness.SMOKE)
    doc = report.document(machine.info(CPU), CEILINGS, {"quick": True}, harness.add_comparisons(rows),
                          [], complete=True)
    path = report.write_json(doc, tmp_path / "r.json")
    raw = json.loads(path.read_text())  # strict JSON
    assert raw["schema"] == report.SCHEMA
    loaded = report.load(path)
    assert len(loaded["rows"]) == 2
    for row in loaded["rows"]:
        assert set(report.ROW_KEYS) <= set(row)
    broken = dict(raw, rows=[{k: v for k, v in raw["rows"][0].items() if k != "speedup"}])
    with pytest.raises(ValueError, match="speedup"):
        report.validate(broken)
    report.plot(loaded, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0


def test_case_families_enumerate_without_building():
    spec = harness.Spec(device=CPU, dtypes=(torch.float32, torch.bfloat16), quick=True)
    for family in bench_cases.FAMILIES:
        found = bench_cases.cases(family, spec)
        assert found, family
        assert all(isinstance(c, harness.Case) and c.backends for c in found)
    with pytest.raises(ValueError, match="unknown op family"):
        bench_cases.cases("softmax", spec)


@pytest.mark.parametrize("family", ["attention", "model_forward", "nearest", "kmeans", "codebook_head",
                                    "sampler"])
def test_op_cases_agree_at_tiny_size(family):
    spec = harness.Spec(device=CPU, dtypes=(torch.float32, torch.bfloat16), quick=True, size="tiny")
    try:
        for case in bench_cases.cases(family, spec)[:2]:
            rows = harness.run_case(case, CEILINGS, MACHINE, harness.SMOKE)
            assert {r["backend"] for r in rows} == set(case.backends)
    finally:
        bench_cases.release(family)


def test_generation_case_at_tiny_size():
    spec = harness.Spec(device=CPU, dtypes=(torch.float32, torch.bfloat16), quick=True, size="tiny")
    try:
        found = bench_cases.cases("generation", spec)
        for case in (found[0], found[1]):  # B=1 fp32, then bf16 (compared with the fp32 ids too)
            rows = harness.run_case(case, CEILINGS, MACHINE, harness.SMOKE)
            (row,) = [r for r in rows if r["backend"] == "xlx_fast.generate"]
            assert row["id_agreement"] is not None or row["note"].startswith("n/a")
        assert "fp32-ref agree" in row["agreement_extra"] or row["note"]
    finally:
        bench_cases.release("generation")


def test_generation_rows_on_finer_grids_in_the_full_sweep_only():
    full = harness.Spec(device=CPU, dtypes=(torch.float32,), quick=False, size="tiny")
    quick = harness.Spec(device=CPU, dtypes=(torch.float32,), quick=True, size="tiny")
    try:
        found = bench_cases.cases("generation", full)
        shapes = [c.shape for c in found]
        assert "B=1 MP-4 16x16" in shapes and "B=1 MP-4 32x32" in shapes
        assert not [c for c in bench_cases.cases("generation", quick) if "x" in c.shape.split()[-1]]
        case = found[shapes.index("B=1 MP-4 16x16")]
        rows = harness.run_case(case, CEILINGS, MACHINE, harness.SMOKE)
        (row,) = [r for r in rows if r["backend"] == "xlx_fast.generate"]
        assert row["shape"] == "B=1 MP-4 16x16" and row["agreement_ok"], row
    finally:
        bench_cases.release("generation")
    from xlx_fast.bench.cases import generation

    assert generation.FINE_BATCHES == {"cpu": (1, 8), "cuda": (1, 64)}


@pytest.mark.parametrize("family", ["model_forward", "generation"])
def test_the_compiled_reference_is_a_timed_peer_of_whole_model_rows(family):
    # the full sweep times the reference under torch.compile beside xlx_fast, and the fast row
    # names it as the best peer; --quick on a CPU lists it with the reason it was not run
    spec = harness.Spec(device=CPU, dtypes=(torch.float32,), quick=False, size="tiny")
    quick = harness.Spec(device=CPU, dtypes=(torch.float32,), quick=True, size="tiny")
    try:
        case = bench_cases.cases(family, spec)[0]
        rows = {r["backend"]: r for r in harness.add_comparisons(
            harness.run_case(case, CEILINGS, MACHINE, harness.SMOKE))}
        peer = rows["torch.compile(reference)"]
        assert peer["kind"] == harness.PEER and peer["fast_ms"] > 0
        assert peer["note"].startswith("mode='max-autotune'") and "first call (compile + run)" in peer["note"]
        # both fast rows' models are frozen (packed CPU GEMMs): their peers compile with
        # freezing=True, the same promise of constant weights, and the fast rows say so
        from xlx_fast.ops import frozen_weights

        assert ("freezing=True" in peer["note"]) == frozen_weights.available()
        assert peer["agreement_ok"] and "OUTSIDE" not in report.agreement_text(peer)  # a note, not a miss
        (fast,) = [r for r in rows.values() if r["kind"] == harness.FAST]
        assert fast["best_peer"] == "torch.compile(reference)" and fast["speedup_vs_best_peer"] > 0
        assert "weights frozen (xlx_fast.freeze)" in fast["note"]
        quick_case = bench_cases.cases(family, quick)[0]
        assert "torch.compile(reference)" in quick_case.backends
        skipped = quick_case.prepare().backends["torch.compile(reference)"]
        assert isinstance(skipped, harness.NotAvailable) and "--quick" in skipped.reason
    finally:
        bench_cases.release(family)


def test_cli_quick_tiny_writes_json_and_png(tmp_path, capsys):
    from xlx_fast.cli import main

    rc = main(["bench", "--quick", "--size", "tiny", "--ops", "attention,sampler", "--dtype", "fp32",
               "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.with_suffix(".png").exists()
    doc = report.load(json_path)
    assert doc["complete"] and not doc["failures"]
    assert {r["op"] for r in doc["rows"]} == {"attention", "sampler_step"}
    assert doc["settings"]["ops"] == ["attention", "sampler"]
    assert {"loadavg_start", "loadavg_end", "process_cpu_s", "wall_s", "busy"} <= set(doc["machine"]["load"])
    captured = capsys.readouterr()
    assert "speedup" in captured.out and "attention" in captured.out
    # not a terminal: one progress line per case (with its time), no carriage-return bar
    progress = [line for line in captured.err.splitlines() if line.startswith("[")]
    n_cases = len({(r["op"], r["shape"], r["dtype"]) for r in doc["rows"]})
    assert len(progress) == n_cases and progress[-1].startswith(f"[{n_cases}/{n_cases}] ")
    assert "\r" not in captured.err


def _meter(load_start, load_end, cpu_s, wall_s, threads=2, cores=2, device_type="cpu"):
    loads, clock, cpu_clock = iter([load_start, load_end]), iter([0.0, wall_s]), iter([0.0, cpu_s])
    return machine.LoadMeter(device_type, threads=threads, cpu_count=cores, getloadavg=lambda: next(loads),
                             clock=lambda: next(clock), cpu_clock=lambda: next(cpu_clock))


def test_load_record_says_when_the_machine_was_busy():
    quiet = _meter([0.3, 0.2, 0.1], [1.9, 1.2, 0.5], cpu_s=35.0, wall_s=20.0).record()
    assert quiet["cores_used"] == 1.75 and quiet["busy"] == [] and machine.busy_warning(quiet) is None
    for key in ("loadavg_start", "loadavg_end", "cpu_count", "threads", "process_cpu_s", "wall_s"):
        assert key in quiet
    loaded = _meter([6.0, 5.0, 4.0], [7.5, 6.0, 4.0], cpu_s=8.0, wall_s=20.0).record()
    assert len(loaded["busy"]) == 2
    assert "load average of other work 7.1 on 2 cores" in loaded["busy"][0]
    assert "got 0.40 CPUs on average for the 2 threads" in loaded["busy"][1]
    warning = machine.busy_warning(loaded)
    assert warning.startswith("warning: the machine was busy") and "\n" not in warning
    # this process's own load is not the others': 2 threads busy on 2 cores is a quiet machine
    assert _meter([0.5, 0.5, 0.5], [2.6, 2.0, 1.0], cpu_s=39.0, wall_s=20.0).record()["busy"] == []
    # a GPU run waits for its device: only others' load counts there
    assert _meter([0.1] * 3, [0.4] * 3, cpu_s=2.0, wall_s=20.0, device_type="cuda").record()["busy"] == []
    assert _meter(None, None, cpu_s=30.0, wall_s=20.0).record()["busy"] == []  # no load averages here


def test_cli_records_the_load_and_warns_when_the_machine_is_busy(tmp_path, capsys, monkeypatch):
    import os

    from xlx_fast.cli import main

    busy = float(4 * (os.cpu_count() or 1))
    monkeypatch.setattr(machine, "load_average", lambda: [busy, busy, busy])
    monkeypatch.setattr(ceilings, "measure", lambda *a, **k: dict(CEILINGS))
    rc = main(["bench", "--quick", "--size", "tiny", "--ops", "sampler", "--dtype", "fp32",
               "--device", "cpu", "--no-plot", "--out", str(tmp_path)])
    assert rc == 0
    (json_path,) = tmp_path.glob("*.json")
    load = report.load(json_path)["machine"]["load"]
    assert load["loadavg_start"] == [busy] * 3 and load["loadavg_end"] == [busy] * 3
    assert load["process_cpu_s"] > 0 and load["wall_s"] > 0 and load["cpu_count"] == os.cpu_count()
    assert any("load average of other work" in reason for reason in load["busy"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "busy while timing" in warnings[0]


@pytest.mark.parametrize("argv,message", [
    (["--ops", "softmax"], "error: unknown --ops softmax; choose from"),
    (["--ops", ""], "error: --ops names no op family"),
    (["--ops", ",", " "], "error: --ops names no op family"),
    (["--dtype", "fp64"], "error: unknown --dtype fp64"),
    (["--dtype", ""], "error: unknown --dtype (none)"),
    (["--out", "FILE"], "is a file, not a directory"),
    (["--out", "FILE/sub"], "is a file, not a directory"),
    # /proc takes no new entry even from root (for whom access() says writable): refused up
    # front, not after the sweep
    (["--out", "/proc/xlx-fast-out"], "cannot create anything in /proc"),
])
def test_cli_rejects_bad_arguments_before_measuring(argv, message, tmp_path, capsys, monkeypatch):
    from xlx_fast.cli import main

    measured = []
    monkeypatch.setattr(ceilings, "measure", lambda *a, **k: measured.append(a))
    (tmp_path / "FILE").write_text("x")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    assert main(["bench", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not measured


def test_cli_dry_run_lists_cases_in_the_order_of_ops(capsys, monkeypatch, tmp_path):
    from xlx_fast.cli import main

    monkeypatch.setattr(ceilings, "measure", lambda *a, **k: pytest.fail("dry run measured"))
    assert main(["bench", "--quick", "--dry-run", "--device", "cpu", "--dtype", "fp32",
                 "--ops", "sampler,nearest", "attention", "--out", str(tmp_path / "new" / "out")]) == 0
    assert list(tmp_path.iterdir()) == []  # --out was probed (a directory made and removed), not made
    lines = capsys.readouterr().out.strip().splitlines()
    assert "families in this order: sampler, nearest, attention" in lines[0]
    ops = [line.split("[")[0] for line in lines[1:]]
    assert ops == sorted(ops, key=["sampler_step", "nearest", "attention"].index) and len(set(ops)) == 3
    assert all("|fp32|cpu]" in line for line in lines[1:])


def test_quick_sweep_leaves_whole_workloads_out_unless_asked(capsys, monkeypatch):
    from xlx_fast.cli import main

    monkeypatch.setattr(ceilings, "measure", lambda *a, **k: pytest.fail("dry run measured"))
    assert main(["bench", "--quick", "--dry-run", "--device", "cpu", "--dtype", "fp32"]) == 0
    captured = capsys.readouterr()
    ops = {line.split("[")[0] for line in captured.out.strip().splitlines()[1:]}
    assert "generate" in ops and not ops & {"engine", "training_step", "training_loss_head"}
    assert any("engine, training left out" in line for line in captured.err.splitlines())
    assert main(["bench", "--quick", "--dry-run", "--device", "cpu", "--dtype", "fp32",
                 "--ops", "engine"]) == 0
    ops = {line.split("[")[0] for line in capsys.readouterr().out.strip().splitlines()[1:]}
    assert ops == {"engine"}


@pytest.mark.parametrize("native", [True, False])
def test_cli_skips_bf16_by_default_only_where_it_is_emulated(native, capsys, monkeypatch):
    from xlx_fast.cli import main

    flags = {"avx2", "avx512_bf16"} if native else {"avx2"}
    real = machine.native_bf16
    monkeypatch.setattr(machine, "native_bf16", lambda flags_=None: real(flags if flags_ is None else flags_))
    assert main(["bench", "--quick", "--dry-run", "--device", "cpu", "--ops", "sampler"]) == 0
    captured = capsys.readouterr()
    has_bf16 = any("|bf16|" in line for line in captured.out.splitlines())
    assert has_bf16 == native
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    if native:
        assert not notes
    else:  # one line saying why, and how to run them anyway
        assert len(notes) == 1 and "bf16 cases skipped" in notes[0] and "--dtype bf16" in notes[0]
    # asked for explicitly, bf16 runs either way
    assert main(["bench", "--quick", "--dry-run", "--device", "cpu", "--ops", "sampler",
                 "--dtype", "fp32", "bf16"]) == 0
    assert any("|bf16|" in line for line in capsys.readouterr().out.splitlines())


def _row(**over):
    row = dict.fromkeys(report.ROW_KEYS)
    row.update(op="nearest", shape="N=262144 K=10000 D=2048", dtype="bf16", backend="xlx_fast",
               kind="fast", reference_ms=12.5, fast_ms=3.25, speedup=3.85, agreement_metric="id agree",
               id_agreement=0.9999, agreement_extra={}, note="", bound="compute", pct_of_ceiling=42.0)
    row.update(over)
    return row


def test_table_fits_120_columns_and_hides_percentages_of_non_ceilings():
    long_rows = [
        _row(),
        _row(pct_of_ceiling=42456.0),  # above 100%: not a ceiling
        _row(dtype="fp32", pct_of_ceiling=55.0, pct_of_same_gemm=97.0, best_peer="faiss IndexFlatL2",
             speedup_vs_best_peer=1.234, speedup_vs_fp32_reference=0.8),
        _row(op="model_forward", shape="B=64 Lt=20 Lv=64 H=768 layers=9/5/5", backend="xlx_fast.optimize",
             agreement_metric="rel err", max_error=1.2e-3, id_agreement=None,
             agreement_extra={"language err": 1e-3, "vision err": 2e-3, "cross err": 3e-3}),
        _row(fast_ms=None, speedup=None, note="n/a — " + "a very long reason why this backend cannot run " * 3),
    ]
    ceil = {"matmul_tflops": {"fp32": 0.104, "bf16": 0.00029}, "matmul_n": {"fp32": 2048, "bf16": 192},
            "copy_gbps": 10.0, "copy_bytes": 1, "fp32_matmul_precision": "highest",
            "not_ceilings": {"bf16": "CPU has neither avx512_bf16 nor amx_bf16: bf16 arithmetic is emulated"}}
    text = report.format_table(long_rows, ceil)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, text
    # header, rule, a heading per op (nearest, model_forward, nearest again), the rows, ceilings
    assert len(lines) == 2 + 3 + len(long_rows) + len(report.ceilings_lines(ceil))
    assert lines[2] == "nearest" and lines[6] == "model_forward"
    rows = [line for line in lines if line.startswith("  N=") or line.startswith("  B=")]
    assert len(rows) == len(long_rows)
    assert "% mm" not in rows[0]  # bf16 emulated: no share of that "ceiling"
    assert "42456" not in text and "% mm" not in rows[1]  # above 100%: no ceiling either
    assert "55% mm" in rows[2] and "97% gemm" in rows[2] and "3.85x" in rows[2]
    assert "n/a — a very long reason" in rows[4] and rows[4].endswith("…")
    assert "not a ceiling" in text
    # where bf16 is native the same row's share is printed
    assert "42% mm" in report.format_table([_row()], dict(ceil, not_ceilings={}))


def _render_module():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "benchmarks" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_results_fills_the_readme_between_markers(tmp_path):
    render = _render_module()
    results = tmp_path / "results"
    results.mkdir()
    rows = harness.run_case(toy_case({"good": lambda x: x + x}), CEILINGS, MACHINE, harness.SMOKE)
    report.write_json(report.document(machine.info(CPU), CEILINGS, {"quick": True}, rows, [], True),
                      results / "test-cpu-2000-01-01.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{render.BEGIN}\nold\n{render.END}\n\nafter\n")
    assert render.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert "old" not in text and "before" in text and "after" in text
    assert "| toy | 64x16 | fp32 | good |" in text
    assert render.main(["--readme", str(readme), "--results", str(results), "--check"]) == 0
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="markers"):
        render.main(["--readme", str(readme), "--results", str(results)])


def test_render_results_shows_the_newest_full_size_run_of_each_family(tmp_path):
    render = _render_module()
    results = tmp_path / "results"
    results.mkdir()
    rows = harness.run_case(toy_case({"good": lambda x: x + x}), CEILINGS, MACHINE, harness.SMOKE)

    def write(name, date, ops, size="base"):
        info = dict(machine.info(CPU), date=date)
        settings = {"quick": True, "ops": ops, "size": size}
        report.write_json(report.document(info, CEILINGS, settings, rows, [], True), results / name)

    write("a-old.json", "2000-01-01T00:00:00", ["generation"])
    write("a-new.json", "2000-02-01T00:00:00", ["generation"])
    write("b.json", "2000-01-15T00:00:00", ["engine"])
    write("c-tiny.json", "2000-03-01T00:00:00", ["engine"], size="tiny")
    readme = tmp_path / "README.md"
    readme.write_text(f"{render.BEGIN}\nold\n{render.END}\n")
    assert render.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert "a-new.json" in text and "b.json" in text
    assert "a-old.json" not in text and "c-tiny.json" not in text
    assert text.index("b.json") < text.index("a-new.json")  # ordered by family name


def test_render_results_shows_the_newest_serving_run_of_each_kind(tmp_path):
    render = _render_module()
    serving = tmp_path / "serving"
    serving.mkdir()

    def write(name, device, time, size="base", modes=("inproc",), schedulers=("step", "request")):
        meta = {"device": device, "time": time, "model": {"size": size}}
        per = {p: [] for p in schedulers}
        (serving / name).write_text(json.dumps({"meta": meta, "modes": {m: per for m in modes}}))

    write("cpu-old.json", "cpu", "2000-01-01T00:00:00Z")
    write("cpu-new.json", "cpu", "2000-02-01T00:00:00Z")
    write("cuda.json", "cuda", "2000-01-15T00:00:00Z")
    write("cuda-tiny.json", "cuda", "2000-03-01T00:00:00Z", size="tiny")
    write("cpu-both.json", "cpu", "2000-01-10T00:00:00Z", modes=("http", "inproc"))
    write("cpu-three.json", "cpu", "2000-01-05T00:00:00Z", schedulers=("step", "request", "sequential"))
    (serving / "broken.json").write_text("{")
    shown = [path.name for path, _ in render.latest_serving(serving)]
    # one per device, modes and schedulers
    assert shown == ["cpu-both.json", "cpu-three.json", "cpu-new.json", "cuda.json"]
    assert render.latest_serving(tmp_path / "none") == []


def test_render_serving_links_the_plot_beside_the_results(tmp_path):
    render = _render_module()
    committed = sorted((render.ROOT / "benchmarks/results/serving").glob("cpu-*-serving.json"))[-1]
    path = tmp_path / "run.json"
    path.write_text(committed.read_text())
    result = json.loads(path.read_text())
    assert "![" not in render.render_serving(path, result, root=tmp_path)
    path.with_suffix(".png").write_bytes(b"png")
    assert "![latency and throughput against offered load](run.png)" in render.render_serving(
        path, result, root=tmp_path)
    # and every committed full-size serving run has its plot committed beside it
    for run in (render.ROOT / "benchmarks/results/serving").glob("*.json"):
        if json.loads(run.read_text())["meta"]["model"].get("size", "base") == "base":
            assert run.with_suffix(".png").is_file(), run.name


def test_committed_readme_is_rendered_from_committed_results():
    render = _render_module()
    assert render.main(["--check"]) == 0, "run: python benchmarks/render_results.py"


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["attention", "model_forward", "nearest", "codebook_head", "sampler",
                                    "generation"])
def test_cases_agree_on_cuda_at_tiny_size(family):
    """The CUDA side of the harness: do_bench timing, ceilings, every fast backend and peer."""
    cuda = torch.device("cuda")
    spec = harness.Spec(device=cuda, dtypes=(torch.float32, torch.bfloat16), quick=True, size="tiny")
    ceil = ceilings.measure(cuda, spec.dtypes, size="tiny", plan=harness.SMOKE)
    assert all(v > 0 for v in ceil["matmul_tflops"].values()) and ceil["copy_gbps"] > 0
    info = machine.info(cuda)
    try:
        for case in bench_cases.cases(family, spec)[:2]:
            rows = harness.run_case(case, ceil, info, harness.SMOKE)
            assert all(r["note"].startswith("n/a") or r["fast_ms"] > 0 for r in rows)
    finally:
        bench_cases.release(family)


def test_a_quick_gpu_sweep_compiles_the_bf16_generate_rows_only():
    from xlx_fast.bench.cases import compiled

    quick = harness.Spec(device="cuda", dtypes=(torch.float32, torch.bfloat16), quick=True)
    assert compiled.unavailable(quick, "generate", torch.bfloat16) is None
    assert compiled.mode(quick) == "reduce-overhead"
    for op, dtype in (("generate", torch.float32), ("model_forward", torch.bfloat16)):
        assert "--quick compiles the bf16 generate rows only" in compiled.unavailable(quick, op, dtype).reason
    full = harness.Spec(device="cuda", dtypes=(torch.float32,), quick=False)
    assert compiled.unavailable(full, "model_forward", torch.float32) is None
    assert compiled.mode(full) == "max-autotune"
