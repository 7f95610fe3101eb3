"""The optimizer: schedule, weight-decay mask, clipping."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imagebert_jax.training import optim


def _cfg(**kw):
  base = dict(learning_rate=1e-3, warmup_steps=10, end_lr_fraction=0.0, weight_decay=0.1,
              b1=0.9, b2=0.999, eps=1e-6, grad_clip_norm=1.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_warmup_then_linear_decay():
  sched = optim.learning_rate_schedule(_cfg(), total_steps=110)
  # 0 -> 1e-3 over 10 steps, then down to 0 at step 110.
  for step, want in [(0, 0.0), (5, 5e-4), (10, 1e-3), (60, 5e-4), (110, 0.0)]:
    np.testing.assert_allclose(float(sched(step)), want, atol=1e-9)
  sched = optim.learning_rate_schedule(_cfg(end_lr_fraction=0.1), total_steps=110)
  np.testing.assert_allclose(float(sched(110)), 1e-4, rtol=1e-6)


def test_no_weight_decay_on_biases_and_layer_norm():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
            "norm": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
            "word": {"embedding": jnp.ones((3, 2))}, "mlm_bias": jnp.ones(3)}
  mask = optim.decay_mask(params)
  assert mask["dense"]["kernel"] and mask["word"]["embedding"]
  assert not mask["dense"]["bias"] and not mask["norm"]["scale"] and not mask["norm"]["bias"]
  assert not mask["mlm_bias"]
  # With zero gradients only decayed parameters move (lr at step 1 of warmup = 1e-4).
  tx, _ = optim.make_optimizer(_cfg(), total_steps=100)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  _, state = tx.update(zero, state, params)
  updates, _ = tx.update(zero, state, params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -1e-4 * 0.1, rtol=1e-5)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)


def test_gradients_clipped_to_global_norm():
  """Two AdamW steps against NumPy Adam fed the clipped gradients."""
  cfg = _cfg(weight_decay=0.0, warmup_steps=0, learning_rate=1e-2)
  tx, sched = optim.make_optimizer(cfg, total_steps=100)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  grads = [np.array([3.0, 4.0]), np.array([0.3, -0.4])]  # norms 5 (clipped to 1) and 0.5
  m = v = np.zeros(2)
  for t, g in enumerate(grads, start=1):
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    clipped = g / max(1.0, np.linalg.norm(g))
    m = 0.9 * m + 0.1 * clipped
    v = 0.999 * v + 0.001 * clipped**2
    m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
    want = -float(sched(t - 1)) * m_hat / (np.sqrt(v_hat) + 1e-6)
    np.testing.assert_allclose(updates["w"], want, rtol=1e-4)


def test_lr_scale_multiplies_the_named_parameters_steps():
  """Adam's first step is lr x sign(g) (m_hat / sqrt(v_hat) = g / |g|): the named parameters
  move `factor` times as far, the others as without the option."""
  cfg = _cfg(weight_decay=0.0, warmup_steps=0, learning_rate=1e-2, grad_clip_norm=0.0,
             lr_scale="region_*=10,itm=3")
  params = {"region_feature": {"kernel": jnp.zeros(2)}, "region_position": jnp.zeros(2),
            "itm": {"kernel": jnp.zeros(2)}, "itm_other": jnp.zeros(2),
            "encoder": {"kernel": jnp.zeros(2)}}
  grads = jax.tree.map(lambda p: jnp.array([0.5, -2.0]), params)
  tx, _ = optim.make_optimizer(cfg, total_steps=100)
  updates, _ = tx.update(grads, tx.init(params), params)
  step = -1e-2 * np.array([1.0, -1.0])
  np.testing.assert_allclose(updates["region_feature"]["kernel"], 10 * step, rtol=1e-4)
  np.testing.assert_allclose(updates["region_position"], 10 * step, rtol=1e-4)
  np.testing.assert_allclose(updates["itm"]["kernel"], 3 * step, rtol=1e-4)
  np.testing.assert_allclose(updates["itm_other"], step, rtol=1e-4)  # a pattern, not a prefix
  np.testing.assert_allclose(updates["encoder"]["kernel"], step, rtol=1e-4)


def test_lr_scale_refuses_what_it_cannot_apply():
  params = {"encoder": {"kernel": jnp.zeros(2)}}
  for text, words in [("region_*", "pattern=factor"), ("region_*=0", "positive"),
                      ("=2", "pattern=factor"), ("region_*=x", "pattern=factor")]:
    with pytest.raises(ValueError, match=words) as err:
      optim.parse_lr_scale(text)
    assert "config.optim.lr_scale" in str(err.value)
  with pytest.raises(ValueError, match="regoin_.* matches no parameter"):
    optim.lr_scale_tree(params, "regoin_*=10")
  # Without the option the optimizer state is the one other runs checkpointed.
  plain, _ = optim.make_optimizer(_cfg(), total_steps=10)
  empty, _ = optim.make_optimizer(_cfg(lr_scale=""), total_steps=10)
  assert (jax.tree.structure(plain.init(params)) == jax.tree.structure(empty.init(params)))
