#!/usr/bin/env bash
# GPU check of glow_ext, for a bare CUDA machine that already has torch, pytest, ninja and pybind11
# (python3 is the torch python; no internet needed). Run from anywhere:
#
#     bash benchmarks/gpu_check.sh
#
# Steps, each under `timeout` and inside one overall budget (GPU_CHECK_BUDGET_S, default 450 s, so
# the whole check ends well under 8 minutes):
#   build      GLOW_EXT_CUDA=1 python3 setup.py build_ext --inplace   (a failed CUDA build fails loudly)
#   info       glow_ext.build_info(); fails unless the CUDA kernels are loaded and a GPU is visible
#   tests      python3 -m pytest tests -q -k cuda
#   bench      python3 -m glow_ext bench-ops --device cuda --out $OUTDIR/ops-cuda.json
#   suite      python3 -m glow_ext bench --device cuda --out $OUTDIR/suite   (logdet/inverse cost
#              against C, the layer at Glow's level shapes with GB/s against the device copy and the
#              host-sync check, a whole Glow training step and sampling; JSON, PNGs, SUMMARY-cuda.md)
#   reversible python3 -m glow_ext bench-reversible --device cuda --out $OUTDIR (memory and step time
#              of reversible vs ordinary backprop, K = 8, 16, 32), then benchmarks/bench_inverse_cache.py
#              --device cuda (sampling with the cached inverse maps)
#   sanitizer  the CUDA tests again under compute-sanitizer --tool memcheck, with what time is left
#              (a missing tool or a tool that fails to start is logged, never fatal)
# The benchmarks run before the sanitizer so that a slow memcheck cannot starve them.
#
# Output, flat: $OUT if set (the device machine's output folder), else
# benchmarks/results/gpu-check-<UTC date>/: build.log tests.log bench.log suite.log sanitizer.log
# ops-cuda.json summary.txt, and suite/ ({logdet,layers,e2e}-cuda.json, *.png, SUMMARY-cuda.md: copy
# suite/ into benchmarks/results/ and run `glow-ext bench --device cuda --render-only --update-readme`
# to publish them). Exit status: non-zero iff the build (or build_info) or the CUDA tests failed; the
# benchmarks' goals, the suite and the sanitizer are reported in summary.txt only.
#
# Knobs: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_PYTEST_ARGS (extra pytest args),
# MAX_JOBS / TORCH_CUDA_ARCH_LIST (default 16 / 9.0).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$(pwd)

OUTDIR=${OUT:-$REPO/benchmarks/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
SUMMARY=$OUTDIR/summary.txt

PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export GLOW_EXT_CUDA=1
export PYTHONUNBUFFERED=1
# Slow tests build the extension from scratch (minutes of nvcc): not in an 8-minute check.
PYTEST_ARGS=(-q -rfEs -p no:cacheprovider -m "not slow" -k cuda)
if [ -n "${GPU_CHECK_PYTEST_ARGS:-}" ]; then
    read -r -a extra <<<"$GPU_CHECK_PYTEST_ARGS"
    PYTEST_ARGS+=("${extra[@]}")
fi

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}

: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME CAP_SECONDS LOG COMMAND... : runs COMMAND under timeout (the cap, or what is left of the
# budget), appends its output to LOG and the console, records rc and duration; sets STEP_RC.
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((START + BUDGET - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        STEP_RC=124
        echo "=== $name: skipped, only ${left}s of the ${BUDGET}s budget left" | tee -a "$log"
        printf '%-10s rc=%-4s skipped (budget spent)\n' "$name" "$STEP_RC" >>"$SUMMARY"
        return
    fi
    local t0
    t0=$(date +%s)
    local cmd="$*"
    cmd=${cmd//$'\n'/ }
    [ "${#cmd}" -gt 160 ] && cmd="${cmd:0:157}..."
    echo "=== $name: $cmd (timeout ${limit}s) at $(date -u +%H:%M:%SZ)" | tee -a "$log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    STEP_RC=${PIPESTATUS[0]}
    local took=$(($(date +%s) - t0))
    local why=""
    [ "$STEP_RC" -eq 124 ] || [ "$STEP_RC" -eq 137 ] && why=" TIMED OUT"
    echo "=== $name: rc=$STEP_RC after ${took}s$why" | tee -a "$log"
    printf '%-10s rc=%-4s %4ss (limit %ss)%s\n' "$name" "$STEP_RC" "$took" "$limit" "$why" >>"$SUMMARY"
}

note "glow_ext GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
note "output: $OUTDIR"
note "MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST GLOW_EXT_CUDA=$GLOW_EXT_CUDA budget=${BUDGET}s"
note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi failed')"
note "nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo 'not on PATH')"
note "python: $($PY -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())' 2>&1 | tail -n 1)"
note ""

# --- build -------------------------------------------------------------------------------------
BUILD_LOG=$OUTDIR/build.log
: >"$BUILD_LOG"
# A stale extension from an earlier run must not stand in for a failed build.
rm -f glow_ext/_C.*.so glow_ext/_C.so
step build 260 "$BUILD_LOG" "$PY" setup.py build_ext --inplace
BUILD_RC=$STEP_RC
if [ "$BUILD_RC" -eq 0 ]; then
    step info 40 "$BUILD_LOG" "$PY" -c '
import json, sys, torch, glow_ext
info = glow_ext.build_info()
print(json.dumps(info, indent=2, sort_keys=True))
ok = bool(info.get("cuda_kernels")) and torch.cuda.is_available()
if not ok:
    print("build_info: CUDA kernels not loaded or no GPU visible", file=sys.stderr)
sys.exit(0 if ok else 1)'
    INFO_RC=$STEP_RC
    [ "$INFO_RC" -ne 0 ] && note "build_info FAILED (rc=$INFO_RC): tests, benchmark and sanitizer skipped; see build.log"
else
    INFO_RC=$BUILD_RC
    note "build FAILED (rc=$BUILD_RC): tests, benchmark and sanitizer skipped; see build.log"
fi

TESTS_RC=skipped BENCH_RC=skipped SUITE_RC=skipped REVERSIBLE_RC=skipped SAN_RC=skipped
if [ "$BUILD_RC" -eq 0 ] && [ "$INFO_RC" -eq 0 ]; then
    # --- CUDA tests ------------------------------------------------------------------------------
    : >"$OUTDIR/tests.log"
    step tests 150 "$OUTDIR/tests.log" "$PY" -m pytest tests "${PYTEST_ARGS[@]}"
    TESTS_RC=$STEP_RC  # 5 = no CUDA test collected: a failure too

    # --- benchmark -------------------------------------------------------------------------------
    : >"$OUTDIR/bench.log"
    step bench 180 "$OUTDIR/bench.log" "$PY" -m glow_ext bench-ops --device cuda --out "$OUTDIR/ops-cuda.json"
    BENCH_RC=$STEP_RC

    # --- benchmark suite (each part's JSON is written as soon as it is done) -----------------------
    : >"$OUTDIR/suite.log"
    step suite 150 "$OUTDIR/suite.log" "$PY" -m glow_ext bench --device cuda --out "$OUTDIR/suite"
    SUITE_RC=$STEP_RC

    # --- reversible backprop and the sampling cache -----------------------------------------------
    : >"$OUTDIR/reversible.log"
    step reversible 100 "$OUTDIR/reversible.log" "$PY" -m glow_ext bench-reversible --device cuda --out "$OUTDIR"
    REVERSIBLE_RC=$STEP_RC
    step cache 40 "$OUTDIR/reversible.log" "$PY" benchmarks/bench_inverse_cache.py --device cuda --out "$OUTDIR"

    # --- the CUDA tests under compute-sanitizer memcheck ------------------------------------------
    SAN_LOG=$OUTDIR/sanitizer.log
    : >"$SAN_LOG"
    SANITIZER=$(command -v compute-sanitizer || true)
    for candidate in "${CUDA_HOME:-}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
                     "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/nvcc)")/compute-sanitizer"; do
        [ -z "$SANITIZER" ] && [ -x "$candidate" ] && SANITIZER=$candidate
    done
    if [ -n "$SANITIZER" ]; then
        # Without the caching allocator every tensor is its own allocation, so memcheck sees
        # out-of-bounds accesses that would otherwise land inside a cached block.
        step sanitizer 180 "$SAN_LOG" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            "$SANITIZER" --tool memcheck --error-exitcode 99 --print-limit 50 \
            "$PY" -m pytest tests "${PYTEST_ARGS[@]}" -x
        SAN_RC=$STEP_RC
        if grep -q "ERROR SUMMARY: [1-9]" "$SAN_LOG"; then
            note "sanitizer: memcheck reported errors: $(grep -m1 'ERROR SUMMARY' "$SAN_LOG")"
        elif grep -q "ERROR SUMMARY: 0 errors" "$SAN_LOG"; then
            note "sanitizer: memcheck clean ($(grep -m1 'ERROR SUMMARY' "$SAN_LOG"))"
        else
            note "sanitizer: no memcheck summary (rc=$SAN_RC: timed out or the tool did not start; not fatal)"
        fi
    else
        echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin): skipped" | tee -a "$SAN_LOG"
        printf '%-10s rc=%-4s not found, skipped\n' sanitizer - >>"$SUMMARY"
    fi
fi

# --- summary -------------------------------------------------------------------------------------
{
    echo ""
    echo "--- results"
    echo "build: rc=$BUILD_RC, build_info: rc=$INFO_RC"
    echo "cuda tests: rc=$TESTS_RC $(grep -E '[0-9]+ (passed|failed|error)' "$OUTDIR/tests.log" 2>/dev/null | tail -n 1)"
    echo "sanitizer: rc=$SAN_RC (not fatal)"
    echo "bench: rc=$BENCH_RC (missed goals are never fatal)"
    if [ -f "$OUTDIR/bench.log" ]; then
        sed -n '/^summary:/,$p' "$OUTDIR/bench.log"
    fi
    echo "suite: rc=$SUITE_RC (not fatal)"
    if [ -f "$OUTDIR/suite.log" ]; then
        grep -E '^(logdet|layers|e2e): ' "$OUTDIR/suite.log"
    fi
    echo "reversible: rc=$REVERSIBLE_RC (not fatal)"
    if [ -f "$OUTDIR/reversible.log" ]; then
        grep -E '^(\| [0-9]|Goals:|.*samples: cached)' "$OUTDIR/reversible.log"
    fi
    echo "total: $(($(date +%s) - START))s"
} >>"$SUMMARY"

STATUS=0
[ "$BUILD_RC" -ne 0 ] && STATUS=1
[ "$INFO_RC" -ne 0 ] && STATUS=1
[ "$TESTS_RC" != 0 ] && STATUS=1
if [ "$STATUS" -eq 0 ]; then
    note "OVERALL: OK (build and CUDA tests passed)"
else
    note "OVERALL: FAILED (build rc=$BUILD_RC, build_info rc=$INFO_RC, cuda tests rc=$TESTS_RC)"
fi
echo "--- summary.txt"
cat "$SUMMARY"
exit "$STATUS"
