#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call: build the CUDA kernels, run the tests with
# CUDA and Triton live, check the kernels with compute-sanitizer, and run the GPU benchmarks.
#
#   bash bench/gpu_suite.sh                    # all stages
#   bash bench/gpu_suite.sh build test         # some stages, in this order
#
# Stages: build, test, sanitize, bench. Logs go to $OUT (default /tmp/gpu_suite), one file per
# stage plus bench.json; a table of stages and their exit codes is printed last. The figures
# for bench/RESULTS.md are in bench.log (ratios to each group's baseline), mixing.log and
# quickbench.log. A stage that fails does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test sanitize bench)
SUMMARY=()

stage_build() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nvcc --version | tail -2
    git log -1 --format='commit %h %cd' --date=iso
    # --no-deps: nothing can be fetched there, and the image already has every dependency
    FASTMIX_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
        "$PY" -m pip install --no-build-isolation --no-deps -e . &&
        "$PY" -m fastmix info
}

stage_test() {
    "$PY" -m pytest -q -ra tests --junitxml="$OUT/tests.xml"
}

stage_sanitize() {
    # memcheck on every CUDA and Triton test of the kernels; racecheck on the SVD (shared memory)
    local status=0
    compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PY" -m pytest -q -x -p no:cacheprovider tests/test_alignment_ops.py tests/test_batched_svd.py \
        tests/test_leverage.py -k cuda || status=1
    compute-sanitizer --tool racecheck --error-exitcode 1 \
        "$PY" -m pytest -q -x -p no:cacheprovider tests/test_batched_svd.py -k "cuda and not hypothesis" || status=1
    return $status
}

stage_bench() {
    local status=0
    "$PY" -m pytest bench -k cuda --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=min,median,mean,rounds --benchmark-json="$OUT/bench.json" || status=1
    "$PY" bench/bench_mixing.py --pairs 15 > "$OUT/mixing.log" 2>&1 || status=1
    "$PY" -m fastmix bench --device cuda > "$OUT/quickbench.log" 2>&1 || status=1
    tail -n 20 "$OUT/mixing.log" "$OUT/quickbench.log"
    return $status
}

for stage in "${STAGES[@]}"; do
    if ! declare -F "stage_$stage" > /dev/null; then
        echo "unknown stage '$stage' (stages: build test sanitize bench)" >&2
        exit 2
    fi
    echo "=== $stage"
    start=$SECONDS
    "stage_$stage" > "$OUT/$stage.log" 2>&1
    code=$?
    tail -n 15 "$OUT/$stage.log"
    SUMMARY+=("$(printf '%-9s exit %-3s %5ss' "$stage" "$code" "$((SECONDS - start))")")
done

echo "=== summary (logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
