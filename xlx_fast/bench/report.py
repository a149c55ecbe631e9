"""Results out: the printed table, the JSON file, and the PNG plot drawn from the JSON.

JSON schema (``SCHEMA``)::

    {"schema": "xlx_fast.bench/1",
     "machine":  {... xlx_fast.bench.machine.info() ...,
                  "load": {... machine.LoadMeter.record(): load averages at start and end,
                           process CPU s vs wall s, "busy": reasons the timings are unreliable}},
     "ceilings": {"matmul_tflops": {"fp32": x, ...}, "copy_gbps": y, ...},
     "settings": {"quick": bool, "ops": [...], "dtypes": [...], "size": "base"},
     "complete": bool,             # false while the sweep is still running (written after each case)
     "failures": [{"case": id, "error": text}, ...],
     "rows": [row, ...]}           # row keys: ROW_KEYS (see harness.make_row)
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

SCHEMA = "xlx_fast.bench/1"
ROW_KEYS = (
    "op", "shape", "dtype", "device", "torch", "triton", "backend", "kind", "reference_ms",
    "fast_ms", "speedup", "agreement_metric", "max_error", "id_agreement", "agreement_limit",
    "agreement_extra", "flops", "bytes", "bound", "tflops", "gbps", "ceiling_matmul_tflops",
    "ceiling_copy_gbps", "pct_of_ceiling", "same_gemm_tflops", "pct_of_same_gemm", "note",
)
TOP_KEYS = ("schema", "machine", "ceilings", "settings", "complete", "failures", "rows")


def document(machine: dict, ceilings: dict, settings: dict, rows: list, failures: list,
             complete: bool) -> dict:
    return {"schema": SCHEMA, "machine": machine, "ceilings": ceilings, "settings": settings,
            "complete": complete, "failures": failures, "rows": rows}


def validate(doc: dict) -> None:
    """Raise ValueError if ``doc`` does not follow the schema (used by tests and the renderer)."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"not an xlx_fast benchmark document (schema {doc.get('schema')!r})")
    missing = [k for k in TOP_KEYS if k not in doc]
    if missing:
        raise ValueError(f"benchmark document lacks {missing}")
    for i, row in enumerate(doc["rows"]):
        lacking = [k for k in ROW_KEYS if k not in row]
        if lacking:
            raise ValueError(f"row {i} ({row.get('op')}, {row.get('backend')}) lacks {lacking}")


def write_json(doc: dict, path) -> Path:
    """Write atomically (a half-written file never replaces a complete one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_clean(doc), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _clean(value):
    """Strict JSON: non-finite floats become strings ("inf", "nan"), unknown objects their str()."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def load(path) -> dict:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    validate(doc)
    return doc


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------

COLUMNS = ("op", "shape", "dtype", "backend", "ref ms", "fast ms", "speedup",
           "max error / id agreement", "% of ceiling")
# The printed table fits a 120-column terminal: each op is a heading line over its rows, cells
# are compact (the speed-up over the reference only: peers have their own rows, and the fp32
# reference's time is in the fp32 row above), and the widest text columns are cut (with "…")
# if still too wide. Every figure stays in full in the JSON and in the Markdown table.
TABLE_WIDTH = 120
SHORT_COLUMNS = ("shape", "dtype", "backend", "ref ms", "fast ms", "speedup", "agreement",
                 "ceiling")
_INDENT = "  "
# (column index, narrowest width) in the order columns are cut when the table is too wide:
# long shapes (past attention's) and agreement extras go first, the numbers stay readable
_CUT_ORDER = ((0, 24), (2, 15), (6, 22), (7, 16), (0, 20), (6, 14), (7, 12), (2, 10))


def _ms(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _agreed(row: dict) -> bool:
    """Whether the row met its bound: ``agreement_ok``, or for rows written before it existed,
    the value against the limit (a note alone is no miss: a compiled peer notes its mode)."""
    if row.get("agreement_ok") is not None:
        return row["agreement_ok"]
    value, limit = (row["id_agreement"], row["agreement_limit"]) if row["agreement_metric"] == "id agree" \
        else (row["max_error"], row["agreement_limit"])
    if value is None or limit is None:
        return not row["note"]
    return value >= limit if row["agreement_metric"] == "id agree" else value <= limit


def agreement_text(row: dict, compact: bool = False) -> str:
    """The agreement cell; ``compact`` keeps only the share of ids equal to the fp32 reference
    among the extras (SPEC §6 asks for it on every non-fp32 row)."""
    if row["agreement_metric"] == "id agree":
        text = f"ids {row['id_agreement']:.1%}" if compact else f"ids {row['id_agreement']:.2%}"
    elif row["agreement_metric"] == "rel err":
        text = f"err {row['max_error']:.1e}"
    else:
        return ""
    if not _agreed(row):  # e.g. a peer outside the bound
        text += " OUTSIDE BOUND" if compact else " (OUTSIDE BOUND)"
    for name, value in (row.get("agreement_extra") or {}).items():
        if not isinstance(value, (int, float)):
            continue
        if compact:
            if name == "fp32-ref agree":
                text += f"; fp32 {value:.1%}"
        else:
            text += f"; {name} {value:.2%}" if "agree" in name else f"; {name} {value:.1e}"
    return text


def pct_is_shown(row: dict, ceilings: dict | None = None) -> bool:
    """Whether the row's share of its ceiling is worth printing: not when the ceiling is not
    one (``ceilings["not_ceilings"]``, e.g. bf16 emulated on a CPU), nor above 100% (the op beat
    the "ceiling", so that number was no ceiling either). The JSON keeps it regardless."""
    pct = row["pct_of_ceiling"]
    if pct is None or pct > 100.0:
        return False
    if row["bound"] == "compute" and row["dtype"] in ((ceilings or {}).get("not_ceilings") or {}):
        return False
    return True


def ceiling_text(row: dict, ceilings: dict | None = None, compact: bool = False) -> str:
    """e.g. "41% mm" (of the matmul ceiling), "63% copy", plus the same-GEMM share when timed."""
    parts = []
    if pct_is_shown(row, ceilings):
        parts.append(f"{row['pct_of_ceiling']:.0f}% {'mm' if row['bound'] == 'compute' else 'copy'}")
    if row.get("pct_of_same_gemm") is not None:
        parts.append(f"{row['pct_of_same_gemm']:.0f}% {'gemm' if compact else 'same-GEMM'}")
    return ", ".join(parts)


def table_cells(row: dict, ceilings: dict | None = None) -> list[str]:
    """The Markdown table's cells (COLUMNS): every comparison spelled out."""
    if row["fast_ms"] is None:
        fast, speedup = row["note"] or "n/a", ""
    else:
        fast, speedup = _ms(row["fast_ms"]), f"{row['speedup']:.2f}x"
        if row.get("speedup_vs_fp32_reference"):
            speedup += f" ({row['speedup_vs_fp32_reference']:.2f}x vs fp32 ref)"
        if row.get("speedup_vs_best_peer"):
            speedup += f" ({row['speedup_vs_best_peer']:.2f}x vs {row['best_peer']})"
    return [row["op"], row["shape"], row["dtype"], row["backend"], _ms(row["reference_ms"]), fast,
            speedup, agreement_text(row), ceiling_text(row, ceilings)]


def compact_cells(row: dict, ceilings: dict | None = None) -> list[str]:
    """The printed table's cells (SHORT_COLUMNS; the op is the heading above the rows)."""
    if row["fast_ms"] is None:
        fast, speedup = row["note"] or "n/a", ""
    else:
        fast, speedup = _ms(row["fast_ms"]), f"{row['speedup']:.2f}x"
    return [row["shape"], row["dtype"], row["backend"], _ms(row["reference_ms"]), fast, speedup,
            agreement_text(row, compact=True), ceiling_text(row, ceilings, compact=True)]


def _fit(widths: list[int], limit: int, sep: int) -> list[int]:
    """Cut columns in ``_CUT_ORDER``, each down to its narrowest, until the line fits."""
    widths = list(widths)
    for i, narrowest in _CUT_ORDER:
        excess = sum(widths) + sep * (len(widths) - 1) - limit
        if excess <= 0:
            break
        widths[i] = max(min(widths[i], narrowest), widths[i] - excess)
    return widths


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def ceilings_lines(ceilings: dict, width: int = TABLE_WIDTH) -> list[str]:
    """The ceilings a table was measured against, wrapped to ``width``."""
    import textwrap

    sizes = ceilings.get("matmul_n")
    skip = ceilings.get("not_ceilings") or {}
    parts = []
    for k, v in ceilings["matmul_tflops"].items():
        n = sizes.get(k) if isinstance(sizes, dict) else sizes
        text = f"{k} {v:.3g} TFLOP/s (n={n}"
        text += ", not a ceiling: see the JSON)" if k in skip else ")"
        parts.append(text)
    line = (f"ceilings (measured in this run): matmul {', '.join(parts)}, fp32 precision "
            f"{ceilings['fp32_matmul_precision']}; copy {ceilings['copy_gbps']:.1f} GB/s")
    return textwrap.wrap(line, width)


def format_table(rows: list[dict], ceilings: dict | None = None, width: int = TABLE_WIDTH) -> str:
    """A plain-text table no wider than ``width``: a heading line per op, one line per row
    under it; the ceilings it was measured against at the end."""
    cells = [list(SHORT_COLUMNS)] + [compact_cells(r, ceilings) for r in rows]
    # a row without a time says why in one cell that runs to the end of the line: it does not
    # widen the "fast ms" column
    note_rows = {j + 1 for j, r in enumerate(rows) if r["fast_ms"] is None}
    natural = [max(len(c[i]) for j, c in enumerate(cells) if not (i == 4 and j in note_rows))
               for i in range(len(SHORT_COLUMNS))]
    widths = _fit(natural, width - len(_INDENT), 2)
    lines = []
    op = None
    for j, c in enumerate(cells):
        if j and rows[j - 1]["op"] != op:
            op = rows[j - 1]["op"]
            lines.append(_cut(op, width))
        if j in note_rows:
            head = _INDENT + "  ".join(_cut(s, w).ljust(w) for s, w in zip(c[:4], widths[:4])) + "  "
            lines.append(head + _cut(c[4], width - len(head)))
        else:
            lines.append(_INDENT + "  ".join(_cut(s, w).ljust(w) for s, w in zip(c, widths)).rstrip())
        if j == 0:
            lines.append(_INDENT + "  ".join("-" * w for w in widths))
    if ceilings:
        lines += ceilings_lines(ceilings, width)
    return "\n".join(lines)


def format_markdown(rows: list[dict], ceilings: dict | None = None) -> str:
    """The same table as Markdown (for the README), every comparison spelled out."""
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "/") for c in table_cells(r, ceilings)) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------

def plot(doc: dict, path) -> Path:
    """Horizontal bars: speed-up over the reference of every backend row, grouped by op and
    shape (log scale, a line at 1×). Rows without a time are listed with their reason."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    labels = [f"{r['op']} {r['shape']} {r['dtype']} · {r['backend']}" for r in rows]
    values = [r["speedup"] if r["speedup"] else 0.0 for r in rows]
    backends = sorted({r["backend"] for r in rows})
    cmap = plt.get_cmap("tab10")
    colors = {b: cmap(i % 10) for i, b in enumerate(backends)}

    height = max(2.5, 0.28 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(12, height))
    ys = list(range(len(rows)))[::-1]
    positive = [v for v in values if v > 0]
    floor = min(positive + [1.0]) / 2
    for y, r, v in zip(ys, rows, values):
        if v > 0:
            ax.barh(y, v, color=colors[r["backend"]], left=0)
            ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
        else:
            ax.text(floor, y, f" {r['note'] or 'n/a'}", va="center", fontsize=7, color="gray")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(left=floor, right=max(positive + [2.0]) * 4)  # room for the value labels
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed-up over the eager reference (×, log scale)")
    m = doc["machine"]
    ax.set_title(f"xlx_fast {m.get('xlx_fast')} on {m.get('device_name')} — torch {m.get('torch')}, "
                 f"triton {m.get('triton')}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[b]) for b in backends]
    if handles:
        ax.legend(handles, backends, fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
