#!/usr/bin/env bash
# The GPU check of glow_ext: one short run on a lent CUDA machine, of which only the output folder
# ($OUT) comes back. docs/gpu-check.md says how to run it, what each step does and how to read the
# output.
#
#     bash benchmarks/gpu_check.sh                     # on the GPU machine, from anywhere
#     OUT=DIR bash benchmarks/gpu_check.sh --dry-run   # anywhere: stand-ins for the GPU commands
#     bash benchmarks/gpu_check.sh --source-digest     # the sources digest that summary.txt records
#
# Steps in order of value, each under a cap, all inside GPU_CHECK_BUDGET_S (default 420 s): detect a
# prebuilt module, build (sm_90), info, tests, memcheck, racecheck, bench_ops, e2e (eager), then if
# time is left e2e_compiled, tests_rest (compile and bigmem tests), suite (layers, logdet),
# reversible, inverse_cache. Output: summary.txt, ops-cuda.json, e2e-cuda.json and
# gpu-check-logs.tar.gz (every log and result file); work files live in a scratch folder.
#
# Exit status: 0 iff CUDA kernels were built or a prebuilt module loaded, build_info saw them and a
# GPU, and the CUDA tests passed (at least one); later steps are reported in summary.txt only. A dry run also fails
# when its output breaks the limits on what comes back.
#
# Knobs: PYTHON (python3), GPU_CHECK_BUDGET_S, GPU_CHECK_CAP_<STEP> (seconds, e.g.
# GPU_CHECK_CAP_TESTS=200), GPU_CHECK_MIN_STEP_S (10: a step starts only with this much budget left),
# GPU_CHECK_GRACE_S (10: from the interrupt at a step's limit to its kill), GPU_CHECK_E2E_SIZE
# (K,L,WIDTH,BATCH, default 8,3,128,16), GPU_CHECK_COMMIT (the commit, where the copy has no .git),
# MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (9.0). Dry run only: GPU_CHECK_DRY_COLLECT=1 (the pytest
# stand-ins collect their real selections, ~10 s each), GPU_CHECK_DRY_PREBUILT=1 (a prebuilt
# module is found), GPU_CHECK_DRY_SLEEP_<STEP>, GPU_CHECK_DRY_RC_<STEP>, GPU_CHECK_DRY_LOG_BYTES_<STEP>
# (a stand-in's run time, exit status and extra log bytes), GPU_CHECK_MAX_FILE_BYTES (the size limit,
# to exercise the trimming of logs).
set -u -o pipefail

SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SCRIPT")/.." && pwd)

# What the device tool brings back from $OUT.
MAX_FILES=8
MAX_DEPTH=2
MAX_FILE_BYTES=${GPU_CHECK_MAX_FILE_BYTES:-$((16 * 1024 * 1024))}

ALL_STEPS=(detect build info tests memcheck racecheck bench_ops e2e e2e_compiled tests_rest suite
           reversible inverse_cache)
# The CUDA tests that decide the exit status: no cold torch.compile, no 28 GB test, no from-scratch
# builds. The rest run late, when time is left.
SELECT_TESTS="cuda and not compile and not bigmem and not slow"
SELECT_TESTS_REST="cuda and (compile or bigmem) and not slow"
# The sanitizers run small kernel-only selections, float32 only (float64 variants are "dtype1" or
# "float64"), without gradcheck and opcheck (thousands of tiny launches each) and without the
# bad-permutation test, whose child processes stop on purpose with a device-side assert.
SANITIZER_TEST_FILES=(tests/test_ops.py tests/test_coupling_op.py tests/test_cuda_kernels.py)
MEMCHECK_K="not gradcheck and not opcheck and not dtype1 and not float64 and not bad_permutation \
and (test_cuda_kernels or forward_matches \
or inverse_matches or backward_ops or channel_map_matches or gradients_match or precision)"
RACECHECK_K="not gradcheck and not opcheck and not dtype1 and not float64 and not bad_permutation \
and (test_cuda_kernels or forward_matches \
or backward_ops or channel_map_matches)"
# The line of pytest's final report (also that of --collect-only).
PYTEST_RESULT_RE='(passed|failed|errors?|skipped|deselected|xfailed|xpassed|no tests ran|collected)[^=]* in [0-9.]+s'

# --------------------------------------------------------------------------------------------------
# Helpers shared by the check and its stand-ins

upper() { printf '%s' "$1" | tr '[:lower:]-' '[:upper:]_'; }

# env_of PREFIX STEP DEFAULT: the value of PREFIX_<STEP>, or DEFAULT.
env_of() {
    local var
    var=$1_$(upper "$2")
    printf '%s' "${!var:-$3}"
}

# arg_after FLAG ARGS...: the argument after FLAG (empty when FLAG is absent).
arg_after() {
    local flag=$1
    shift
    while [ $# -gt 1 ]; do
        [ "$1" = "$flag" ] && { printf '%s' "$2"; return; }
        shift
    done
}

join_by() {  # join_by SEPARATOR WORDS...
    local separator=$1
    shift
    printf '%s' "$1"
    shift
    [ $# -eq 0 ] || printf "$separator%s" "$@"
}

human_bytes() {
    awk -v b="$1" 'BEGIN { if (b >= 1048576) printf "%.1f MiB", b / 1048576;
                           else if (b >= 1024) printf "%.0f KiB", b / 1024; else printf "%d B", b }'
}

# check_output_limits DIR: whether DIR holds only what the device tool brings back: at most
# MAX_FILES files, MAX_DEPTH folders deep, names of letters, digits, '.', '_' and '-', plain files
# of at most MAX_FILE_BYTES. Prints one line; returns 1 when DIR breaks a limit.
check_output_limits() {
    local dir=$1 path rel part size files=0 deepest=0 largest=0 largest_name=""
    local -a parts problems=()
    while IFS= read -r -d '' path; do
        rel=${path#"$dir"/}
        IFS=/ read -r -a parts <<<"$rel"
        for part in "${parts[@]}"; do
            [[ $part =~ ^[A-Za-z0-9._-]+$ ]] || problems+=("name '$rel'")
        done
        if [ -L "$path" ]; then
            problems+=("link '$rel'")
        elif [ -d "$path" ]; then
            [ "${#parts[@]}" -gt "$deepest" ] && deepest=${#parts[@]}
            [ "${#parts[@]}" -gt "$MAX_DEPTH" ] && problems+=("folder too deep '$rel'")
        elif [ -f "$path" ]; then
            files=$((files + 1))
            size=$(stat -c %s "$path")
            [ "$size" -gt "$largest" ] && { largest=$size; largest_name=$rel; }
            [ "$size" -gt "$MAX_FILE_BYTES" ] && problems+=("'$rel' $(human_bytes "$size")")
        else
            problems+=("not a plain file '$rel'")
        fi
    done < <(find "$dir" -mindepth 1 -print0 | sort -z)
    [ "$files" -gt "$MAX_FILES" ] && problems+=("too many files")
    local facts="$files files (at most $MAX_FILES), folders $deepest deep (at most $MAX_DEPTH), largest"
    facts+=" ${largest_name:-none} $(human_bytes "$largest") (at most $(human_bytes "$MAX_FILE_BYTES"))"
    if [ "${#problems[@]}" -eq 0 ]; then
        echo "output limits: fits: $facts"
        return 0
    fi
    echo "output limits: DOES NOT FIT: $(join_by '; ' "${problems[@]}"); $facts"
    return 1
}

# The digest of the sources the check ran, so that a run on a copy without .git can be matched to a
# commit: run `bash benchmarks/gpu_check.sh --source-digest` in a checkout of the candidate.
source_digest() {
    (cd "$REPO" && find setup.py pyproject.toml csrc glow_ext tests benchmarks scripts -type f \
        \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.sh' -o -name '*.toml' \) \
        -not -path '*/__pycache__/*' -not -path 'benchmarks/results/*' -print0 2>/dev/null \
        | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}

# --------------------------------------------------------------------------------------------------
# Stand-ins of the dry run: `gpu_check.sh --stand-in STEP COMMAND...` runs in place of COMMAND (the
# real one, from which it takes the output paths), under the same timeout, and writes what COMMAND
# would: files of realistic size, and the log lines the summary quotes.

# filler_json FILE BYTES: a valid JSON file of about BYTES bytes.
filler_json() {
    mkdir -p "$(dirname "$1")"
    {
        printf '{"stand_in": "written by gpu_check.sh --dry-run", "values": [0'
        od -An -tu2 -v -N "$(($2 / 3))" /dev/urandom | tr -s ' \n' ',' | sed 's/,$//'
        printf ']}\n'
    } >"$1"
}

# stand_in_pytest STEP COMMAND...: collect the real selection (GPU_CHECK_DRY_COLLECT=1) and report
# it as passed; write the junit file the command names.
stand_in_pytest() {
    local step=$1 py="" junit="" listing rc
    shift
    local -a pytest_args=()
    while [ $# -gt 0 ]; do
        if [ -z "$py" ] && [ $# -ge 3 ] && [ "$2" = -m ] && [ "$3" = pytest ]; then
            py=$1
            shift 3
            continue
        fi
        if [ -n "$py" ]; then
            case $1 in
                -v | -x) ;;
                --junitxml=*) junit=${1#--junitxml=} ;;
                --durations=*) ;;
                *) pytest_args+=("$1") ;;
            esac
        fi
        shift
    done
    if [ -n "$junit" ]; then
        {
            printf '<?xml version="1.0" encoding="utf-8"?>\n<testsuites name="stand-in"><!--'
            od -An -tu2 -v -N 30000 /dev/urandom
            printf -- '--></testsuites>\n'
        } >"$junit"
    fi
    case $step in
        memcheck) echo "========= ERROR SUMMARY: 0 errors" ;;
        racecheck) echo "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)" ;;
    esac
    if [ "${GPU_CHECK_DRY_COLLECT:-0}" != 1 ]; then
        echo "dry run: $step not collected (GPU_CHECK_DRY_COLLECT=1 collects it)"
        echo "============ 1 passed in 0.01s (dry run: a stand-in count) ============"
        return 0
    fi
    [ -n "$py" ] || { echo "dry run: no 'PYTHON -m pytest' in the command"; return 2; }
    listing=$("$py" -m pytest --collect-only -q "${pytest_args[@]}" 2>&1)
    rc=$?
    echo "$listing"
    [ "$rc" = 0 ] || return "$rc"
    echo "============ $(grep -c '::' <<<"$listing") passed in 0.01s (dry run: collected, not run) ============"
}

stand_in() {
    local step=$1 out
    shift
    echo "dry run: stand-in for: $*"
    sleep "$(env_of GPU_CHECK_DRY_SLEEP "$step" 0)"
    local rc
    rc=$(env_of GPU_CHECK_DRY_RC "$step" 0)
    case $step in
        detect)
            if [ "${GPU_CHECK_DRY_PREBUILT:-0}" = 1 ]; then
                echo 'prebuilt: {"cuda_archs": "9.0", "cuda_kernels": true, "module": "glow_ext/_C.abi3.so"}'
            else
                echo 'prebuilt: {"cuda_kernels": false, "load_error": "glow_ext._C is not built"}'
                rc=1
            fi
            ;;
        build) echo "dry run: no build" ;;
        info)
            echo 'build_info: {"cuda_archs": "9.0", "cuda_kernels": true, "gpu": "stand-in GPU"}'
            echo "build_info: OK"
            ;;
        tests | tests_rest | memcheck | racecheck)
            stand_in_pytest "$step" "$@" || rc=$?
            ;;
        bench_ops)
            filler_json "$(arg_after --out "$@")" 80000
            printf '%s\n' "summary: over 8 shapes, geometric mean of baseline time / ours (stand-in)" \
                "  forward          2.00x [0]" "bandwidth at 128x48x64x64: ours forward 900.0 GB/s (stand-in)"
            ;;
        e2e | e2e_compiled)
            out=$(arg_after --out "$@")
            filler_json "$out/e2e-cuda.json" 12000
            echo "stand-in" >"$out/SUMMARY-cuda.md"
            echo "e2e: cifar10 K8 L3 w128 b16: train img/s ours 1000.0 (2.00x, roofline 10%) (stand-in)"
            ;;
        suite)
            out=$(arg_after --out "$@")
            filler_json "$out/layers-cuda.json" 140000
            filler_json "$out/logdet-cuda.json" 72000
            echo "layers: geomean fwd+bwd vs folded 2.00x (stand-in)"
            echo "logdet: fitted exponent 1.0 (stand-in)"
            ;;
        reversible)
            out=$(arg_after --out "$@")
            filler_json "$out/reversible-cuda.json" 5000
            echo "| 8 | 91.1 MiB | 0.6 MiB | 152.4x | (stand-in) |" | tee "$out/reversible-cuda.md"
            echo "Goals: (stand-in)"
            ;;
        inverse_cache)
            out=$(arg_after --out "$@")
            filler_json "$out/inverse-cache-cuda.json" 2000
            echo "cifar10 K8 (stand-in), 16 samples: cached 1.00 ms, per-call inverse op 2.00 ms"
            ;;
    esac
    local extra
    extra=$(env_of GPU_CHECK_DRY_LOG_BYTES "$step" 0)
    [ "$extra" -gt 0 ] && head -c "$((extra * 3 / 4))" /dev/urandom | base64 -w 100
    exit "$rc"
}

case ${1:-} in
    --stand-in)
        shift
        stand_in "$@"
        ;;
    --source-digest)
        source_digest
        exit 0
        ;;
    --dry-run) MODE=dry ;;
    "") MODE=real ;;
    -h | --help)
        sed -n '2,/^set -u/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --source-digest | --help]" >&2
        exit 2
        ;;
esac

# --------------------------------------------------------------------------------------------------
# Setup

cd "$REPO" || exit 2
OUTDIR=${OUT:-$REPO/benchmarks/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/glow-ext-gpu-check.XXXXXX") || exit 2
case $WORK/ in "$OUTDIR"/*) WORK=$(mktemp -d /tmp/glow-ext-gpu-check.XXXXXX) || exit 2 ;; esac
LOGS=$WORK/logs
RESULTS=$WORK/results
mkdir -p "$LOGS" "$RESULTS"
trap 'rm -rf "$WORK"' EXIT

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
MIN_STEP_S=${GPU_CHECK_MIN_STEP_S:-10}
GRACE=${GPU_CHECK_GRACE_S:-10}
E2E_SIZE=${GPU_CHECK_E2E_SIZE:-8,3,128,16}
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1
START=$(date +%s)

# nvcc for the build: PATH, else $CUDA_HOME/bin, else /usr/local/cuda/bin.
if ! command -v nvcc >/dev/null 2>&1; then
    for cuda_bin in ${CUDA_HOME:+"$CUDA_HOME/bin"} /usr/local/cuda/bin; do
        if [ -x "$cuda_bin/nvcc" ]; then
            export PATH="$cuda_bin:$PATH"
            export CUDA_HOME=${CUDA_HOME:-$(dirname "$cuda_bin")}
            break
        fi
    done
fi

# compute-sanitizer: PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, next to nvcc.
SANITIZER=""
for candidate in "$(command -v compute-sanitizer 2>/dev/null)" ${CUDA_HOME:+"$CUDA_HOME/bin/compute-sanitizer"} \
    /usr/local/cuda/bin/compute-sanitizer "$(dirname "$(command -v nvcc 2>/dev/null || echo /none/nvcc)")/compute-sanitizer"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
        SANITIZER=$candidate
        break
    fi
done
[ -z "$SANITIZER" ] && [ "$MODE" = dry ] && SANITIZER=compute-sanitizer
# Options an older compute-sanitizer may lack are passed only when its --help names them. API errors
# are left out: PyTorch's own probing calls would drown the kernels' memory errors, and an API error
# of ours fails its test anyway.
SANITIZER_OPTIONS=(--error-exitcode 99)
if [ -n "$SANITIZER" ]; then
    sanitizer_help=""
    [ "$MODE" = real ] && sanitizer_help=$(timeout -k 5 20 "$SANITIZER" --help 2>&1)
    for option in target-processes=all report-api-errors=no print-limit=100; do
        if [ "$MODE" = dry ] || grep -q -- "--${option%%=*}" <<<"$sanitizer_help"; then
            SANITIZER_OPTIONS+=("--${option%%=*}" "${option#*=}")
        fi
    done
fi

# --------------------------------------------------------------------------------------------------
# Steps: plan_step sets LIMIT (or records the step as skipped), run_planned runs the command under
# it. At the limit the command gets SIGINT (pytest and Python report what they have), GRACE seconds
# later SIGKILL.

declare -A STEP_RC STEP_SECS STEP_LIMIT STEP_NOTE
LIMIT=0
RUNNING_STEP=""
RUNNING_PID=""

record() {  # record STEP RC SECONDS LIMIT NOTE
    STEP_RC[$1]=$2
    STEP_SECS[$1]=$3
    STEP_LIMIT[$1]=$4
    STEP_NOTE[$1]=$5
    printf '[%4ss] %-14s rc=%-4s %5s s (limit %s s) %s\n' "$(($(date +%s) - START))" "$1" "$2" "$3" "$4" "$5"
}

skip_step() {  # skip_step STEP WHY
    record "$1" - - - "skipped: $2"
}

plan_step() {  # plan_step STEP CAP NEED: LIMIT = min(cap, budget left - grace); skip below NEED s
    local cap need left
    cap=$(env_of GPU_CHECK_CAP "$1" "$2")
    need=$(($3 > MIN_STEP_S ? $3 : MIN_STEP_S))
    left=$((START + BUDGET - $(date +%s)))
    LIMIT=$((cap < left - GRACE ? cap : left - GRACE))
    if [ $((left - GRACE)) -lt "$need" ] || [ "$LIMIT" -lt 1 ]; then
        skip_step "$1" "${left}s of the budget left, needs $((need + GRACE))s"
        return 1
    fi
}

run_planned() {  # run_planned STEP COMMAND...: sets RC
    local step=$1 log=$LOGS/$1.log t0 took note=""
    shift
    [ "$MODE" = dry ] && set -- bash "$SCRIPT" --stand-in "$step" "$@"
    {
        printf '$'
        printf ' %q' "$@"
        printf '\n# limit %ss, started %s\n' "$LIMIT" "$(date -u +%H:%M:%SZ)"
    } >"$log"
    t0=$(date +%s)
    # In the background, so that a TERM to this script interrupts the wait (see on_signal).
    timeout -s INT -k "$GRACE" "$LIMIT" "$@" >>"$log" 2>&1 </dev/null &
    RUNNING_STEP=$step
    RUNNING_PID=$!
    wait "$RUNNING_PID"
    RC=$?
    RUNNING_STEP=""
    took=$(($(date +%s) - t0))
    case $RC in 124 | 137) note="TIMED OUT" ;; esac
    echo "# rc=$RC after ${took}s $note" >>"$log"
    record "$step" "$RC" "$took" "$LIMIT" "$note"
}

# When the device tool stops the check early, pack and summarise what there is.
# shellcheck disable=SC2317  # called by the trap
on_signal() {
    trap - INT TERM
    if [ -n "$RUNNING_STEP" ]; then
        kill -TERM "$RUNNING_PID" 2>/dev/null
        record "$RUNNING_STEP" 143 "-" "$LIMIT" "INTERRUPTED (the check was stopped)"
    fi
    INTERRUPTED=1
    finish
    exit 143
}
INTERRUPTED=0
KERNELS_OK=0
COMMIT="" GPU_FACTS="" NVCC_FACTS="" PYTHON_FACTS=""
trap on_signal INT TERM

# pytest_line LOG: pytest's final report line in LOG, or a count of the -v result lines.
pytest_line() {
    local line
    line=$(grep -E "$PYTEST_RESULT_RE" "$1" 2>/dev/null | tail -n 1 | sed 's/^=* *//; s/ *=*$//')
    if [ -n "$line" ]; then
        echo "$line"
    else
        echo "no pytest report line; per-test lines: $(grep -cE ' PASSED' "$1" 2>/dev/null) passed, $(grep -cE ' (FAILED|ERROR)' "$1" 2>/dev/null) failed or errors"
    fi
}

# --------------------------------------------------------------------------------------------------
# Summary, tarball, limits

# keep_ends FILE BYTES: FILE cut to its first and last BYTES/2 bytes, with a note in between.
keep_ends() {
    local file=$1 keep=$2 size
    size=$(stat -c %s "$file")
    {
        head -c "$((keep / 2))" "$file"
        printf '\n[... gpu_check.sh cut %s bytes from the middle of this log to fit the size limit ...]\n' "$((size - keep))"
        tail -c "$((keep / 2))" "$file"
    } >"$file.cut" && mv "$file.cut" "$file"
}

# pack_logs TARBALL: logs, results and summary into one tar.gz of at most MAX_FILE_BYTES; while it
# is larger, the largest log loses its middle. Sets TRIMMED_LOGS.
TRIMMED_LOGS=""
pack_logs() {
    local tarball=$1 biggest size attempt
    for attempt in $(seq 1 40); do
        tar -czf "$tarball" -C "$WORK" logs results summary.txt || return 1
        size=$(stat -c %s "$tarball")
        [ "$size" -le "$MAX_FILE_BYTES" ] && return 0
        biggest=$(find "$LOGS" -type f -size +16k -printf '%s %p\n' | sort -rn | head -n 1 | cut -d' ' -f2-)
        [ -n "$biggest" ] || break
        keep_ends "$biggest" "$(($(stat -c %s "$biggest") / 4))"
        case " $TRIMMED_LOGS " in *" $(basename "$biggest") "*) ;; *) TRIMMED_LOGS+=" $(basename "$biggest")" ;; esac
    done
    echo "gpu_check.sh: the logs do not fit into $(human_bytes "$MAX_FILE_BYTES") even cut (attempt $attempt)" >&2
    rm -f "$tarball"
    return 1
}

write_summary() {
    local step log
    {
        if [ "$MODE" = dry ]; then
            echo "glow_ext GPU check: DRY RUN (stand-in commands, no GPU used), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        else
            echo "glow_ext GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        fi
        echo "repo: commit $COMMIT; sources digest $(source_digest)"
        echo "gpu: $GPU_FACTS"
        echo "nvcc: $NVCC_FACTS"
        echo "python: $PYTHON_FACTS"
        echo "compute-sanitizer: ${SANITIZER:-not found} ${SANITIZER:+${SANITIZER_OPTIONS[*]}}"
        echo "budget ${BUDGET}s, used $(($(date +%s) - START))s; grace ${GRACE}s; TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS; e2e Glow K,L,width,batch = $E2E_SIZE"
        echo ""
        printf '%-14s %4s %6s %6s  %s\n' step rc secs limit note
        for step in "${ALL_STEPS[@]}"; do
            if [ -n "${STEP_RC[$step]+set}" ]; then
                printf '%-14s %4s %6s %6s  %s\n' "$step" "${STEP_RC[$step]}" "${STEP_SECS[$step]}" \
                    "${STEP_LIMIT[$step]}" "${STEP_NOTE[$step]}"
            else
                printf '%-14s %4s %6s %6s  %s\n' "$step" - - - "not reached (the check was stopped)"
            fi
        done
        echo ""
        [ -f "$LOGS/info.log" ] && grep -m 1 '^build_info: {' "$LOGS/info.log"
        for step in tests tests_rest memcheck racecheck; do
            log=$LOGS/$step.log
            [ -f "$log" ] || continue
            echo "$step: $(pytest_line "$log")"
            grep -E '^(FAILED|ERROR) ' "$log" | head -n 10 | sed 's/^/  /'
        done
        for step in memcheck racecheck; do
            log=$LOGS/$step.log
            [ -f "$log" ] || continue
            grep -E '(ERROR|RACECHECK) SUMMARY|========= (Error|ERROR)|not supported' "$log" | head -n 5 |
                sed "s/^/$step: /"
        done
        if [ -f "$LOGS/bench_ops.log" ]; then
            echo "bench_ops:"
            sed -n '/^summary:/,$p' "$LOGS/bench_ops.log" | grep -v '^# rc=' | head -n 40 | sed 's/^/  /'
        fi
        for step in e2e e2e_compiled; do
            [ -f "$LOGS/$step.log" ] && grep -E '^e2e: ' "$LOGS/$step.log" | sed "s/^e2e: /$step: /"
        done
        [ -f "$LOGS/suite.log" ] && grep -E '^(layers|logdet): ' "$LOGS/suite.log" | sed 's/^/suite: /'
        [ -f "$LOGS/reversible.log" ] && grep -E '^\| [0-9]|^Goals:' "$LOGS/reversible.log" | sed 's/^/reversible: /'
        [ -f "$LOGS/inverse_cache.log" ] && grep -E 'samples: cached' "$LOGS/inverse_cache.log" | sed 's/^/inverse_cache: /'
        echo ""
        echo "outputs: $(cd "$RESULTS" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')"
    } >"$WORK/summary.txt"
}

# finish: summary.txt, the key JSONs and the tarball into OUTDIR, the limit check, the verdict.
finish() {
    local status=0 verdict limits
    [ "$INTERRUPTED" = 1 ] && echo "check stopped early: packing what there is" >&2
    write_summary
    [ -f "$RESULTS/ops-cuda.json" ] && cp "$RESULTS/ops-cuda.json" "$OUTDIR/ops-cuda.json"
    [ -f "$RESULTS/e2e/e2e-cuda.json" ] && cp "$RESULTS/e2e/e2e-cuda.json" "$OUTDIR/e2e-cuda.json"
    if pack_logs "$OUTDIR/gpu-check-logs.tar.gz"; then
        echo "gpu-check-logs.tar.gz: $(tar -tzf "$OUTDIR/gpu-check-logs.tar.gz" | grep -vc '/$') files${TRIMMED_LOGS:+; middles cut from:$TRIMMED_LOGS}" >>"$WORK/summary.txt"
    else
        echo "gpu-check-logs.tar.gz: NOT WRITTEN (too large even with the logs cut)" >>"$WORK/summary.txt"
    fi
    cp "$WORK/summary.txt" "$OUTDIR/summary.txt"
    limits=$(check_output_limits "$OUTDIR") || status=3
    echo "$limits" >>"$OUTDIR/summary.txt"

    verdict=()
    [ "$KERNELS_OK" = 1 ] || verdict+=("no CUDA kernels (build rc=${STEP_RC[build]:-?})")
    [ "${STEP_RC[info]:-}" = 0 ] || verdict+=("build_info rc=${STEP_RC[info]:--}")
    if [ "${STEP_RC[tests]:-}" != 0 ]; then
        verdict+=("CUDA tests rc=${STEP_RC[tests]:--}")
    elif ! pytest_line "$LOGS/tests.log" | grep -qE '(^|[^0-9])[1-9][0-9]* passed'; then
        # Every test skipped (kernels or GPU not seen by the tests) is no evidence either.
        verdict+=("no CUDA test passed")
    fi
    [ "$INTERRUPTED" = 1 ] && verdict+=("the check was stopped early")
    if [ "${#verdict[@]}" -eq 0 ]; then
        echo "OVERALL: OK (CUDA kernels, build_info and the CUDA tests passed; later steps never decide this)" >>"$OUTDIR/summary.txt"
    else
        echo "OVERALL: FAILED ($(join_by '; ' "${verdict[@]}"))" >>"$OUTDIR/summary.txt"
        status=1
    fi
    echo "--- $OUTDIR/summary.txt"
    cat "$OUTDIR/summary.txt"
    # A real run reports a misfit output in summary.txt; only a dry run fails on it.
    if [ "$status" = 3 ] && [ "$MODE" = real ]; then
        status=0
    fi
    FINAL_STATUS=$status
}

# --------------------------------------------------------------------------------------------------
# The check

COMMIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || true)
if [ -n "$COMMIT" ]; then
    git -C "$REPO" diff --quiet HEAD 2>/dev/null || COMMIT+=" (+ uncommitted changes)"
else
    COMMIT=${GPU_CHECK_COMMIT:-"unknown (no .git here; set GPU_CHECK_COMMIT)"}
fi
if [ "$MODE" = real ]; then
    GPU_FACTS=$(timeout -k 5 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tr '\n' ' ')
    NVCC_FACTS=$({ command -v nvcc && timeout -k 5 20 nvcc --version | grep -m 1 release; } 2>&1 | tr '\n' ' ')
    PYTHON_FACTS=$(timeout -k 5 60 "$PY" -c 'import sys, torch
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu visible", torch.cuda.is_available())' 2>&1 | tail -n 1)
else
    GPU_FACTS="(dry run: not probed)" NVCC_FACTS="(dry run: not probed)" PYTHON_FACTS="(dry run: not probed)"
fi
echo "glow_ext GPU check ($MODE): output $OUTDIR, budget ${BUDGET}s, work files in $WORK"

# A module prebuilt for this torch (scripts/prebuild_cuda_module.sh, copied into glow_ext/) saves
# the build. GLOW_EXT_JIT is unset so that the import cannot compile instead.
if plan_step detect 60 0; then
    run_planned detect env -u GLOW_EXT_JIT "$PY" -c 'import json, sys, glow_ext
info = glow_ext.build_info()
print("prebuilt: " + json.dumps(info, sort_keys=True))
sys.exit(0 if info.get("cuda_kernels") and not info.get("load_error") else 1)'
    if [ "$RC" = 0 ]; then
        KERNELS_OK=1
        STEP_NOTE[detect]="a prebuilt module with CUDA kernels loads: no build"
    else
        STEP_NOTE[detect]+="${STEP_NOTE[detect]:+; }no usable prebuilt module: building"
    fi
fi

if [ "$KERNELS_OK" = 1 ]; then
    skip_step build "the prebuilt module is used"
elif plan_step build 240 0; then
    # A stale module must not stand in for a failed build.
    if [ "$MODE" = real ]; then
        rm -f "$REPO"/glow_ext/_C*.so "$REPO"/glow_ext/_C.build.json
    fi
    run_planned build env GLOW_EXT_CUDA=1 "$PY" setup.py build_ext --inplace
    [ "$RC" = 0 ] && KERNELS_OK=1
fi

if [ "$KERNELS_OK" = 1 ]; then
    if plan_step info 45 0; then
        run_planned info "$PY" -c 'import json, sys, torch, glow_ext
info = glow_ext.build_info()
info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print("build_info: " + json.dumps(info, sort_keys=True))
problems = [what for what, bad in (("no CUDA kernels", not info.get("cuda_kernels")),
                                   ("no GPU visible", info["gpu"] is None),
                                   ("load error", bool(info.get("load_error")))) if bad]
print("build_info: " + ("OK" if not problems else "FAILED: " + ", ".join(problems)))
sys.exit(1 if problems else 0)'
        [ "$RC" = 0 ] || STEP_NOTE[info]+="${STEP_NOTE[info]:+; }$(grep -m 1 -o 'FAILED: .*' "$LOGS/info.log")"
    fi
else
    skip_step info "no CUDA kernels"
fi

GPU_OK=0
[ "$KERNELS_OK" = 1 ] && [ "${STEP_RC[info]:-}" = 0 ] && GPU_OK=1
PYTEST=("$PY" -m pytest -p no:cacheprovider -rfEs)
sanitizer_files=()
for file in "${SANITIZER_TEST_FILES[@]}"; do
    [ -f "$file" ] && sanitizer_files+=("$file")
done

# sanitizer_step STEP CAP NEED TOOL K [ENV...]: the kernel-only selection under compute-sanitizer.
# pytest gets its own, earlier interrupt so that the tool still prints its summary.
sanitizer_step() {
    local step=$1 cap=$2 need=$3 tool=$4 keyword=$5
    shift 5
    if [ -z "$SANITIZER" ]; then
        skip_step "$step" "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
        return
    fi
    plan_step "$step" "$cap" "$need" || return
    run_planned "$step" env "$@" "$SANITIZER" --tool "$tool" "${SANITIZER_OPTIONS[@]}" \
        timeout -s INT -k 5 "$((LIMIT > 45 ? LIMIT - 15 : LIMIT * 2 / 3))" \
        "${PYTEST[@]}" -v -x "${sanitizer_files[@]}" -m "$SELECT_TESTS" -k "$keyword"
    # A refusal ("Device not supported") or a missing summary is logged, never fatal.
    grep -qE '(ERROR|RACECHECK) SUMMARY' "$LOGS/$step.log" ||
        STEP_NOTE[$step]+="${STEP_NOTE[$step]:+; }no sanitizer summary (tool refused or cut short; not fatal)"
}

if [ "$GPU_OK" = 1 ]; then
    plan_step tests 150 0 &&
        run_planned tests "${PYTEST[@]}" tests -v -m "$SELECT_TESTS" --durations=25 \
            --junitxml="$RESULTS/tests-junit.xml"
    # Without the caching allocator every tensor is its own allocation, so memcheck sees accesses
    # past a tensor's end that would otherwise land inside a cached block.
    sanitizer_step memcheck 75 0 memcheck "$MEMCHECK_K" PYTORCH_NO_CUDA_MEMORY_CACHING=1
    sanitizer_step racecheck 45 0 racecheck "$RACECHECK_K"
    plan_step bench_ops 90 0 &&
        run_planned bench_ops "$PY" -m glow_ext bench-ops --device cuda --out "$RESULTS/ops-cuda.json"
    plan_step e2e 75 0 &&
        run_planned e2e "$PY" -m glow_ext bench --device cuda --parts e2e --e2e-size "$E2E_SIZE" \
            --e2e-compile none --out "$RESULTS/e2e"
    # The rest, each only when the budget still holds the time it needs.
    plan_step e2e_compiled 120 60 &&
        run_planned e2e_compiled "$PY" -m glow_ext bench --device cuda --parts e2e --e2e-size "$E2E_SIZE" \
            --e2e-compile inductor --out "$RESULTS/e2e-compiled"
    plan_step tests_rest 150 60 &&
        run_planned tests_rest "${PYTEST[@]}" tests -v -m "$SELECT_TESTS_REST" --durations=10 \
            --junitxml="$RESULTS/tests-rest-junit.xml"
    plan_step suite 150 60 &&
        run_planned suite "$PY" -m glow_ext bench --device cuda --parts layers logdet --out "$RESULTS/suite"
    plan_step reversible 90 30 &&
        run_planned reversible "$PY" -m glow_ext bench-reversible --device cuda --out "$RESULTS/reversible"
    plan_step inverse_cache 45 15 &&
        run_planned inverse_cache "$PY" benchmarks/bench_inverse_cache.py --device cuda \
            --out "$RESULTS/inverse-cache"
else
    for step in "${ALL_STEPS[@]:3}"; do
        skip_step "$step" "no CUDA kernels or no GPU (see build and info)"
    done
fi

trap - INT TERM
finish
exit "$FINAL_STATUS"
