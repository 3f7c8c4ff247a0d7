#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run (a few minutes on one H100/H200; nothing here is part of the
# CPU test suite, which never needs a GPU):
#   1. one real train step of a published recipe (default qwen2_vl:2b: cuDNN attention, the recipe's 'auto'
#      on a GPU in bfloat16), random weights and batch at its full size: step time, tokens/s, memory and MFU
#      (python -m experiments.plan --topology=local), at one sample and at four samples per step;
#   2. the layer tests on the GPU (every attention implementation against the reference, cuDNN in bfloat16
#      included; parity with PyTorch at float32 with full-precision matmuls);
#   3. the attention benchmark on the GPU (python -m experiments.bench --suite=attention).
#
#   experiments/gpu_check.sh [OUT_DIR] [RECIPE]        (from the repository root; needs jax with CUDA)
#
# Every part runs under its own time limit (PLAN_SECONDS, TEST_SECONDS, BENCH_SECONDS) and the script goes on
# after a failure; it exits 1 if any part failed. Logs and JSON land in OUT_DIR (default gpu_check_out).
set -uo pipefail
OUT=${1:-gpu_check_out}
RECIPE=${2:-qwen2_vl:2b}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
failed=()

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  uptime; } 2>&1 | tee "$OUT/gpu.txt"

plan() {  # plan BATCH SECONDS
  echo "== $RECIPE: one train step, $1 sample(s) per step"
  timeout "$2" "$PY" -m experiments.plan --config="$RECIPE" --topology=local --global_batch="$1" --steps=5 \
    --out="$OUT/plan_b$1.json" 2>&1 | tee "$OUT/plan_b$1.log" || failed+=("plan batch $1")
}

plan 1 "${PLAN_SECONDS:-200}"

echo "== layer tests on the GPU"
JAX_PLATFORMS=cuda,cpu timeout "${TEST_SECONDS:-120}" "$PY" -m pytest -q -n 0 -p no:cacheprovider tests/layers \
  -k "not compiles_for_tpu" 2>&1 | tee "$OUT/tests.log" || failed+=("layer tests")

echo "== attention benchmark on the GPU"
JAX_PLATFORMS=cuda,cpu timeout "${BENCH_SECONDS:-90}" "$PY" -m experiments.bench --suite=attention --size=small \
  --repeats=5 --out="$OUT/bench" || failed+=("attention bench")

plan 4 "${PLAN_SECONDS:-150}"

if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
