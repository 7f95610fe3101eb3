#!/usr/bin/env bash
# Everything a lent GPU session should run, in one call (about 8 minutes on one H100):
#   1. the GPU-only tests (cuDNN attention against XLA),
#   2. the training step at the paper's shape, batch 128, bfloat16, for the attention paths,
#   3. rematerialisation and batch size (largest batch that fits, with and without remat),
#   4. scoring throughput,
#   5. the detector at its test-time shape.
# The GPU image has jax, flax, optax, orbax and numpy but not ml_collections: put its wheel in
# .device_wheels/ first (pip download ml-collections --no-deps -d .device_wheels) and carry that
# folder. Output goes to $OUT/gpu_session.log.
set -uo pipefail
log="${OUT:-.}/gpu_session.log"
exec > >(tee "$log") 2>&1
pip install -q --no-deps .device_wheels/*.whl 2>/dev/null || true
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
python -m pytest -q tests/test_gpu.py tests/test_model.py
base="--config configs/imagebert_base.py --steps 20 --warmup 3"
for impl in cudnn xla; do
  python -m imagebert_jax.bench $base --batch_size 128 --modes train,score \
    --config.model.attention_impl=$impl --config.model.attention_dropout_rate=0.0
done
python -m imagebert_jax.bench $base --batch_size 128 --modes train   # paper's attention dropout
for remat in none full; do
  for batch in 256 512 1024; do
    python -m imagebert_jax.bench $base --batch_size $batch --modes train \
      --config.model.remat=$remat --config.model.attention_dropout_rate=0.0 || echo "batch $batch remat $remat: does not fit"
  done
done
python -m imagebert_jax.detector.bench --steps 5 --warmup 2
