#!/usr/bin/env bash
# The GPU suite, in one call on a machine with a CUDA GPU (offline: nothing is installed from a
# registry):
#   1. build the extension for the device (sm_90 by default) with many jobs;
#   2. run the whole pytest suite on the GPU (junit XML + log);
#   3. compute-sanitizer memcheck, racecheck and initcheck over bench/sanitize_parity.py;
#   4. run the benchmark suite (JSON, Markdown, PNG).
# Not in the default stages (slow, a call of its own): STAGES=sanitize_suite runs memcheck over
# the whole parity test file (tests/test_parity.py) on the GPU.
# Everything lands under ${OUT:-./gpu_out}: summary.txt, the benchmark's .json/.md/.png, and
# logs.tar.gz (every stage's log and the junit XML). A failing stage never stops the later
# ones; the summary is printed at the end.
#
# Environment knobs:
#   STAGES=build,test,sanitize,bench   which stages to run (e.g. STAGES=bench for a re-run;
#                                      STAGES=sanitize_suite SUITE_SECONDS=560 for the slow one)
#   SUITE_SECONDS=530                  wall-clock budget for the whole suite
#   BENCH_ARGS="--filter cells"        extra arguments for `python -m bench`
#   MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 FUSED_S2S_REQUIRE_BACKENDS=torch,cpp,triton
set -u

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/fused_s2s_gpu_suite.XXXXXX")
STAGES=${STAGES:-build,test,sanitize,bench}
SUITE_SECONDS=${SUITE_SECONDS:-530}
START=$(date +%s)
DEADLINE=$((START + SUITE_SECONDS))
PY=${PYTHON:-$(command -v python || command -v python3)}
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FUSED_S2S_CUDA=1
export FUSED_S2S_REQUIRE_BACKENDS=${FUSED_S2S_REQUIRE_BACKENDS:-torch,cpp,triton}
export PYTHONUNBUFFERED=1

SUMMARY=()

wants() { [[ ",$STAGES," == *",$1,"* ]]; }

# seconds a stage may take: at most CAP, leaving RESERVE seconds for the stages after it
budget() {
    local cap=$1 reserve=$2 left
    left=$((DEADLINE - $(date +%s) - reserve))
    ((left < cap)) && cap=$left
    echo $cap
}

# run_stage NAME SECONDS DETAIL_CMD -- COMMAND...: run COMMAND with a time limit (SIGINT first,
# so pytest and the benchmark runner still write their reports), log to $LOGS/NAME.log, and
# record one summary line: status, seconds, and the output of DETAIL_CMD on the log.
run_stage() {
    local name=$1 secs=$2 detail=$3
    shift 4
    local log=$LOGS/$name.log t0 rc status
    if ((secs < 10)); then
        SUMMARY+=("$(printf '%-10s SKIPPED  (no time left in the %ss budget)' "$name" "$SUITE_SECONDS")")
        return 1
    fi
    echo "=== $name (limit ${secs}s): $*" | tee -a "$LOGS/suite.log"
    t0=$(date +%s)
    timeout -s INT -k 20 "$secs" "$@" >"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT" ;;
        *) status="FAILED rc=$rc" ;;
    esac
    tail -n 5 "$log" | sed "s/^/  [$name] /"
    SUMMARY+=("$(printf '%-10s %-13s %4ss  %s' "$name" "$status" "$(($(date +%s) - t0))" "$(eval "$detail" <"$log" 2>/dev/null | tr '\n' ' ' | cut -c1-300)")")
    return $rc
}

# ------------------------------------------------------------------------------ environment
{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified file(s)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
} >"$LOGS/environment.log" 2>&1
cat "$LOGS/environment.log"

# ------------------------------------------------------------------------------ 1. build
build() {
    # the editable install puts fused_s2s (and fused_s2s.triton_kernels) on the path; where pip
    # cannot install offline, build the extension in place instead; loading the backends last
    # runs the package's first-use build if neither produced the extension
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . ||
        { echo "pip install failed; building in place"; "$PY" setup.py build_ext --inplace; }
    local rc=$?
    "$PY" -c "from fused_s2s import backends; print(backends.describe())"
    return $rc
}
export -f build
export PY
if wants build; then
    run_stage build "$(budget 240 240)" "grep -E -i 'error|Successfully installed|available' | tail -n 4" -- bash -c build
fi
timeout 300 "$PY" -c "from fused_s2s import backends; print(backends.describe())" >"$LOGS/backends.log" 2>&1
sed 's/^/  [backends] /' "$LOGS/backends.log"
SUMMARY+=("$(printf '%-10s %s' backends "$(grep -E '^  (torch|cpp|triton) ' "$LOGS/backends.log" | sed 's/^ *//' | cut -c1-100 | paste -sd '|' -)")")

# ------------------------------------------------------------------------------ 2. tests
if wants test; then
    run_stage test "$(budget 150 200)" "grep -E '(passed|failed|error|skipped)' | tail -n 1" -- \
        "$PY" -m pytest -q -rfE -p no:cacheprovider --junitxml="$LOGS/junit.xml" tests
    grep -E '^(FAILED|ERROR) ' "$LOGS/test.log" | head -n 30 >"$LOGS/test_failures.txt"
fi

# ------------------------------------------------------------------------------ 3. sanitizer
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
    /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if wants sanitize; then
    if [[ -z $SANITIZER ]]; then
        SUMMARY+=("$(printf '%-10s SKIPPED  compute-sanitizer not found' sanitize)")
    else
        # without the caching allocator every tensor is its own allocation, so memcheck sees
        # an access past a tensor's end instead of landing inside a larger cached block
        run_stage memcheck "$(budget 75 150)" "grep -E 'ERROR SUMMARY|sanitize_parity:'" -- \
            env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 30 --leak-check no \
            "$PY" bench/sanitize_parity.py
        run_stage racecheck "$(budget 60 110)" "grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|sanitize_parity:'" -- \
            "$SANITIZER" --tool racecheck --racecheck-report hazard --error-exitcode 3 --print-limit 30 \
            "$PY" bench/sanitize_parity.py
        # reads of device memory nobody wrote (a kernel trusting an output it never filled)
        run_stage initcheck "$(budget 60 90)" "grep -E 'ERROR SUMMARY|sanitize_parity:'" -- \
            env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool initcheck --error-exitcode 3 --print-limit 30 \
            "$PY" bench/sanitize_parity.py
    fi
fi
if wants sanitize_suite && [[ -n $SANITIZER ]]; then
    run_stage sanitize_suite "$(budget 540 10)" "grep -E 'ERROR SUMMARY|passed|failed' | tail -n 2" -- \
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 30 \
        --leak-check no "$PY" -m pytest -q -x -p no:cacheprovider tests/test_parity.py -k cuda
fi

# ------------------------------------------------------------------------------ 4. benchmarks
if wants bench; then
    secs=$(budget 600 15)
    # the runner stops starting new cases after its own budget and writes what it has
    run_stage bench "$secs" "grep -E 'rows in|Error' | tail -n 1" -- \
        "$PY" -m bench --graphs --plot --budget-ms 50 --out "$OUT" --time-budget $((secs > 90 ? secs - 60 : secs * 2 / 3)) ${BENCH_ARGS:-}
fi

# ------------------------------------------------------------------------------ summary
{
    echo "fused_s2s GPU suite: $(($(date +%s) - START))s of ${SUITE_SECONDS}s, stages: $STAGES"
    head -n 3 "$LOGS/environment.log"
    printf '%s\n' "${SUMMARY[@]}"
    if [[ -s $LOGS/test_failures.txt ]]; then
        echo "failed tests (first 30):"
        cat "$LOGS/test_failures.txt"
    fi
    echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')logs.tar.gz"
} >"$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
rm -rf "$LOGS"
echo
cat "$OUT/summary.txt"
