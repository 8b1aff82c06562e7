#!/usr/bin/env bash
# What a lent GPU machine is for: build the CUDA kernels, run the tests with CUDA and Triton
# live, check the kernels with compute-sanitizer, and run the GPU benchmarks.
#
#   bash bench/gpu_suite.sh build test            # one call: build, then the tests
#   bash bench/gpu_suite.sh build sanitize
#   bash bench/gpu_suite.sh build bench-goals     # the GPU goals of bench/RESULTS.md
#   bash bench/gpu_suite.sh build bench-grid      # every other CUDA benchmark
#
# A call runs its stages in order; each stage is cut at STAGE_TIMEOUT seconds (default 480) so
# that the summary still prints within a 10-minute call. The build is incremental while the
# machine stays warm and takes a minute or two from scratch, so every call starts with it.
# Logs go to $OUT (default /tmp/gpu_suite), one per stage, plus bench.json; a table of stages and
# exit codes prints last. COMMIT names the commit measured (default: git's HEAD, if there is a
# .git). A stage that fails does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-480}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
SUMMARY=()

stage_build() {
    # the compute capability of the GPU here, e.g. 9.0, unless TORCH_CUDA_ARCH_LIST says otherwise
    local arch
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
    # --no-deps: nothing can be fetched there, and the image already has every dependency
    FASTMIX_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} \
        "$PY" -m pip install --no-build-isolation --no-deps -e . &&
        "$PY" -m fastmix info
}

stage_test() {
    "$PY" -m pytest -q -ra tests --junitxml="$OUT/tests.xml"
}

stage_sanitize() {
    # The caching allocator hides reads past a tensor's end inside its blocks: off for these runs.
    local status=0
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PY" -m pytest -q -x -p no:cacheprovider tests/test_alignment_ops.py tests/test_batched_svd.py \
        tests/test_leverage.py -k cuda || status=1
    for tool in racecheck synccheck; do  # the SVD kernel's shared memory and block-wide reductions
        compute-sanitizer --tool $tool --error-exitcode 1 \
            "$PY" -m pytest -q -x -p no:cacheprovider tests/test_batched_svd.py -k cuda || status=1
    done
    return $status
}

stage_bench-goals() {
    local status=0
    # the op against cuBLAS (bf16 and fp32), the probe around a step (bench_probe_fused) and the rest
    "$PY" -m pytest bench -k "cuda and (b4096-64x64 or bench_alignment or bench_probe or streaming or (bench_weight_grad and not domain_grad_dots))" \
        --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds \
        --benchmark-json="$OUT/bench-goals.json" || status=1
    "$PY" bench/bench_mixing.py --pairs 15 > "$OUT/mixing.log" 2>&1 || status=1
    "$PY" -m fastmix bench --device cuda > "$OUT/quickbench.log" 2>&1 || status=1
    tail -n 20 "$OUT/mixing.log" "$OUT/quickbench.log"
    return $status
}

stage_bench-grid() {
    "$PY" -m pytest bench -k "cuda and not (b4096-64x64 or bench_alignment or bench_probe or streaming or (bench_weight_grad and not domain_grad_dots))" \
        --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds \
        --benchmark-json="$OUT/bench-grid.json"
}

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test)
for stage in "${STAGES[@]}"; do
    if ! declare -F "stage_$stage" > /dev/null; then
        echo "unknown stage '$stage' (stages: build test sanitize bench-goals bench-grid)" >&2
        exit 2
    fi
done

{
    echo "commit $COMMIT, $(date -u '+%Y-%m-%d %H:%M UTC')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nvcc --version | tail -1
    # what the tests and benchmarks import, checked before minutes are spent
    "$PY" -c "import numpy, tqdm, matplotlib, pytest, pytest_benchmark, hypothesis" && echo "python packages: ok"
} 2>&1 | tee "$OUT/machine.log"

export -f "${STAGES[@]/#/stage_}" 2>/dev/null
export PY OUT
for stage in "${STAGES[@]}"; do
    echo "=== $stage"
    start=$SECONDS
    timeout "$STAGE_TIMEOUT" bash -c "stage_$stage" > "$OUT/$stage.log" 2>&1
    code=$?
    [ $code -eq 124 ] && echo "(cut at STAGE_TIMEOUT=$STAGE_TIMEOUT s)" >> "$OUT/$stage.log"
    tail -n 15 "$OUT/$stage.log"
    SUMMARY+=("$(printf '%-12s exit %-3s %5ss' "$stage" "$code" "$((SECONDS - start))")")
done

echo "=== summary (commit $COMMIT; logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
