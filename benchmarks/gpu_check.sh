#!/usr/bin/env bash
# The one prepared script for a GPU machine (see ENV.md): build xlx_fast there, run the GPU
# tests, run the GPU benchmark sweep, print a short table last. Each stage runs under its own
# timeout so the whole ends inside 8 minutes even when one stage hangs (the limits below add up
# to 445 s, 470 s with every kill grace); a stage that fails or times out does not stop the later
# ones (their logs say what happened).
#
# Everything lands flat in $OUT (default ./bench-out/gpu), at most 8 files:
#   nvidia-smi.log build.log info.log gpu-tests.log bench.log  <gpu>-<date>.json  <gpu>-<date>.png
# The bench JSON is rewritten after every case, so a sweep cut short by its timeout still leaves
# the rows it finished. To publish: copy the JSON (and PNG) to benchmarks/results/, commit them
# with the tree they measured, then run python benchmarks/render_results.py.
#
# Usage (from anywhere):  OUT=/some/dir benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench-out/gpu}"
mkdir -p "$OUT"
# nvcc compiles only for the card at hand unless told otherwise (half the build time of 80;90)
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')
export XLX_CUDA_ARCHS="${XLX_CUDA_ARCHS:-${cap:-90}}"
export PYTHONUNBUFFERED=1
T0=$SECONDS

# stage NAME SECONDS CMD...: run CMD with a time limit, log to $OUT/NAME.log, report the status
stage() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit} s) =="
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local what="rc=$rc"
    [ "$rc" -eq 124 ] && what="TIMED OUT"
    echo "== $name: $what after $((SECONDS - start)) s (total $((SECONDS - T0)) s) =="
    tail -n 4 "$OUT/$name.log"
    return 0
}

stage nvidia-smi 10 nvidia-smi
stage build 110 python -m pip install --no-build-isolation --no-deps -e .
# info() may not exist in every tree: a missing one is reported in info.log, nothing more
stage info 20 python -c "import xlx_fast; xlx_fast.info() if hasattr(xlx_fast, 'info') else print('xlx_fast.info() not available')"
stage gpu-tests 95 python -m pytest -m gpu -q -p no:cacheprovider
# (through python -c rather than the xlx-fast script, so it runs even if the install failed)
stage bench 180 python -c "import sys; from xlx_fast.cli import main; sys.exit(main(sys.argv[1:]))" \
    bench --device cuda --dtype fp32 bf16 --out "$OUT"

# The short table, last: from the newest JSON the sweep wrote (complete or not); draws the PNG
# when the sweep was cut short before drawing it.
timeout 30 python - "$OUT" <<'EOF'
import sys
from pathlib import Path

from xlx_fast.bench import report

out = Path(sys.argv[1])
files = sorted(out.glob("*.json"), key=lambda p: p.stat().st_mtime)
if not files:
    sys.exit("no benchmark JSON was written: see bench.log")
doc = report.load(files[-1])
png = files[-1].with_suffix(".png")
if not png.exists() and doc["rows"]:
    report.plot(doc, png)
keep = [r for r in doc["rows"] if r["kind"] == "fast"]
print(f"\n{files[-1].name}: {'complete' if doc['complete'] else 'INCOMPLETE'} sweep, "
      f"{len(doc['rows'])} rows, {len(doc['failures'])} failed cases")
print(report.format_table(keep, doc["ceilings"]))
for f in doc["failures"]:
    print(f"FAILED {f['case']}: {f['error']}")
EOF
echo "== done in $((SECONDS - T0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
