#!/usr/bin/env bash
# The one prepared script for a GPU machine (see ENV.md): one run, inside 8 minutes, that gives
# the most evidence about xlx_fast on a GPU, the most decisive first. Stages:
#
#   stage                 limit  kill grace  what
#   env                     20      5        python/python3, nvcc, driver, GPU, torch, triton,
#                                            cupy, transformers, pytest plugins; "no GPU" if none
#   build                   90      5        pip install -v -e . ; asserts the CUDA kernels were
#                                            built (when nvcc is here); xlx-fast info
#   smoke                   45     10        the decisive GPU tests, by id (SMOKE_IDS below);
#                                            the ids are collected first, everywhere: a missing
#                                            id FAILS the stage, GPU or not
#   gpu-tests               55     10        pytest -m gpu, all files but test_attention.py,
#                                            in parallel (xdist, one file per worker)
#   gpu-tests-attention     35     10        pytest -m gpu tests/test_attention.py (the heaviest
#                                            compile load, so last), cases spread over workers
#   bench                  120     10        xlx-fast bench --quick: sampler, codebook_head,
#                                            nearest, attention, generation (B=1, 64, with the
#                                            torch.compile(reference) peer of the bf16 rows,
#                                            mode reduce-overhead: two compiles), model_forward,
#                                            engine, training, answer, caption, in that order (the
#                                            last ones are lost first when time runs out: the two
#                                            tasks run on what earlier stages left over)
#   profile                 15      5        benchmarks/profile_generate.py at B=1 and B=64:
#                                            kernels per step
#   serving                 30      5        xlx-fast bench-serve in process, 16 slots, step and
#                                            request schedulers at 70% of the step scheduler's
#                                            saturation: latency, and where the time goes
#   summary                  5      5        stage results and the bench table
#                          ---    ---
#                          415  + 65 = 480 s at most (8 minutes)
#
# The clock starts before the first interpreter start: on a cold machine the two torch imports
# that find the interpreter and probe CUDA take about 10 s, which env's limit allows for.
#
# A stage that ends early passes its unused seconds on to the next one (each stage's deadline
# is the sum of the limits and graces before it plus its own limit), so the total stays
# within 480 s while a slow first compile can borrow what a fast build left over.
# Stages are stopped with SIGINT (pytest then prints its summary: failures, durations), and
# killed 5-10 s later if still running. A stage that fails or times out does not stop the later
# ones; the script exits 1 if any stage failed, 0 otherwise (stages skipped for want of a GPU
# count as passed: on a machine without a GPU this script still checks its own plumbing, i.e.
# the test ids exist, the test selection collects, the bench arguments parse, the profiler
# script runs on the tiny model on the CPU).
#
# Everything lands flat in $OUT (default ./bench-out/gpu), at most 8 files:
#   build.log (env too) smoke.log gpu-tests.log bench.log (serving's log too)
#   <gpu>-<date>-quick.json serving.json profile.txt summary.txt
# The bench JSON is rewritten after every case, so a sweep cut short still leaves its rows.
# Compile caches stay where Triton, torch and the build keep them (~/.triton, /tmp, build/), not
# in $OUT: a second run on the same warm machine reuses them. To publish: copy the JSON and
# profile.txt to benchmarks/results/ and commit them with the tree they measured.
#
# Usage (from anywhere):  OUT=/some/dir benchmarks/gpu_check.sh
# Environment:
#   XLX_PYTHON                 the interpreter (default: python3, else python)
#   XLX_GPU_CHECK_SKIP_BUILD=1 use the installed package as it is (no pip install)
#   XLX_GPU_CHECK_STAGES       run only these stages, e.g. "env smoke" (default: all)
#   XLX_GPU_CHECK_SMOKE_IDS    replace SMOKE_IDS (checking this script's own failure path)
#   XLX_GPU_CHECK_BENCH_OPS    the sweep's --ops (default: the ten families above); a rerun
#                              on a short lease measures only what changed
#   XLX_GPU_CHECK_WORKERS      pytest-xdist workers (default 8)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench-out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$SECONDS

# The decisive GPU tests: CUDA sampler vs its C++ twin, the CuPy path vs the twin, graph capture
# and replay of the sampler, the sampler backend probe, GPU sampling in the codebook head, and
# generate's graph loop vs its eager loop vs the reference (fp32 and bf16), and the engine's
# buckets all captured at warm-up (none in traffic) with no host sync in a step.
SMOKE_IDS=(
    tests/test_sampler_step.py::test_cuda_matches_twin
    tests/test_sampler_step.py::test_cuda_cupy_path_matches_twin
    tests/test_sampler_step.py::test_cuda_graph_capture_and_replay
    tests/test_native.py::test_gpu_sampler_backend_probe_runs_the_chosen_backend
    tests/test_codebook_head.py::test_gpu_sampling_matches_cpu_and_graph_capture
    "tests/test_generation.py::test_cuda_graph_loop_equals_eager_and_reference[mask_predict-dtype0]"
    "tests/test_generation.py::test_cuda_graph_loop_equals_eager_and_reference[mask_predict-dtype1]"
    tests/test_engine.py::test_cuda_every_bucket_captured_at_warmup_and_none_in_traffic
    tests/test_engine.py::test_cuda_step_without_finishing_rows_never_syncs
)
if [ -n "${XLX_GPU_CHECK_SMOKE_IDS:-}" ]; then
    read -r -a SMOKE_IDS <<<"$XLX_GPU_CHECK_SMOKE_IDS"
fi
BENCH_OPS=${XLX_GPU_CHECK_BENCH_OPS:-sampler,codebook_head,nearest,attention,generation,model_forward,engine,training,answer,caption}
WORKERS="${XLX_GPU_CHECK_WORKERS:-8}"
STAGES="${XLX_GPU_CHECK_STAGES:-env build smoke gpu-tests gpu-tests-attention bench profile serving summary}"

# Our own files only (a rerun into the same folder must not pile up past 8 files).
rm -f "$OUT"/serving.json "$OUT"/build.log "$OUT"/smoke.log "$OUT"/gpu-tests.log "$OUT"/bench.log \
      "$OUT"/profile.txt "$OUT"/summary.txt "$OUT"/*-quick.json
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

# --- the interpreter, and whether there is a GPU --------------------------------------------
PY="${XLX_PYTHON:-}"
if [ -z "$PY" ]; then
    for cand in python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
            PY=$cand
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "no python with torch found (tried python3, python; set XLX_PYTHON)" | tee -a "$SUMMARY"
    exit 1
fi
# one interpreter start for what the stages need to know: CUDA in torch, the pytest plugins
read -r TORCH_CUDA HAVE_TIMEOUT HAVE_XDIST < <("$PY" -c "
import importlib.util as u, torch
print(int(torch.cuda.is_available()), int(u.find_spec('pytest_timeout') is not None),
      int(u.find_spec('xdist') is not None))" 2>/dev/null || echo "0 0 0")
GPU_WHY=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
    GPU_WHY="no NVIDIA driver (nvidia-smi not found)"
elif ! nvidia-smi -L >/dev/null 2>&1; then
    GPU_WHY="nvidia-smi found no GPU"
elif [ "$TORCH_CUDA" != 1 ]; then
    GPU_WHY="torch sees no CUDA device"
fi
if [ -z "$GPU_WHY" ]; then
    HAVE_GPU=1
    # nvcc compiles only for the card at hand unless told otherwise (half the build time of 80;90)
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')
    export XLX_CUDA_ARCHS="${XLX_CUDA_ARCHS:-${cap:-90}}"
else
    HAVE_GPU=0
    echo "no GPU: $GPU_WHY; the GPU stages only check their plumbing and skip the GPU work" \
        | tee -a "$SUMMARY"
fi

# pytest plugins, used where present: per-test timeouts, parallel workers
PYTEST=("$PY" -m pytest -p no:cacheprovider -rfE --tb=short --durations=15)
TIMEOUT_ARGS=()
[ "$HAVE_TIMEOUT" = 1 ] && TIMEOUT_ARGS=(--timeout=120)
XDIST_OK=$HAVE_XDIST

# --- stages ------------------------------------------------------------------------------------
FAILED=0
PLAN=0  # seconds from T0 by which every stage so far must have ended (limits + graces)

wanted() { [[ " $STAGES " == *" $1 "* ]]; }

# note NAME TEXT: one line to the console and the summary
note() { echo "== $1: $2" | tee -a "$SUMMARY"; }

# run_stage NAME LIMIT GRACE LOG CMD...: run CMD under its deadline (SIGINT at the deadline,
# SIGKILL GRACE seconds later), appending to LOG; report and record the outcome.
run_stage() {
    local name=$1 nominal=$2 grace=$3 log=$4
    shift 4
    local start=$SECONDS
    local limit=$((PLAN + nominal - (start - T0)))
    local before=0
    [ -f "$log" ] && before=$(wc -l <"$log")
    PLAN=$((PLAN + nominal + grace))
    echo "== $name (limit ${limit} s) ==" | tee -a "$log"
    # a fresh bash runs the stage's function (timeout runs programs, not functions): it gets the
    # settings and functions of this script through PRELUDE
    timeout -s INT -k "$grace" "$limit" bash -c "$PRELUDE"$'\n''"$@"' stage "$@" >>"$log" 2>&1
    local rc=$?
    local what="passed"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        what="TIMED OUT (rc $rc)"
        FAILED=1
    elif [ "$rc" -ne 0 ]; then
        what="FAILED (rc $rc)"
        FAILED=1
    fi
    # what this stage wrote: its last lines (all of the summary's table)
    local show=6
    [ "$name" = summary ] && show=200
    tail -n +"$((before + 2))" "$log" | tail -n "$show" | sed 's/^/   | /'
    note "$name" "$what after $((SECONDS - start)) s (total $((SECONDS - T0)) s); log $(basename "$log")"
    return 0
}

# skip_stage NAME NOMINAL GRACE WHY
skip_stage() {
    PLAN=$((PLAN + $2 + $3))
    note "$1" "skipped: $4"
}

env_report() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host: $(uname -srm); CPUs: $(nproc)"
    for p in python python3; do
        if command -v "$p" >/dev/null 2>&1; then
            echo "$p: $(command -v "$p") -> $("$p" --version 2>&1)"
        else
            echo "$p: not found"
        fi
    done
    echo "python used: $PY"
    if command -v nvcc >/dev/null 2>&1; then
        echo "nvcc: $(command -v nvcc): $(nvcc --version | tail -n 2 | tr '\n' ' ')"
    else
        echo "nvcc: not found"
    fi
    if [ "$HAVE_GPU" = 1 ]; then
        nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.sm,clocks.max.sm \
            --format=csv
        nvidia-smi
    else
        echo "GPU: none ($GPU_WHY)"
    fi
    echo "Triton cache: ${TRITON_CACHE_DIR:-$HOME/.triton/cache} ($(du -sh "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" 2>/dev/null | cut -f1 || echo empty))"
    "$PY" - <<'EOF'
import importlib.metadata as md
for name in ("torch", "triton", "cupy-cuda13x", "cupy-cuda12x", "cupy", "transformers", "numpy",
             "pytest", "pytest-xdist", "pytest-timeout", "pybind11", "cmake", "ninja"):
    try:
        print(f"{name}: {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
import torch
print(f"torch CUDA: {torch.version.cuda}; available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
EOF
}

build_and_check() {
    if [ "${XLX_GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
        echo "build skipped (XLX_GPU_CHECK_SKIP_BUILD=1): using the installed package"
    else
        "$PY" -m pip install -v --no-build-isolation --no-deps -e . || return 1
    fi
    "$PY" -m xlx_fast.cli info || return 1
    if command -v nvcc >/dev/null 2>&1 || [ "$HAVE_GPU" = 1 ]; then
        # nvcc here (or a GPU to build for): the CUDA kernels must have been built
        "$PY" -c "
import sys
from xlx_fast import native
b = native.build_info()
print('build_info:', b)
sys.exit(0 if b['cuda_kernels'] else 'CUDA kernels were NOT built into xlx_fast._C')" || return 1
    fi
}

smoke() {
    echo "collecting ${#SMOKE_IDS[@]} ids: ${SMOKE_IDS[*]}"
    local listing
    listing=$("${PYTEST[@]}" --collect-only -q "${SMOKE_IDS[@]}" 2>&1)
    local rc=$?
    echo "$listing"
    if [ "$rc" -ne 0 ]; then
        echo "SMOKE IDS DO NOT COLLECT (pytest rc $rc): a test was renamed or removed; fix SMOKE_IDS"
        return 1
    fi
    if [ "$HAVE_GPU" = 0 ]; then
        echo "no GPU: $(grep -c '::' <<<"$listing") smoke tests collected, not run"
        return 0
    fi
    "${PYTEST[@]}" "${TIMEOUT_ARGS[@]}" "${SMOKE_IDS[@]}"
}

# gpu_tests DIST ARGS...: the GPU-marked tests of ARGS, in parallel where pytest-xdist is here.
# Parallel is safe for these tests: each worker is a process with its own CUDA context, no test
# asserts on a time or on device-wide memory, and Triton's cache takes concurrent writers.
# DIST: loadfile (a file's module-scoped models are built once) or load (one file's many cases).
gpu_tests() {
    local dist=$1
    shift
    if [ "$HAVE_GPU" = 0 ]; then
        local listing
        listing=$("${PYTEST[@]}" --collect-only -q -m gpu "$@" 2>&1)
        local rc=$?
        echo "$listing" | tail -n 3
        [ "$rc" -ne 0 ] && { echo "GPU TEST SELECTION DOES NOT COLLECT (pytest rc $rc)"; return 1; }
        echo "no GPU: $(grep -c '::' <<<"$listing") GPU tests collected, not run"
        return 0
    fi
    local par=()
    [ "$XDIST_OK" = 1 ] && par=(-n "$WORKERS" --dist "$dist")
    "${PYTEST[@]}" "${TIMEOUT_ARGS[@]}" "${par[@]}" -m gpu "$@"
}

bench() {
    local args=(bench --quick --ops "$BENCH_OPS" --dtype fp32 bf16 --out "$OUT" --no-plot)
    if [ "$HAVE_GPU" = 0 ]; then
        echo "no GPU: the sweep's arguments are checked (CPU dry run), nothing is measured"
        "$PY" -m xlx_fast.cli "${args[@]}" --device cpu --dry-run
        return
    fi
    "$PY" -m xlx_fast.cli "${args[@]}" --device cuda
}

profile() {
    if [ "$HAVE_GPU" = 0 ]; then
        echo "no GPU: profiling the tiny model on the CPU instead (a check that the script runs)"
        "$PY" benchmarks/profile_generate.py --device cpu --size tiny --batches 1 2 --top 10 \
            --out "$OUT/profile.txt"
        return
    fi
    "$PY" benchmarks/profile_generate.py --device cuda --batches 1 64 --out "$OUT/profile.txt"
}

serving() {
    local args=(bench-serve --mode inproc --schedulers step,request --load 0.7 --out-dir "$OUT"
                --name serving --no-plot)
    if [ "$HAVE_GPU" = 0 ]; then
        echo "no GPU: the serving benchmark runs at the tiny size on the CPU (a check that it runs)"
        "$PY" -m xlx_fast.cli "${args[@]}" --size tiny --slots 2 --requests 3 --max-seconds 1
        return
    fi
    "$PY" -m xlx_fast.cli "${args[@]}" --device cuda --slots 16 --requests 32 --max-seconds 3
}

summary() {
    "$PY" - "$OUT" <<'EOF'
import sys
from pathlib import Path

from xlx_fast.bench import report

out = Path(sys.argv[1])
serving = out / "serving.json"
if serving.is_file():  # first: the bench table below is the last thing printed
    import json

    from xlx_fast.bench.serving import table

    result = json.loads(serving.read_text())
    print(f"serving ({result['meta']['device']}, {result['meta']['slots']} slots):")
    print(table(result))
    print(json.dumps(result.get("summary", {})))
files = sorted(out.glob("*-quick.json"), key=lambda p: p.stat().st_mtime)
if not files:
    print("no benchmark JSON was written (no GPU, or see bench.log)")
    sys.exit(0)
doc = report.load(files[-1])
keep = [r for r in doc["rows"] if r["kind"] == "fast"]
print(f"{files[-1].name}: {'complete' if doc['complete'] else 'INCOMPLETE'} sweep, "
      f"{len(doc['rows'])} rows, {len(doc['failures'])} failed cases")
print(report.format_table(keep, doc["ceilings"]))
for f in doc["failures"]:
    print(f"FAILED {f['case']}: {f['error']}")
EOF
}

PRELUDE="set -uo pipefail
$(declare -p PY HAVE_GPU GPU_WHY OUT PYTEST TIMEOUT_ARGS XDIST_OK WORKERS SMOKE_IDS BENCH_OPS)
$(declare -f env_report build_and_check smoke gpu_tests bench profile serving summary)"

# stage NAME LIMIT GRACE LOG CMD...: run_stage unless XLX_GPU_CHECK_STAGES leaves it out
stage() {
    if wanted "$1"; then
        run_stage "$@"
    else
        skip_stage "$1" "$2" "$3" "not selected (XLX_GPU_CHECK_STAGES)"
    fi
}

stage env 20 5 "$OUT/build.log" env_report
stage build 90 5 "$OUT/build.log" build_and_check
stage smoke 45 10 "$OUT/smoke.log" smoke
deselect=()
for id in "${SMOKE_IDS[@]}"; do deselect+=(--deselect "$id"); done
stage gpu-tests 55 10 "$OUT/gpu-tests.log" \
    gpu_tests loadfile tests --ignore=tests/test_attention.py "${deselect[@]}"
stage gpu-tests-attention 35 10 "$OUT/gpu-tests.log" gpu_tests load tests/test_attention.py
stage bench 120 10 "$OUT/bench.log" bench
stage profile 15 5 "$OUT/bench.log" profile
stage serving 30 5 "$OUT/bench.log" serving
rm -f "$OUT"/*.tmp  # a JSON write cut by a timeout leaves its temporary behind: not a 9th file
stage summary 5 5 "$SUMMARY" summary
[ "$HAVE_GPU" = 0 ] && note "result" "no GPU here ($GPU_WHY): nothing was run on a GPU"
note "done" "$([ "$FAILED" = 0 ] && echo "every stage passed" || echo "SOME STAGES FAILED") in $((SECONDS - T0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$FAILED"
