"""Checks that need a GPU: cuDNN fused attention against the XLA path. Marked `gpu`: skipped
without a GPU, failed without one when IMAGEBERT_EXPECT_GPU=1 (tests/conftest.py); and the test
of that gating itself, which runs anywhere."""

import dataclasses
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import PAD, random_batch
from imagebert_jax.model import ImageBert, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CFG = ModelConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, mlp_dim=1024,
                  max_text_len=44, max_regions=100, region_feature_dim=64, num_object_classes=16,
                  dropout_rate=0.0, attention_dropout_rate=0.0, dtype="bfloat16")


def _encode(impl, batch):
  model = ImageBert(dataclasses.replace(CFG, attention_impl=impl), rngs=nnx.Rngs(0))
  region_mask = np.arange(CFG.max_regions)[None] < batch["num_regions"][:, None]
  return model.encode(jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_ids"] != PAD),
                      jnp.asarray(batch["region_feat"]), jnp.asarray(batch["region_loc"]),
                      jnp.asarray(region_mask))


@pytest.mark.gpu
def test_cudnn_attention_matches_xla():
  rng = np.random.default_rng(0)
  batch = random_batch(rng, 8, CFG)
  t_x, r_x = _encode("xla", batch)
  t_c, r_c = _encode("cudnn", batch)
  for i in range(8):
    n_t = int((batch["text_ids"][i] != PAD).sum())
    n_r = int(batch["num_regions"][i])
    for got, want in ((t_c[i, :n_t], t_x[i, :n_t]), (r_c[i, :n_r], r_x[i, :n_r])):
      got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
      assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


@pytest.mark.subprocess
def test_gpu_tests_skip_without_a_gpu_and_fail_when_one_is_expected():
  def run(expect):
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "IMAGEBERT_EXPECT_GPU", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"  # what a machine without a GPU has
    if expect:
      env["IMAGEBERT_EXPECT_GPU"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-m", "gpu", "tests/model/test_gpu.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  skipped = run(expect=False)
  assert skipped.returncode == 0, skipped.stdout[-2000:]
  assert "2 skipped" in skipped.stdout and "failed" not in skipped.stdout
  failed = run(expect=True)
  assert failed.returncode == 1, failed.stdout[-2000:]
  assert "2 failed" in failed.stdout
  assert "no GPU visible to JAX (backend 'cpu', JAX_PLATFORMS='cpu'), but " \
         "IMAGEBERT_EXPECT_GPU=1 expects one" in failed.stdout


@pytest.mark.gpu
def test_attention_dropout_on_the_gpu_path_drops_its_rate_and_differs_by_step():
  """The paper's config (attention dropout 0.1) on the path the GPU runs for it: the share of
  attention probabilities dropped is the rate, and two steps (two keys, as the train step folds
  its step number into its key) drop different ones. With q = k = 0 and v the identity the
  attention output is the dropped probability row itself."""
  import jax
  from imagebert_jax.model.encoder import attention_core, resolve_attention_impl
  cfg = dataclasses.replace(CFG, attention_dropout_rate=0.1)
  impl = resolve_attention_impl(cfg, attention_dropout=True)
  b, length, heads = 32, 144, 4
  q = jnp.zeros((b, length, heads, length), jnp.bfloat16)
  v = jnp.broadcast_to(jnp.eye(length, dtype=jnp.bfloat16)[None, :, None, :], q.shape)
  step = jax.jit(lambda key: attention_core(q, q, v, mask=None, kv_lengths=None, impl=impl,
                                            dropout_rate=0.1, dropout_key=key))
  base = jax.random.key(0)
  one = np.asarray(step(jax.random.fold_in(base, 1)), np.float32) == 0
  again = np.asarray(step(jax.random.fold_in(base, 1)), np.float32) == 0
  two = np.asarray(step(jax.random.fold_in(base, 2)), np.float32) == 0
  assert abs(one.mean() - 0.1) < 0.005
  np.testing.assert_array_equal(one, again)
  assert (one != two).mean() > 0.15  # independent masks differ on 2 x 0.1 x 0.9 = 18%
