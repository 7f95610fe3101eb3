"""The model against a NumPy BERT written from the specification, and its masking behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from helpers import PAD, TINY, random_batch
from imagebert_jax.model import ImageBert
from imagebert_jax.model.encoder import attention_core
from imagebert_jax.model.layers import dropout


def np_layer_norm(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_encode(p, cfg, text_ids, region_feat, region_loc, num_regions):
  """ImageBERT's encoder in NumPy, one example at a time, from the parameter dict."""
  eps = cfg.layer_norm_eps
  outs = []
  for b in range(text_ids.shape[0]):
    ids = text_ids[b]
    t = ids[ids != PAD]
    n = num_regions[b]
    x_t = (p["word"]["embedding"][t] + p["position"]["embedding"][: len(t)]
           + p["segment"]["embedding"][0])
    x_t = np_layer_norm(x_t, p["text_norm"]["scale"], p["text_norm"]["bias"], eps)
    f, c = region_feat[b, :n], region_loc[b, :n]
    if cfg.region_input_norm == "standardise":
      f = (f - p["region_feature_mean"]) * p["region_feature_scale"]
    elif cfg.region_input_norm == "layernorm":
      f = np_layer_norm(f, p["region_input_norm"]["scale"], p["region_input_norm"]["bias"], 1e-6)
    feat = f @ p["region_feature"]["kernel"] + p["region_feature"]["bias"]
    loc = c @ p["region_location"]["kernel"] + p["region_location"]["bias"]
    if cfg.region_part_norms:
      feat = np_layer_norm(feat, p["region_feature_norm"]["scale"],
                           p["region_feature_norm"]["bias"], eps)
      loc = np_layer_norm(loc, p["region_location_norm"]["scale"],
                          p["region_location_norm"]["bias"], eps)
    x_r = feat + loc + p["segment"]["embedding"][1] + p["region_position"]
    x_r = np_layer_norm(x_r, p["region_norm"]["scale"], p["region_norm"]["bias"], eps)
    x = np.concatenate([x_t, x_r])
    for layer in p["encoder"]["layers"].values():
      a = layer["attention"]
      qkv = np.einsum("ld,dtnh->tlnh", x, a["qkv"]["kernel"]) + a["qkv"]["bias"][:, None]
      q, k, v = qkv
      s = np.einsum("qnh,knh->nqk", q, k) / np.sqrt(cfg.head_dim)
      s = np.exp(s - s.max(-1, keepdims=True))
      s = s / s.sum(-1, keepdims=True)
      o = np.einsum("nqk,knh->qnh", s, v).reshape(len(x), -1)
      o = o @ a["out"]["kernel"] + a["out"]["bias"]
      x = np_layer_norm(x + o, layer["attention_norm"]["scale"], layer["attention_norm"]["bias"],
                        eps)
      h = np_gelu(x @ layer["mlp_in"]["kernel"] + layer["mlp_in"]["bias"])
      h = h @ layer["mlp_out"]["kernel"] + layer["mlp_out"]["bias"]
      x = np_layer_norm(x + h, layer["mlp_norm"]["scale"], layer["mlp_norm"]["bias"], eps)
    outs.append((x[: len(t)], x[len(t):]))
  return outs


def _params(model):
  tree = jax.tree.map(lambda a: np.asarray(a, np.float64),
                      nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return tree


def _with_random_statistics(model, rng):
  """Non-trivial feature statistics and LayerNorm parameters (fresh ones are 0 and 1)."""
  d = model.cfg.region_feature_dim
  if model.cfg.region_input_norm == "standardise":
    model.region_feature_mean[...] = jnp.asarray(rng.normal(size=d), jnp.float32)
    model.region_feature_scale[...] = jnp.asarray(rng.uniform(0.2, 3.0, size=d), jnp.float32)
  for norm in (model.region_input_norm, model.region_feature_norm):
    if norm is not None:
      norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, norm.scale.shape), jnp.float32)
      norm.bias[...] = jnp.asarray(rng.normal(size=norm.bias.shape) * 0.1, jnp.float32)
  return model


@pytest.mark.parametrize("pack,region_input_norm,part_norms", [
    (False, "none", False), (True, "none", False), (False, "standardise", True),
    (True, "layernorm", True), (False, "layernorm", False)])
def test_encode_matches_numpy_reference(pack, region_input_norm, part_norms):
  cfg = TINY.__class__(**{**TINY.__dict__, "region_input_norm": region_input_norm,
                          "region_part_norms": part_norms})
  model = _with_random_statistics(ImageBert(cfg, rngs=nnx.Rngs(0)), np.random.default_rng(7))
  batch = random_batch(np.random.default_rng(0), 5)
  p = _params(model)
  want = np_encode(p, cfg, batch["text_ids"], batch["region_feat"].astype(np.float64),
                   batch["region_loc"].astype(np.float64), batch["num_regions"])
  region_mask = np.arange(cfg.max_regions)[None] < batch["num_regions"][:, None]
  text_h, region_h = model.encode(jnp.asarray(batch["text_ids"]),
                                  jnp.asarray(batch["text_ids"] != PAD),
                                  jnp.asarray(batch["region_feat"]),
                                  jnp.asarray(batch["region_loc"]), jnp.asarray(region_mask),
                                  pack=pack)
  for b, (wt, wr) in enumerate(want):
    np.testing.assert_allclose(np.asarray(text_h[b, : len(wt)]), wt, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(region_h[b, : len(wr)]), wr, atol=2e-5, rtol=1e-4)
  # Pooler and matching head on top.
  pooled = np.tanh(want[0][0][0] @ p["pooler"]["kernel"] + p["pooler"]["bias"])
  itm = pooled @ p["itm"]["kernel"][:, 0] + p["itm"]["bias"][0]
  np.testing.assert_allclose(np.asarray(model.itm_logit(text_h))[0], itm, atol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "cls+max"])
def test_contrastive_embeddings_match_numpy_reference(pool):
  """Text alone and [CLS] [SEP] + regions alone through the encoder, [CLS] projected, unit norm;
  with 'cls+max' the image's adds the per-dimension maximum of its projected region states."""
  cfg = TINY.__class__(**{**TINY.__dict__, "region_input_norm": "standardise",
                          "region_part_norms": True, "itc_image_pool": pool})
  model = _with_random_statistics(ImageBert(cfg, rngs=nnx.Rngs(3)), np.random.default_rng(1))
  batch = random_batch(np.random.default_rng(4), 4)
  p = _params(model)
  cls, sep = 2, 3
  no_regions = np.zeros_like(batch["num_regions"])
  text_ref = np_encode(p, cfg, batch["text_ids"], batch["region_feat"].astype(np.float64),
                       batch["region_loc"].astype(np.float64), no_regions)
  only_cls = np.full((4, cfg.max_text_len), PAD, np.int32)
  only_cls[:, :2] = (cls, sep)
  image_ref = np_encode(p, cfg, only_cls, batch["region_feat"].astype(np.float64),
                        batch["region_loc"].astype(np.float64), batch["num_regions"])
  region_mask = np.arange(cfg.max_regions)[None] < batch["num_regions"][:, None]
  t = model.text_embedding(jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_ids"] != PAD))
  i = model.image_embedding(jnp.asarray(batch["region_feat"]), jnp.asarray(batch["region_loc"]),
                            jnp.asarray(region_mask), (cls, sep))
  for b in range(4):
    for got, ref, head in ((t, text_ref, "itc_text"), (i, image_ref, "itc_image")):
      v = ref[b][0][0] @ p[head]["kernel"] + p[head]["bias"]
      if head == "itc_image" and pool == "cls+max":
        regions = ref[b][1]  # this image's regions only: padding never wins the maximum
        assert len(regions) == batch["num_regions"][b] >= 1
        v = v + (regions @ p[head]["kernel"] + p[head]["bias"]).max(0)
      np.testing.assert_allclose(np.asarray(got[b]), v / np.linalg.norm(v), atol=2e-5)


def test_padding_content_does_not_matter():
  model = ImageBert(TINY, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(1)
  batch = random_batch(rng, 4)
  region_mask = np.arange(TINY.max_regions)[None] < batch["num_regions"][:, None]
  other = {k: v.copy() for k, v in batch.items()}
  other["region_feat"][~region_mask] = rng.normal(size=other["region_feat"][~region_mask].shape)
  other["region_loc"][~region_mask] = 0.123

  def run(b):
    return model(jnp.asarray(b["text_ids"]), jnp.asarray(b["text_ids"] != PAD),
                 jnp.asarray(b["region_feat"]), jnp.asarray(b["region_loc"]),
                 jnp.asarray(region_mask))

  np.testing.assert_allclose(run(batch), run(other), atol=1e-6)


def test_explicit_attention_path_equals_fused_path():
  """The path that applies attention dropout computes the same attention when nothing drops."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 9, 2, 4)).astype(np.float32)) for _ in range(3))
  mask = jnp.asarray(np.arange(9)[None] < np.array([[9], [5], [1]]))
  fused = attention_core(q, k, v, mask=mask, kv_lengths=None, impl="xla", dropout_rate=0.0,
                         dropout_key=None)
  explicit = attention_core(q, k, v, mask=mask, kv_lengths=None, impl="xla",
                            dropout_rate=1e-12, dropout_key=jax.random.key(0))
  np.testing.assert_allclose(fused, explicit, atol=1e-5)


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_dropout_drops_its_rate_and_keeps_the_mean(rate):
  """Hidden dropout on a million ones, and attention dropout seen through the attention output:
  with q = k = 0 every query spreads 1/L over its L keys, and with v the identity the output row
  is the (dropped) probability row itself."""
  x = jnp.ones((1024, 1024), jnp.float32)
  y = np.asarray(dropout(x, rate, jax.random.key(0)))
  dropped = np.mean(y == 0)
  assert abs(dropped - rate) < 0.002  # binomial sd: sqrt(0.09 / 1M) = 0.0003 at 0.1
  assert abs(y.mean() - 1.0) < 0.003
  assert np.allclose(y[y != 0], 1 / (1 - round(rate * 65536) / 65536))
  b, length, heads = 64, 32, 4
  q = jnp.zeros((b, length, heads, length))
  v = jnp.broadcast_to(jnp.eye(length)[None, :, None, :], (b, length, heads, length))
  out = np.asarray(attention_core(q, q, v, mask=None, kv_lengths=None, impl="xla",
                                  dropout_rate=rate, dropout_key=jax.random.key(1)))
  assert abs(np.mean(out == 0) - rate) < 0.01  # 262,144 probabilities
  np.testing.assert_allclose(out[out != 0], 1 / length / (1 - round(rate * 65536) / 65536),
                             rtol=1e-5)
  # Nothing to draw (the regions of a text-only pass): an empty result, not an error.
  assert dropout(jnp.ones((2, 0, 8)), rate, jax.random.key(2)).shape == (2, 0, 8)
  # Another key draws another mask (each step's key is folded from its step number).
  other = np.asarray(dropout(x, rate, jax.random.key(1)))
  assert np.mean((y == 0) != (other == 0)) > rate


def test_dropout_is_keyed_and_off_in_evaluation():
  cfg = TINY.__class__(**{**TINY.__dict__, "dropout_rate": 0.3, "attention_dropout_rate": 0.3})
  model = ImageBert(cfg, rngs=nnx.Rngs(0))
  b = random_batch(np.random.default_rng(3), 2)
  args = (jnp.asarray(b["text_ids"]), jnp.asarray(b["text_ids"] != PAD),
          jnp.asarray(b["region_feat"]), jnp.asarray(b["region_loc"]),
          jnp.asarray(np.arange(cfg.max_regions)[None] < b["num_regions"][:, None]))
  e1, e2 = model(*args), model(*args)
  d1 = model(*args, dropout_key=jax.random.key(1))
  d1b = model(*args, dropout_key=jax.random.key(1))
  d2 = model(*args, dropout_key=jax.random.key(2))
  np.testing.assert_array_equal(e1, e2)
  np.testing.assert_array_equal(d1, d1b)
  assert not np.allclose(d1, d2) and not np.allclose(d1, e1)


def test_config_errors_name_the_key():
  bad = TINY.__class__(**{**TINY.__dict__, "num_heads": 5})
  with pytest.raises(ValueError, match="config.model.num_heads=5"):
    ImageBert(bad, rngs=nnx.Rngs(0))


def test_pretraining_heads_compute_in_float32_under_bfloat16():
  """The MLM, MOC and MRFR projections take float32 operands, accumulate and return float32
  even when the model computes in bfloat16 (bfloat16 logits would be off by ~1e-2 relative)."""
  import dataclasses
  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  model = ImageBert(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for name in ("mlm_bias",):
    getattr(model, name)[...] = jnp.asarray(rng.normal(size=getattr(model, name).shape),
                                            jnp.float32)
  for dense in (model.moc, model.mrfr):
    dense.bias[...] = jnp.asarray(rng.normal(size=dense.bias.shape), jnp.float32)
  h = jnp.asarray(rng.normal(size=(3, 5, cfg.hidden_size)), jnp.bfloat16)
  p = _params(model)
  cases = (
      (model.mlm_logits, model.mlm_transform, p["word"]["embedding"].T, p["mlm_bias"]),
      (model.moc_logits, model.moc_transform, p["moc"]["kernel"], p["moc"]["bias"]),
      (model.mrfr_prediction, model.mrfr_transform, p["mrfr"]["kernel"], p["mrfr"]["bias"]),
  )
  for head, transform, kernel, bias in cases:
    t = transform(h)
    assert t.dtype == jnp.float32
    got = head(h)
    assert got.dtype == jnp.float32
    want = np.asarray(t, np.float64) @ kernel.astype(np.float64) + bias
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
