#!/usr/bin/env bash
# The whole GPU picture in one run (about 10 minutes on one recent GPU):
# builds with CUDA, then runs the GPU Python tests, the CUDA GoogleTests,
# the MoE layer benchmark on the GPU, a 50-step bf16 training run of
# configs/gpu_moe_1b.yaml on the built-in corpus (peak GPU memory and
# throughput), and with 2+ GPUs the NCCL tests; prints one summary table.
# Each stage's full output goes to $GPU_CHECK_OUT (default runs/gpu_check).
# Without a GPU it says so and exits 0.
#
#   scripts/gpu_check.sh            # everything
#   GPU_CHECK_STEPS=20 scripts/gpu_check.sh
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${GPU_CHECK_OUT:-$ROOT/runs/gpu_check}
STEPS=${GPU_CHECK_STEPS:-50}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "[gpu_check] no GPU found (nvidia-smi lists none): nothing to check"
  exit 0
fi
NGPU=$(nvidia-smi -L | grep -c '^GPU')
mkdir -p "$OUT"
echo "[gpu_check] $NGPU GPU(s): $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"

# The build: CUDA kernels for the GPUs present (sm_80/sm_90 by default).
export MOEYARD_CMAKE_ARGS="${MOEYARD_CMAKE_ARGS:-} -DMOEYARD_WITH_CUDA=ON"
if ! bash "$ROOT/scripts/setup.sh" >"$OUT/build.log" 2>&1; then
  echo "[gpu_check] the CUDA build failed; see $OUT/build.log:"
  tail -30 "$OUT/build.log"
  exit 1
fi
source "$ROOT/scripts/env.sh"
BUILD=${MOEYARD_BUILD_DIR:-$ROOT/build}
cd "$ROOT"

rows=()
failed=0
# stage NAME TIMEOUT_S CMD...: runs CMD with its output in $OUT/NAME.log and
# records status, seconds and the figure `figure_of NAME` extracts.
stage() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT/$name.log" start rc
  echo "[gpu_check] $name"
  start=$(date +%s)
  timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  local secs=$(($(date +%s) - start)) status=ok
  if [ $rc -eq 124 ]; then
    status="timeout (${limit}s)"
  elif [ $rc -ne 0 ]; then
    status="FAILED (exit $rc)"
  fi
  [ "$status" = ok ] || failed=1
  rows+=("| $name | $status | $secs | $(figure_of "$name" "$log") |")
}

# The line of a stage's log worth a reader's first look.
figure_of() {
  case $1 in
    pytest-gpu) tail -1 "$2" | tr '|' '/' ;;
    gtest-cuda) grep -E 'tests passed|tests failed' "$2" | tail -1 ;;
    # moeyard's first row: vs the baseline, of the measured limit
    bench-moe-layer) grep -E '^\| moeyard \|' "$2" | head -1 | tr '|' '/' | cut -c1-120 ;;
    bench-skip) grep -E '^\| 0\.5' "$2" | tail -1 | tr '|' '/' | cut -c1-120 ;;
    train-gpu_moe_1b) cat "$OUT/train.peak" 2>/dev/null ;;
    nccl) tail -1 "$2" | tr '|' '/' ;;
  esac
}

stage pytest-gpu 300 python -m pytest tests/python -m gpu -q -p no:cacheprovider
stage gtest-cuda 180 ctest --test-dir "$BUILD" -R 'Cuda' --output-on-failure

stage bench-moe-layer 240 python scripts/bench/bench_moe_layer.py --device cuda --rounds 5
# Null experts skip real work on the GPU too: expert time against the null share.
stage bench-skip 240 python scripts/bench/bench_skip.py --device cuda --dtype bfloat16 \
  --tokens 16384 --hidden 2048 --ffn 4096 --rounds 7

# 50 bf16 steps of the shipped 1B config on the built-in byte corpus, with
# the GPU's memory in use sampled every 200 ms (peak minus the idle level).
train_run() {
  [ -f data/builtin/train.bin ] ||
    python scripts/prepare_data.py --builtin --out data/builtin --max-bytes 20000000 || return 1
  local idle
  idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 >"$OUT/train.mem" &
  local sampler=$!
  "$BUILD/moeyard" train --config configs/gpu_moe_1b.yaml --overwrite \
    --set data.train=data/builtin/train.bin --set data.valid=data/builtin/valid.bin \
    --set data.seq_len=1024 --set train.micro_batch=4 --set train.grad_accum=1 \
    --set "train.steps=$STEPS" --set train.eval_every=0 --set log.every=10 \
    --set optim.warmup=10 --set "checkpoint.dir=$OUT/train_run" --set checkpoint.every=0
  local rc=$?
  kill $sampler 2>/dev/null
  local peak
  peak=$(sort -n "$OUT/train.mem" | tail -1)
  echo "peak GPU memory $((peak - idle)) MiB above idle (${peak} MiB used)" >"$OUT/train.peak"
  if [ -x "$BUILD/moeyard" ] && "$BUILD/moeyard" plan --help >/dev/null 2>&1; then
    "$BUILD/moeyard" plan --config configs/gpu_moe_1b.yaml --world 1 \
      --set data.seq_len=1024 --set train.micro_batch=4 | tee -a "$OUT/train.peak"
  fi
  return $rc
}
export -f train_run
export OUT BUILD STEPS
stage train-gpu_moe_1b 300 bash -c train_run

if [ "$NGPU" -ge 2 ]; then
  stage nccl 300 python -m pytest tests/python/test_distributed.py -m gpu -q -p no:cacheprovider -k nccl
else
  rows+=("| nccl | skipped: needs 2 GPUs | 0 | |")
fi

echo
echo "| stage | status | seconds | figure |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "[gpu_check] logs in $OUT"
exit $failed
