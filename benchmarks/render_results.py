"""Render the latest committed benchmark JSON into README.md's results section.

The README never carries hand-typed numbers: its tables live between the two marker comments
below and are rewritten from ``benchmarks/results/*.json`` — for each benchmark family and
device, the newest run of the full-size model (by the run's date) — by

    python benchmarks/render_results.py            # rewrite README.md
    python benchmarks/render_results.py --check    # exit 1 if README.md is out of date

"Committed" means tracked by git when run in a checkout (an uncommitted JSON lying in the
folder is ignored, so the README matches what a clone holds); outside a checkout every JSON in
the folder counts.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- bench-results:begin (written by benchmarks/render_results.py; do not edit by hand) -->"
END = "<!-- bench-results:end -->"
SERVE_BEGIN = "<!-- serve-results:begin (written by benchmarks/render_results.py; do not edit by hand) -->"
SERVE_END = "<!-- serve-results:end -->"


def result_files(results_dir: Path) -> list[Path]:
    """The JSON files under ``results_dir``: git-tracked ones in a checkout, else all."""
    files = sorted(results_dir.glob("*.json"))
    try:
        out = subprocess.run(["git", "-C", str(results_dir), "ls-files", "--", "."],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return files
    if out.returncode != 0:  # not a checkout
        return files
    tracked = {Path(line).name for line in out.stdout.splitlines()}
    return [f for f in files if f.name in tracked]


def _load_all(results_dir: Path) -> list:
    """[(date, name, path, document)] of the valid results files of the full-size model."""
    from xlx_fast.bench import report

    docs = []
    for path in result_files(results_dir):
        try:
            doc = report.load(path)
        except (ValueError, OSError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        if doc["settings"].get("size", "base") != "base":
            continue  # test-size runs say nothing about the model's speed
        docs.append((doc["machine"].get("date", ""), path.name, path, doc))
    return docs


def latest(results_dir: Path):
    """(path, document) of the newest valid results file, or (None, None)."""
    docs = _load_all(results_dir)
    if not docs:
        return None, None
    _, _, path, doc = max(docs)
    return path, doc


def _newest_per(entries, key) -> list:
    """[(path, document)] of the newest (date, name, path, document) entry for each ``key(doc)``,
    ordered by key."""
    newest = {}
    for entry in entries:
        k = key(entry[3])
        if k not in newest or entry > newest[k]:
            newest[k] = entry
    return [(newest[k][2], newest[k][3]) for k in sorted(newest)]


def latest_per_family(results_dir: Path) -> list:
    """[(path, document)]: the newest run of each (families, device), ordered by family (the
    families as a set: ``--ops caption,answer`` and ``--ops answer,caption`` are one sweep)."""
    return _newest_per(_load_all(results_dir), lambda doc: (
        tuple(sorted(doc["settings"].get("ops") or ())), doc["machine"].get("device", "")))


def render(path: Path | None, doc: dict | None, root: Path = ROOT) -> str:
    """The Markdown between the markers."""
    from xlx_fast.bench import report

    if doc is None:
        return ("No results are committed yet. A GPU run of `benchmarks/gpu_check.sh` (or "
                "`xlx-fast bench --out benchmarks/results`) writes one; commit its JSON and run "
                "`python benchmarks/render_results.py`.")
    m, c = doc["machine"], doc["ceilings"]
    try:
        shown = path.relative_to(root)
    except ValueError:
        shown = path.name
    sweep = "quick" if doc["settings"].get("quick") else "full"
    ceilings = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in c["matmul_tflops"].items())
    lines = [
        f"From `{shown}`: {m['device_name']} ({m['device']}), {m['date']}, {sweep} sweep; "
        f"torch {m['torch']}, triton {m['triton']}, xlx_fast {m['xlx_fast']}"
        + (f" at `{m['xlx_fast_commit']}`" if m.get("xlx_fast_commit") else "") + ".",
        f"Ceilings measured in the same run: matmul {ceilings}; copy {c['copy_gbps']:.1f} GB/s.",
        "",
        report.format_markdown(doc["rows"], doc["ceilings"]),
    ]
    if not doc.get("complete", True):
        lines += ["", "(The sweep did not finish: these are the cases that completed.)"]
    if doc.get("failures"):
        lines += ["", "Failed cases: " + "; ".join(f"`{f['case']}` ({f['error']})" for f in doc["failures"])]
    return "\n".join(lines)


def latest_serving(serving_dir: Path) -> list:
    """[(path, result)]: the newest ``xlx-fast bench-serve`` run of the full-size model for each
    device (cpu, cuda), set of modes (in-process, HTTP) and set of schedulers, [] when there is
    none."""
    found = []
    for path in result_files(serving_dir) if serving_dir.is_dir() else []:
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
            meta = result["meta"]
        except (ValueError, OSError, KeyError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        if meta["model"].get("size", "base") == "base":
            found.append((meta.get("time", ""), path.name, path, result))

    def kind(result):
        modes = result.get("modes", {})
        schedulers = sorted({p for per in modes.values() for p in per})
        return result["meta"].get("device", ""), tuple(sorted(modes)), tuple(schedulers)

    return _newest_per(found, kind)


def render_serving(path: Path | None, result: dict | None, root: Path = ROOT) -> str:
    """The Markdown between the serving markers: the sweep table and the measured ratios."""
    if result is None:
        return "No full-size serving run is committed yet (`xlx-fast bench-serve --out-dir benchmarks/results/serving`)."
    from xlx_fast.bench.serving import table

    try:
        shown = path.relative_to(root)
    except ValueError:
        shown = path.name
    m, static = result["meta"], result["static_generate"]
    lines = [f"From `{shown}`: {m['model'].get('size')} model, {m['device']} {m['dtype']}, "
             f"{m['slots']} slots, {m['threads']} threads, torch {m['torch']}, {m['time']}; static-batch "
             f"generate {static['generate_images_per_s']:.2f} images/s, with painting "
             f"{static['generate_paint_images_per_s']:.2f}.", "", table(result), ""]
    if path is not None and path.with_suffix(".png").is_file():  # the plot bench-serve wrote
        lines[1:1] = ["", f"![latency and throughput against offered load]"
                          f"({Path(shown).with_suffix('.png')})"]
    for mode, summary in result.get("summary", {}).items():
        if isinstance(summary, dict):
            ratios = ", ".join(f"{k} {v:.3g}" for k, v in summary.items() if isinstance(v, float))
            lines.append(f"- {mode}: {ratios}")
    return "\n".join(lines)


def splice(readme: str, body: str, begin: str = BEGIN, end: str = END) -> str:
    """``readme`` with the text between the markers replaced by ``body``."""
    if readme.count(begin) != 1 or readme.count(end) != 1 or readme.index(begin) > readme.index(end):
        raise ValueError("README must hold exactly one results section between the markers:\n"
                         f"  {begin}\n  {end}")
    head, rest = readme.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    args = p.parse_args(argv)
    found = latest_per_family(args.results)
    root = args.readme.resolve().parent
    body = "\n\n".join(render(path, doc, root) for path, doc in found) if found else render(None, None)
    old = args.readme.read_text(encoding="utf-8")
    new = splice(old, body)
    if SERVE_BEGIN in old:  # the serving section is optional (a README of another layout)
        runs = latest_serving(args.results / "serving")
        serve_body = ("\n\n".join(render_serving(path, result, root) for path, result in runs)
                      if runs else render_serving(None, None))
        new = splice(new, serve_body, SERVE_BEGIN, SERVE_END)
    if args.check:
        if new != old:
            print(f"{args.readme} is out of date: run python benchmarks/render_results.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.readme.write_text(new, encoding="utf-8")
    shown = ", ".join(str(path) for path, _ in found) or "(none committed)"
    print(f"{args.readme}: results from {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
