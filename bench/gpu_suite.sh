#!/usr/bin/env bash
# The GPU suite: one call on a machine with a CUDA GPU (offline: nothing is installed from a
# registry) proves the kernels, highest-risk checks first, within SUITE_SECONDS (560 by default:
# a 15-minute device window holds the machine's start and one call of under 10 minutes).
#
#   0-~5 min  build the extension (sm_90, MAX_JOBS=16) and, at the same time, compile the CUDA
#             selftest with plain nvcc and run the Triton GPU checks (bf16, values up to 4096 wide:
#             they need no extension); then the selftest, memcheck and racecheck of it, the CUDA
#             persistent kernels on chunked plans and under barrier stress (bench/gpu_checks.py),
#             and the NaN/+inf attention rows;
#   then      the whole pytest suite on the GPU, compute-sanitizer (memcheck, racecheck,
#             initcheck) over bench/sanitize_parity.py, and the benchmarks in what time is left.
#
# Every stage has a time limit (its cap, never more than leaves the later stages their reserve);
# a failing or timed-out stage never stops the rest. The end of the output, and summary.txt, hold
# one line per stage and one VERDICT line per kernel family (verified / FAILED with the first
# failing case / unverified and why), from bench/gpu_verdict.py. Everything lands under
# ${OUT:-./gpu_out}: summary.txt, the benchmark's .json/.md/.png, logs/ (every stage's log, the
# junit XML, stages.tsv).
#
# Knobs:
#   STAGES=build,selftest_build,...  the stages to run (default: all; `DRY_RUN=1` lists them)
#   SUITE_SECONDS=560                wall-clock budget of the whole suite
#   BENCH_ARGS="--family cells"      extra arguments for `python -m bench`
#   DRY_RUN=1                        run nothing: print each stage with its limit and feed the
#                                    verdict an "ok" line per stage (DRY_RUN_FAIL=stage fails one)
#   MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 FUSED_S2S_REQUIRE_BACKENDS=torch,cpp,triton
set -u

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
SUITE_SECONDS=${SUITE_SECONDS:-560}
DRY_RUN=${DRY_RUN:-0}
START=$(date +%s)
DEADLINE=$((START + SUITE_SECONDS))
PY=${PYTHON:-$(command -v python || command -v python3)}
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FUSED_S2S_CUDA=1
export FUSED_S2S_REQUIRE_BACKENDS=${FUSED_S2S_REQUIRE_BACKENDS:-torch,cpp,triton}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
: >"$LOGS/stages.tsv"

# name | families | cap s | reserve s (kept for the stages after it) ; in run order
STAGE_TABLE="
build|build,cuda-cells,cuda-attention,cuda-persistent|240|300
selftest_build|cuda-cells,cuda-attention|240|300
triton_checks|triton-cells,triton-attention,triton-persistent|240|300
selftest|cuda-cells,cuda-attention|60|330
selftest_memcheck|cuda-cells,cuda-attention|60|300
selftest_racecheck|cuda-cells,cuda-attention|60|270
cuda_checks|cuda-persistent|120|210
nan_rows|cuda-attention|45|200
suite|cuda-cells,cuda-attention,cuda-persistent,triton-cells,triton-attention,triton-persistent|170|100
memcheck|cuda-cells,cuda-attention,cuda-persistent,triton-cells,triton-attention,triton-persistent|60|60
racecheck|cuda-cells,cuda-attention,cuda-persistent|45|30
initcheck|cuda-cells,cuda-attention,cuda-persistent|40|15
bench||600|10
"
STAGES=${STAGES:-$(echo "$STAGE_TABLE" | cut -d'|' -f1 | paste -sd, - | sed 's/^,//')}

wants() { [[ ",$STAGES," == *",$1,"* ]]; }
field() { echo "$STAGE_TABLE" | grep "^$1|" | cut -d'|' -f"$2"; }

# seconds stage NAME may take: its cap, but never so much that less than its reserve is left
budget() {
    local cap reserve left
    cap=$(field "$1" 3)
    reserve=$(field "$1" 4)
    left=$((DEADLINE - $(date +%s) - reserve))
    ((left < cap)) && cap=$left
    echo "$cap"
}

# run_stage NAME COMMAND...: COMMAND under its time limit (SIGINT first, so pytest and the
# benchmark runner still write their reports), output to $LOGS/NAME.log, one row in stages.tsv.
run_stage() {
    local name=$1 secs log=$LOGS/$1.log t0 rc status
    shift
    secs=$(budget "$name")
    if ((secs < 10)); then
        printf '%s\t%s\tSKIPPED\t0\t\n' "$name" "$(field "$name" 2)" >>"$LOGS/stages.tsv"
        echo "=== $name: skipped, no time left in the ${SUITE_SECONDS}s budget"
        return 0
    fi
    echo "=== $name (limit ${secs}s) [$(field "$name" 2)]: $*"
    t0=$(date +%s)
    if [[ $DRY_RUN == 1 ]]; then
        if [[ ${DRY_RUN_FAIL:-} == "$name" ]]; then
            echo "CHECK $(field "$name" 2 | cut -d, -f1) FAIL $name: dry run" >"$log"
            rc=1
        else
            for family in $(field "$name" 2 | tr , ' '); do echo "CHECK $family ok $name: dry run"; done >"$log"
            rc=0
        fi
    else
        timeout -s INT -k 20 "$secs" "$@" >"$log" 2>&1
        rc=$?
    fi
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAILED rc=$rc" ;;
    esac
    tail -n 4 "$log" | sed "s/^/  [$name] /"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$(field "$name" 2)" "$status" "$(($(date +%s) - t0))" "$name.log" \
        >>"$LOGS/stages.tsv"
    return 0
}

# ------------------------------------------------------------------------------ environment
if [[ $DRY_RUN != 1 ]]; then
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified file(s)"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
        command -v nvcc >/dev/null && nvcc --version | tail -n 2
        "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
    } >"$LOGS/environment.log" 2>&1
    cat "$LOGS/environment.log"
fi
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
    /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
SANITIZER=${SANITIZER:-compute-sanitizer}
SELFTEST=$(mktemp -d "${TMPDIR:-/tmp}/fused_s2s_selftest.XXXXXX")/fused_s2s_selftest  # not under $OUT: a binary

# ---------------------------------------------------- 0-~5 min: build, selftest, Triton, NaN
build() {
    # the editable install puts fused_s2s (and fused_s2s.triton_kernels) on the path; where pip
    # cannot install offline, build the extension in place instead; loading the backends last
    # runs the package's first-use build if neither produced the extension
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . ||
        { echo "pip install failed; building in place"; "$PY" setup.py build_ext --inplace; }
    "$PY" -c "from fused_s2s import backends; print(backends.describe()); backends.load('cpp')"
}
selftest_build() {
    # plain nvcc (the .cu files have no torch headers), one process per file
    local dir pids=() f
    dir=$(mktemp -d)
    for f in csrc/cuda/selftest/selftest.cu csrc/cuda/{gru_cell,lstm_cell,additive_attention,dot_attention}.cu; do
        nvcc -std=c++17 -O2 -arch=sm_90 -I csrc/include -I csrc/cuda -c "$f" -o "$dir/$(basename "$f").o" &
        pids+=($!)
    done
    for f in "${pids[@]}"; do wait "$f" || return 1; done
    nvcc -arch=sm_90 -o "$SELFTEST" "$dir"/*.o
}
triton_checks() {
    # Triton needs no extension: bf16 and the wide values while the extension builds (which
    # this stage must not start a first-use build of)
    export FUSED_S2S_NO_EXTENSION=1 FUSED_S2S_REQUIRE_BACKENDS=torch,triton
    "$PY" bench/gpu_checks.py --only '^triton'
    local rc=$?
    "$PY" -m pytest -q -rfE -p no:cacheprovider --junitxml="$LOGS/triton_checks.xml" tests/test_triton_kernels.py \
        tests/test_persistent.py -k "cuda and not compiles" || rc=1
    return $rc
}
export -f build selftest_build triton_checks
export PY LOGS SELFTEST

bg=()
wants build && { run_stage build bash -c build & bg+=($!); }
wants selftest_build && { run_stage selftest_build bash -c selftest_build & bg+=($!); }
wants triton_checks && { run_stage triton_checks bash -c triton_checks & bg+=($!); }
for pid in "${bg[@]}"; do wait "$pid"; done

wants selftest && run_stage selftest "$SELFTEST"
wants selftest_memcheck && run_stage selftest_memcheck "$SANITIZER" --tool memcheck --error-exitcode 3 \
    --print-limit 30 --leak-check no "$SELFTEST" --quick
wants selftest_racecheck && run_stage selftest_racecheck "$SANITIZER" --tool racecheck --racecheck-report hazard \
    --error-exitcode 3 --print-limit 30 "$SELFTEST" --quick
wants cuda_checks && run_stage cuda_checks "$PY" bench/gpu_checks.py --only '^(chunked|barrier)'
wants nan_rows && run_stage nan_rows "$PY" -m pytest -q -rfE -p no:cacheprovider --junitxml="$LOGS/nan_rows.xml" \
    tests/test_cpp_backend.py -k nan_and_inf

# ------------------------------------------------------- then: the suite, sanitizers, benchmarks
wants suite && run_stage suite "$PY" -m pytest -q -rfE -p no:cacheprovider --junitxml="$LOGS/suite.xml" tests \
    -k "not compiles_for_sm90"  # a CPU-side compile of every Triton variant: CI runs it
# without the caching allocator every tensor is its own allocation, so memcheck sees an access
# past a tensor's end instead of landing inside a larger cached block
wants memcheck && run_stage memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
    --error-exitcode 3 --print-limit 30 --leak-check no "$PY" bench/sanitize_parity.py
wants racecheck && run_stage racecheck "$SANITIZER" --tool racecheck --racecheck-report hazard --error-exitcode 3 \
    --print-limit 30 "$PY" bench/sanitize_parity.py --backends cpp
# reads of device memory nobody wrote (a kernel trusting an output it never filled)
wants initcheck && run_stage initcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool initcheck \
    --error-exitcode 3 --print-limit 30 "$PY" bench/sanitize_parity.py --backends cpp
if wants bench; then
    secs=$(budget bench)
    # the runner stops starting new cases after its own budget and writes what it has
    run_stage bench "$PY" -m bench --graphs --plot --budget-ms 50 --out "$OUT" \
        --time-budget $((secs > 90 ? secs - 45 : secs * 2 / 3)) ${BENCH_ARGS:-}
fi

# ------------------------------------------------------------------------------ summary
{
    echo "fused_s2s GPU suite: $(($(date +%s) - START))s of ${SUITE_SECONDS}s"
    head -n 3 "$LOGS/environment.log" 2>/dev/null
    awk -F'\t' '{ printf "%-20s %-14s %4ss\n", $1, $3, $4 }' "$LOGS/stages.tsv"
    grep -h -E '^CHECK \S+ FAIL|^FAIL|^(FAILED|ERROR) ' "$LOGS"/*.log 2>/dev/null | head -n 30
    "$PY" bench/gpu_verdict.py "$LOGS"
    echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} >"$OUT/summary.txt" 2>&1
echo
cat "$OUT/summary.txt"
