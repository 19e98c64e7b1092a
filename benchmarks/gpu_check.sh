#!/usr/bin/env bash
# The prepared GPU check, for a lent CUDA machine (written and dry-run on a CPU; see BENCHMARKS.md):
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--tiny] [--tests-timeout S] [--bench-timeout S]
#
# 1. installs mlx[cuda13] (and mlx-lm, transformers 5.24.0 for the reference, pexpect) unless MLX already runs on
#    the GPU: from --wheels DIR (the wheels themselves: mlx, mlx-cuda-13, mlx-lm, transformers, pexpect,
#    ptyprocess, made with `pip download --no-deps` elsewhere) or from the package index;
# 2. runs the test suite on the GPU (MLX_DGEMMA_TEST_DEVICE=gpu), stopping at the first failure;
# 3. builds the released shapes with random weights in our converted 4-bit layout and times a denoising step, a
#    256-token generation and mlx-lm's autoregressive gemma4_text against the FLOP and bandwidth floors
#    (benchmarks/gpu_check.py).
# Everything lands in $OUT (or .cache/gpu_check): tests.log, bench.log, gpu_check.json. Each step has its own
# timeout, so the whole run stays under 10 minutes; a failed step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="" TINY="" TESTS_TIMEOUT=300 BENCH_TIMEOUT=240
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --tiny) TINY="--tiny"; shift ;;
        --tests-timeout) TESTS_TIMEOUT="$2"; shift 2 ;;
        --bench-timeout) BENCH_TIMEOUT="$2"; shift 2 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
RESULTS="${OUT:-$PWD/.cache/gpu_check}"
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
say() { echo "== gpu_check: $*" >&2; }

gpu_runs() {  # MLX computes on its GPU device (Metal or CUDA)
    "$PY" -c "import mlx.core as mx; mx.set_default_device(mx.gpu); x = mx.ones((4, 4)); mx.eval(x @ x)" 2>/dev/null
}

command -v nvidia-smi >/dev/null && nvidia-smi -L
if [ -n "$TINY" ]; then
    say "--tiny: a dry run on $( gpu_runs && echo the GPU || echo the CPU ), nothing installed"
elif ! gpu_runs; then
    # CUDA 13 (the H200's driver is 580): mlx[cuda13]; its NVIDIA libraries are there already.
    NEED=("mlx[cuda13]==0.32.4" "mlx-lm==0.32.2" "transformers==5.24.0" "pexpect>=4.8")
    if [ -n "$WHEELS" ]; then
        say "installing the wheels of $WHEELS (no index, no dependency resolution)"
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site "$WHEELS"/*.whl \
            && export PYTHONPATH="/tmp/gpu_check_site:$PYTHONPATH"
    else
        say "installing ${NEED[*]} from the package index"
        "$PY" -m pip install -q "${NEED[@]}"
    fi
    if ! gpu_runs; then
        say "MLX does not run on the GPU here, and mlx[cuda] could not be installed. Without a package index, pass"
        say "--wheels DIR; note that mlx-cuda-13's wheel alone is 89 MB, over the 64 MiB a lent machine is sent."
        exit 3
    fi
fi
"$PY" -c "import mlx.core as mx; print('mlx', mx.__version__, 'default device', mx.default_device())"

if [ -n "$TINY" ]; then
    say "tests skipped (--tiny)"
else
    say "test suite on the GPU (timeout ${TESTS_TIMEOUT}s)"
    MLX_DGEMMA_TEST_DEVICE=gpu timeout "$TESTS_TIMEOUT" "$PY" -m pytest -q -x -p no:cacheprovider tests 2>&1 \
        | tee "$RESULTS/tests.log" | tail -25
    say "tests: exit status ${PIPESTATUS[0]} (124: timed out)"
fi

say "released shapes, random 4-bit weights (timeout ${BENCH_TIMEOUT}s)"
timeout "$BENCH_TIMEOUT" "$PY" benchmarks/gpu_check.py $TINY --json "$RESULTS/gpu_check.json" 2>&1 \
    | tee "$RESULTS/bench.log"
status=${PIPESTATUS[0]}
say "benchmark: exit status $status; results in $RESULTS"
exit "$status"
