#!/usr/bin/env bash
# Everything a lent GPU session runs, in one call, offline, in at most 8 minutes on one GPU, in
# this order (what matters most first, so what the time cuts off is the optional rows):
#   1. the GPU-only tests (tests/model/test_gpu.py: cuDNN attention against XLA); with
#      IMAGEBERT_EXPECT_GPU=1 they fail, not skip, when JAX sees no GPU;
#   2. ours beside the PyTorch peer (benchmarks/torch_peer.py) at the paper's config and shape:
#      hidden and attention dropout 0.1, 44 text + 100 regions, batch 128, bfloat16; the training
#      step and cross-encoder scoring (1,024 pairs a step), each with its compile time;
#   3. retrieval fine-tuning at the paper's batch (24) with M = 3 and 16 mined candidates;
#   4. the detector at its test-time shape;
#   5. optional rows: attention dropout 0 (ours on cuDNN and on XLA, the peer), then
#      rematerialisation and batch size;
# then one table of every figure, ours divided by the peer's where both ran like for like (same
# mode, batch and dropout rates), and of what failed, timed out or did not fit in the time.
# Each command gets at most its own cap and never more than what is left of the 8 minutes
# (GPU_SESSION_SECONDS, 470 by default: the table and the set-up take the rest).
#
# Run from anywhere: bash benchmarks/gpu_session.sh. Output goes to $OUT (or the current
# folder): gpu_session.log (everything) and gpu_results.jsonl (the rows of the table; each
# records its implementation, 'ours' or 'torch-peer', and the dropout rates it ran with).
#
# The GPU image has jax, flax, optax, orbax, etils, absl, numpy, tqdm, pytest, tensorboard,
# torch and transformers but not ml_collections. Its wheel (pure Python, py3) is kept in
# benchmarks/wheels/ and installed from there without a network. To refresh that folder, on a
# machine with one:
#   rm benchmarks/wheels/*.whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d benchmarks/wheels \
#     'ml-collections>=1.0'
# and add to the download only what a new requirement of the model side lacks on the image.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
log="$out/gpu_session.log"
results="$out/gpu_results.jsonl"
: > "$results"
exec > >(tee "$log") 2>&1
export JAX_PLATFORMS=cuda IMAGEBERT_EXPECT_GPU=1 PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 \
  HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
py="${PYTHON:-python3}"
budget="${GPU_SESSION_SECONDS:-470}"

"$py" -m pip install -q --no-index --no-deps benchmarks/wheels/*.whl \
  || echo "installing benchmarks/wheels failed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"

# step LABEL CAP COMMAND...: runs COMMAND for at most CAP seconds (less when less is left) and
# writes its status row; the benchmarks write their figure rows themselves.
step() {
  local label="$1" cap="$2"
  shift 2
  local left=$((budget - SECONDS))
  if ((left < 20)); then
    echo "{\"label\": \"$label\", \"status\": \"skipped: out of time\"}" >> "$results"
    return
  fi
  ((cap > left)) && cap=$left
  echo "=== $label (at most ${cap}s, ${left}s left)"
  local start=$SECONDS status
  timeout --kill-after=10 "$cap" "$@"
  case $? in
    0) status="ok" ;;
    124 | 137) status="timed out after ${cap}s" ;;
    *) status="failed" ;;
  esac
  echo "{\"label\": \"$label\", \"status\": \"$status\", \"seconds\": $((SECONDS - start))}" \
    >> "$results"
}

bench() {  # bench LABEL CAP ARGS...: imagebert_jax.bench at the paper's shape
  local label="$1" cap="$2"
  shift 2
  step "$label" "$cap" "$py" -m imagebert_jax.bench --config configs/imagebert_base.py \
    --steps 20 --warmup 3 --results "$results" --label "$label" "$@"
}

step "tests/model/test_gpu.py" 90 "$py" -m pytest -q -p no:cacheprovider tests/model/test_gpu.py
# Compile times are part of the figures: no compilation cache.
export JAX_COMPILATION_CACHE_DIR=
bench "ours, paper config" 130 --batch_size 128 --modes train,score --score_tile 8x128
peer() {  # peer LABEL CAP ARGS...: the PyTorch peer at the paper's shape
  local label="$1" cap="$2"
  shift 2
  step "$label" "$cap" "$py" benchmarks/torch_peer.py --steps 20 --warmup 3 \
    --results "$results" --label "$label" "$@"
}
peer "torch peer, paper config" 70 --batch_size 128 --score_batch 1024 --modes train,score
# Retrieval fine-tuning at the paper's batch (24) against the number of mined candidates M.
bench "fine-tuning" 110 --batch_size 24 --steps 5 --warmup 1 --stage none --modes finetune \
  --candidates 3,16 --num_hard 3
step "detector" 60 "$py" -m imagebert_jax.bench.detector --steps 5 --warmup 2 \
  --results "$results" --label detector
# Optional rows, while time is left.
for impl in cudnn xla; do
  bench "$impl attention, attention dropout 0" 80 --batch_size 128 --modes train \
    --config.model.attention_impl=$impl --config.model.attention_dropout_rate=0.0
done
peer "torch peer, attention dropout 0" 40 --batch_size 128 --modes train --attention_dropout 0
for remat in none full; do
  for batch in 256 512; do
    bench "remat $remat, batch $batch" 70 --batch_size $batch --modes train \
      --config.model.remat=$remat
  done
done

echo "=== every figure (${SECONDS}s)"
"$py" -m imagebert_jax.bench --summary "$results"
