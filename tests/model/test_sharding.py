"""Sharded training on 8 simulated CPU devices equals training on one device."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import CLS, MASK, PAD, RANDOM_RANGE, SEP, TINY, random_batch
from imagebert_jax import parallel
from imagebert_jax.config import defaults as config_defaults
from imagebert_jax.training import optim
from imagebert_jax.training import state as state_lib
from imagebert_jax.objectives.pretraining import PretrainObjective, pretrain_loss

CFG = dataclasses.replace(TINY, dropout_rate=0.1, attention_dropout_rate=0.1)
OBJ = PretrainObjective(pad_id=PAD, cls_id=CLS, sep_id=SEP, mask_id=MASK,
                        random_token_range=RANDOM_RANGE)
RULES = parallel.rules_from_config(config_defaults.DEFAULT_RULES)


def _optim():
  c = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=1, weight_decay=0.01,
                                     b1=0.9, b2=0.999, eps=1e-6, grad_clip_norm=1.0))
  return optim.make_optimizer(c, 10)


def run(mesh_shape, devices, steps=3, grad_accum_steps=1):
  mesh = parallel.make_mesh(mesh_shape, devices)
  tx, schedule = _optim()
  spec = state_lib.state_spec(CFG, tx, mesh, RULES, seed=0)
  state = state_lib.create_state(spec, CFG, tx, seed=0)
  step = state_lib.make_train_step(spec, functools.partial(pretrain_loss, obj=OBJ), tx, seed=0,
                                   schedule=schedule, grad_accum_steps=grad_accum_steps)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    batch = parallel.global_batch(random_batch(rng, 16, CFG, distinct_images=False), mesh, RULES)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return np.array(losses), state


@pytest.fixture(scope="module")
def single():
  assert jax.device_count() == 8, "the tests run with 8 simulated CPU devices"
  return run((1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_losses_equal_one_device(single, shape):
  want, _ = single
  got, state = run(shape, jax.devices())
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.all(np.diff(got) != 0)  # the parameters did move


def test_shard_shapes_follow_the_rules():
  _, state = run((2, 2, 2), jax.devices(), steps=1)
  p = state.params
  h, m, v = CFG.hidden_size, CFG.mlp_dim, CFG.vocab_size
  layer = p["encoder"]["layers"][0]

  def shard(x):
    return x.addressable_shards[0].data.shape

  assert shard(layer["mlp_in"]["kernel"]) == (h // 2, m // 2)        # (embed:fsdp, mlp:tensor)
  assert shard(layer["mlp_out"]["kernel"]) == (m // 2, h // 2)       # (mlp:tensor, embed:fsdp)
  assert shard(layer["attention"]["qkv"]["kernel"]) == (h // 2, 3, CFG.num_heads // 2,
                                                        CFG.head_dim)
  assert shard(p["word"]["embedding"]) == (v // 2, h // 2)           # (vocab:tensor, embed:fsdp)
  assert shard(layer["attention_norm"]["scale"]) == (h // 2,)
  # The optimizer's moments are sharded like their parameters.
  mu = state.opt_state[1][0].mu
  assert shard(mu["encoder"]["layers"][0]["mlp_in"]["kernel"]) == (h // 2, m // 2)
  # Nothing is replicated that the rules shard: 8 devices hold 1/4 of a (fsdp, tensor) weight.
  assert len(layer["mlp_in"]["kernel"].sharding.device_set) == 8


def _itm_logits(model, batch):
  """The matching logits of a batch: a key-free model output for hand-made losses."""
  region_mask = jnp.arange(CFG.max_regions)[None] < batch["num_regions"][:, None]
  text_h, _ = model.encode(batch["text_ids"], batch["text_ids"] != PAD, batch["region_feat"],
                           batch["region_loc"], region_mask)
  return model.itm_logit(text_h)


def test_gradient_accumulation_matches_full_batch_update():
  """With a key-free loss, accumulating 4 micro-batches gives the full-batch update."""

  def loss(model, batch, key, step=None):
    del key
    out = jnp.mean(jnp.square(_itm_logits(model, batch) - 1.0))
    return out, {"loss": out}

  cfg = dataclasses.replace(CFG, dropout_rate=0.0, attention_dropout_rate=0.0)
  mesh = parallel.make_mesh((2, 2, 2), jax.devices())
  tx, _ = _optim()
  results = []
  for accum in (1, 4):
    spec = state_lib.state_spec(cfg, tx, mesh, RULES, seed=0)
    state = state_lib.create_state(spec, cfg, tx, seed=0)
    step = state_lib.make_train_step(spec, loss, tx, seed=0, grad_accum_steps=accum)
    batch = parallel.global_batch(random_batch(np.random.default_rng(5), 16, cfg), mesh, RULES)
    state, metrics = step(state, batch)
    results.append((float(metrics["loss"]), float(metrics["grad_norm"]),
                    np.asarray(state.params["itm"]["kernel"])))
  (l1, g1, k1), (l4, g4, k4) = results
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  np.testing.assert_allclose(g4, g1, rtol=1e-4)
  np.testing.assert_allclose(k4, k1, rtol=1e-5, atol=1e-7)


def test_mesh_that_does_not_fit_is_refused():
  with pytest.raises(ValueError, match=r"config.mesh.shape=\(3, 1, 1\) needs 3 devices"):
    parallel.make_mesh((3, 1, 1))


def test_sharded_gradients_equal_one_device_gradients():
  """Every parameter's gradient, not just the loss: a wrong backward pass shows here first."""
  from flax import nnx
  cfg = dataclasses.replace(CFG, dropout_rate=0.0, attention_dropout_rate=0.0)
  host = random_batch(np.random.default_rng(9), 16, cfg, distinct_images=False)
  grads = []
  for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices())):
    mesh = parallel.make_mesh(shape, devices)
    tx, _ = _optim()
    spec = state_lib.state_spec(cfg, tx, mesh, RULES, seed=0)
    state = state_lib.create_state(spec, cfg, tx, seed=0)

    def loss(params, batch):
      return pretrain_loss(nnx.merge(spec.graphdef, params), batch, jax.random.key(0), OBJ)[0]

    with jax.set_mesh(mesh), parallel.logical_rules(RULES):
      g = jax.jit(jax.grad(loss), in_shardings=(spec.shardings.params, None))(
          state.params, parallel.global_batch(host, mesh, RULES))
    grads.append(jax.device_get(g))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads[0])[0],
                          jax.tree.leaves(grads[1])):
    err = np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)
    assert err < 1e-4, f"{jax.tree_util.keystr(path)}: relative gradient error {err:.2e}"


def test_skipped_update_leaves_state_and_learning_rate_behind():
  """A non-finite step changes nothing; the next logged rate is the one AdamW's count gives."""

  def loss(model, batch, key, step=None):
    del key
    out = jnp.mean(jnp.square(_itm_logits(model, batch))) * batch["scale"][0]
    return out, {"loss": out}

  cfg = dataclasses.replace(CFG, dropout_rate=0.0, attention_dropout_rate=0.0)
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  tx, schedule = _optim()
  spec = state_lib.state_spec(cfg, tx, mesh, RULES, seed=0)
  state = state_lib.create_state(spec, cfg, tx, seed=0)
  step = state_lib.make_train_step(spec, loss, tx, seed=0, schedule=schedule)
  host = random_batch(np.random.default_rng(1), 4, cfg)
  rates = []
  for i, scale in enumerate((1.0, 1.0, np.nan, 1.0)):
    before = np.asarray(state.params["itm"]["kernel"])
    batch = parallel.global_batch(dict(host, scale=np.full((4,), scale, np.float32)), mesh, RULES)
    state, metrics = step(state, batch)
    rates.append(float(metrics["learning_rate"]))
    changed = not np.array_equal(before, np.asarray(state.params["itm"]["kernel"]))
    assert changed == (i in (1, 3)), i  # step 0 runs at learning rate 0, step 2 is skipped
  assert int(state.step) == 4 and int(state.skipped) == 1
  # Warm up over 1 step, then decay linearly to 0 over the other 9 (see _optim). The skipped step
  # reports the rate it would have used; the step after it uses that same rate.
  np.testing.assert_allclose(rates, [0.0, 1e-3, 1e-3 * 8 / 9, 1e-3 * 8 / 9], rtol=1e-6)
