"""``xlx-fast bench``: reference vs xlx_fast, side by side, on this machine.

Runs the case definitions of :mod:`xlx_fast.bench.cases` (the same ones ``pytest benchmarks/``
runs), after measuring the device's matmul and copy ceilings, and writes under ``--out``:

- ``<device>-<date>[-quick].json``: machine, ceilings, settings and one row per backend and case
  (rewritten after every case, so an interrupted sweep still leaves its rows);
- ``<device>-<date>[-quick].png``: speed-ups per op and shape, drawn from that JSON;

then prints the table. Exits non-zero if any case failed (a fast path that disagrees with the
reference or crashes): its error is printed and recorded under ``failures`` in the JSON.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback

from ..archs import ARCHS


def _families():
    from xlx_fast.bench.cases import FAMILIES

    return list(FAMILIES)


# Whole workloads (minutes each on a CPU): in the full sweep, or asked for by --ops; the quick
# sweep (the README's main command, about two minutes on a 2-core CPU) leaves them out.
WORKLOADS = ("engine", "training")


class UsageError(ValueError):
    """A bad command line: printed as one ``error:`` line, exit status 2, before any measuring."""


def add_parser(p: argparse.ArgumentParser) -> None:
    families = _families()
    p.add_argument("--quick", action="store_true",
                   help="a short sweep (a few shapes per op, no whole-workload families "
                        f"({', '.join(WORKLOADS)}) unless --ops names them; about 2 minutes on a "
                        "2-core CPU)")
    p.add_argument("--ops", nargs="+", metavar="OP", default=None,
                   help=f"op families to run, in this order (default: all): {', '.join(families)}; "
                        "comma-separated lists work too")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--dtype", nargs="+", metavar="DTYPE", default=None,
                   help="dtypes: fp32, bf16, fp16 (default: fp32 bf16; on a CPU without native "
                        "bf16 arithmetic only fp32, unless bf16 is asked for here)")
    p.add_argument("--arch", choices=["all", *ARCHS], default="all",
                   help="which architectures' generate rows run (default all: X-LXMERT's, and in "
                        "the full sweep X-UNITER's); the other families time X-LXMERT's ops")
    p.add_argument("--out", default="bench-out", metavar="DIR",
                   help="directory for the JSON and PNG (default: ./bench-out)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--dry-run", action="store_true",
                   help="check the arguments, list the cases that would run, and exit")
    # Shrinks every case to the tiny model's dimensions: for tests of the benchmark machinery.
    p.add_argument("--size", choices=["base", "tiny"], default="base", help=argparse.SUPPRESS)


def _split(values) -> list[str]:
    out = []
    for v in values:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def _check_out(path: str) -> None:
    """--out must be a directory, or creatable as one: checked before anything is measured."""
    from pathlib import Path

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path} is a file, not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: {parent} is not writable")
    # access() says yes to root everywhere, and some file systems (/proc) refuse every new entry:
    # make one there and remove it, so that the sweep's results never meet a refusal at its end
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".xlx-fast-out-", dir=parent))
    except OSError as e:
        raise UsageError(f"--out {path}: cannot create anything in {parent} ({e.strerror})") from None


def parse_selection(args):
    """(device, dtypes, families, notes) from the arguments; raises UsageError.

    families keep the order given by --ops (the sweep runs them in that order). notes are
    one-line reasons for what the defaults left out (bf16 on a CPU that only emulates it).
    """
    import torch

    from xlx_fast.bench import machine
    from xlx_fast.bench.harness import DTYPES

    families = _families()
    if args.ops is not None:
        ops = list(dict.fromkeys(_split(args.ops)))
        if not ops:
            raise UsageError(f"--ops names no op family; choose from {', '.join(families)}")
        unknown = [o for o in ops if o not in families]
        if unknown:
            raise UsageError(f"unknown --ops {', '.join(unknown)}; choose from {', '.join(families)}")
    else:
        ops = [f for f in families if not (args.quick and f in WORKLOADS)]
    explicit = args.dtype is not None
    names = _split(args.dtype) if explicit else ["fp32", "bf16"]
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise UsageError(f"unknown --dtype {', '.join(bad) or '(none)'}; choose from {', '.join(DTYPES)}")
    _check_out(args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device here")
    notes = []
    if args.quick and args.arch == "xuniter" and "generation" in ops:
        notes.append("the xuniter generate rows are in the full sweep only (leave out --quick)")
    left_out = [f for f in families if f not in ops and f in WORKLOADS and args.ops is None]
    if left_out:
        notes.append(f"{', '.join(left_out)} left out of the quick sweep (whole workloads: "
                     f"--ops {' '.join(left_out)} runs them)")
    if device == "cpu" and not explicit and "bf16" in names:
        native, why = machine.native_bf16()
        if not native:
            names.remove("bf16")
            notes.append(f"bf16 cases skipped: {why} (pass --dtype bf16 to run them anyway)")
    # fp32 first: half-precision rows compare their ids with the fp32 reference's
    names = sorted(dict.fromkeys(names), key=list(DTYPES).index)
    return torch.device(device), tuple(DTYPES[n] for n in names), ops, notes


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm.auto import tqdm

    from xlx_fast.bench import cases as bench_cases
    from xlx_fast.bench import ceilings as bench_ceilings
    from xlx_fast.bench import harness, machine, report

    try:
        device, dtypes, families, notes = parse_selection(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    spec = harness.Spec(device=device, dtypes=dtypes, quick=args.quick, size=args.size, arch=args.arch)
    if args.dry_run:
        todo = [case.id for family in families for case in bench_cases.cases(family, spec)]
        print(f"{len(todo)} cases on {device.type}, dtypes "
              f"{' '.join(harness.DTYPE_NAMES[d] for d in dtypes)}, families in this order: "
              f"{', '.join(families)}")
        print("\n".join(todo))
        return 0
    plan = harness.SMOKE if args.size == "tiny" else harness.QUICK if args.quick else harness.FULL
    started = time.perf_counter()

    info = machine.info(device)
    stem = f"{machine.slug(info['device_name'])}-{datetime.date.today().isoformat()}"
    stem += "-quick" if args.quick else ""
    if args.size != "base":
        stem += f"-{args.size}"
    out_dir = Path(args.out)
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    settings = {"quick": args.quick, "ops": families, "dtypes": [harness.DTYPE_NAMES[d] for d in dtypes],
                "size": args.size, "arch": args.arch, "device": device.type, "notes": notes}

    print(f"xlx-fast bench on {info['device_name']} ({device.type}); torch {info['torch']}, "
          f"triton {info['triton']}, xlx_fast {info['xlx_fast']}", file=sys.stderr)
    # load averages and this process's CPU time over the timed part, in machine["load"]: a busy
    # machine makes speed-ups meaningless, and the JSON must show it
    meter = machine.LoadMeter(device.type)
    print("measuring ceilings (matmul, copy) ...", file=sys.stderr)
    ceil = bench_ceilings.measure(device, dtypes, size=args.size, plan=plan)

    todo = [(family, case) for family in families for case in bench_cases.cases(family, spec)]
    rows, failures = [], []
    # a progress bar on a terminal; in a log (not a TTY: gpu_check.sh, CI) one plain line per
    # case with its time instead of thousands of carriage-return updates
    bar = tqdm(todo, desc="bench", unit="case", file=sys.stderr, dynamic_ncols=True, disable=None)
    for i, (family, case) in enumerate(bar):
        bar.set_postfix_str(case.id, refresh=True)
        case_started = time.perf_counter()
        try:
            rows.extend(harness.run_case(case, ceil, info, plan))
        except Exception as e:  # recorded and printed loudly; the exit status says it failed
            failures.append({"case": case.id, "error": f"{type(e).__name__}: {e}"})
            tqdm.write(f"FAILED {case.id}: {type(e).__name__}: {e}", file=sys.stderr)
            if not isinstance(e, harness.AgreementError):
                tqdm.write(traceback.format_exc(), file=sys.stderr)
        if i + 1 == len(todo) or todo[i + 1][0] != family:
            bench_cases.release(family)  # e.g. the generation models: free them before the next family
        harness.add_comparisons(rows)
        info["load"] = meter.record()
        report.write_json(report.document(info, ceil, settings, rows, failures, complete=False), json_path)
        if bar.disable:
            print(f"[{i + 1}/{len(todo)}] {case.id}: {time.perf_counter() - case_started:.1f} s "
                  f"(total {time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    bar.close()

    info["load"] = meter.record()
    doc = report.document(info, ceil, settings, rows, failures, complete=True)
    report.write_json(doc, json_path)
    if not args.no_plot:
        report.plot(doc, png_path)
    print(report.format_table(rows, ceil))
    elapsed = time.perf_counter() - started
    print(f"\n{len(rows)} rows from {len(todo)} cases in {elapsed:.0f} s; JSON: {json_path}"
          + ("" if args.no_plot else f"; plot: {png_path}"))
    warning = machine.busy_warning(info["load"])
    if warning:
        print(warning, file=sys.stderr)
    if failures:
        print(f"\n{len(failures)} case(s) FAILED:", file=sys.stderr)
        for f in failures:
            print(f"  {f['case']}: {f['error']}", file=sys.stderr)
        return 1
    return 0
