#!/usr/bin/env bash
# DR-CPSD's GPU check (issue 13): Split-MNIST's GPU profile (experiments/split_mnist_gpu.json), one seed, on the
# lent GPU machine, its summary, run info, report and plots copied flat into $OUT.
#
# Prepare here first: `bash benchmarks/gpu_bundle.sh` (.whl: the wheels the device image lacks; .devdata: MNIST).
# The checkout alone is ~40 MiB of a device call's 64, so the wheels and the data travel in two calls on the same
# warm machine (it goes back 30 s after a call: make the second call at once):
#   run(command="bash benchmarks/gpu_check.sh install", carry=[".whl"], timeout_s=120)
#   run(command="bash benchmarks/gpu_check.sh run", carry=[".devdata"], timeout_s=600)
# `install` puts the wheels into .gpusite/ in the checkout (git-ignored, so kept between calls on a warm machine)
# and checks that the package imports and sees the GPU; `run` trains and evaluates. Where a bundle fits one call
# (`gpu_bundle.sh` prints the total), `all` does both.
#
# Split-CIFAR-10's GPU profile is not part of this check: its data (56 MB) does not travel beside the checkout.
# Environment: GPU_CHECK_SEED (42), GPU_CHECK_LIMIT_S (480: the benchmark's own time limit inside the call),
# GPU_CHECK_BENCHMARK (split_mnist), GPU_CHECK_EXPERIMENTS (experiments: the folder of <benchmark>_gpu.json; a
# smaller one lets the script be tried on a CPU), PY (python3), OUT (set by the device tool; runs/gpu_check elsewhere).
set -uo pipefail
cd "$(dirname "$0")/.."
STEP=${1:-all}
PY=${PY:-python3}
OUT=${OUT:-runs/gpu_check}
SEED=${GPU_CHECK_SEED:-42}
LIMIT=${GPU_CHECK_LIMIT_S:-480}
BENCH=${GPU_CHECK_BENCHMARK:-split_mnist}
SITE=$PWD/.gpusite
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

case "$STEP" in install|run|all) ;; *)
    echo "gpu_check: unknown step '$STEP'; expected install, run or all" >&2; exit 2 ;;
esac

install() {
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check install: no wheels in .whl/ (run benchmarks/gpu_bundle.sh here, then carry .whl)" >&2
        return 3
    fi
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || return 3
    check
}

check() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    PYTHONPATH="$SITE:$PWD" "$PY" -c "
import sys, torch, avalanche, diffusers, avalanche_drcpsd
print('python', sys.version.split()[0], 'torch', torch.__version__, 'avalanche', avalanche.__version__,
      'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
" || { echo "gpu_check: the package does not import with .gpusite (a missing wheel is named above)" >&2; return 4; }
}

run() {
    if [ ! -d "$SITE" ]; then
        echo "gpu_check run: no .gpusite/ (the machine went back after 'install'?): run 'install' again, then 'run' at once" >&2
        return 5
    fi
    if [ ! -d .devdata ]; then
        echo "gpu_check run: no .devdata/ (carry it: run(..., carry=[\".devdata\"]))" >&2
        return 5
    fi
    check || return 4
    local work=/tmp/gpu_check_run
    rm -rf "$work"
    local start=$SECONDS
    PYTHONPATH="$SITE:$PWD" timeout "$LIMIT" "$PY" benchmarks/compare.py --benchmarks "$BENCH" --strategies drcpsd \
        --seeds "$SEED" --profile gpu --experiments "${GPU_CHECK_EXPERIMENTS:-experiments}" --data-root .devdata --quiet --out "$work"
    local rc=$?
    echo "gpu_check: compare.py exit $rc after $(( SECONDS - start )) s (limit $LIMIT s)"
    # what came back flat: the device tool returns at most 8 files, 2 folders down
    local b="$work/$BENCH" r="$work/$BENCH/runs/drcpsd/seed$SEED"
    for f in "$b/summary.csv" "$b/report.md" "$b/accuracy.png" "$r/summary.json" "$r/samples_exp4.png" \
             "$r/logs/run_info.csv" "$r/logs/eval_results.csv"; do
        if [ -f "$f" ]; then cp "$f" "$OUT/"; fi
    done
    return $rc
}

{
    echo "gpu_check $STEP, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    case "$STEP" in
        install) install ;;
        run) run ;;
        all) install && run ;;
    esac
} 2>&1 | tee "$OUT/gpu_check_$STEP.log"
exit "${PIPESTATUS[0]}"
