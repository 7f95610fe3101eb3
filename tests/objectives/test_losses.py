"""Each pretraining loss against a NumPy computation on a hand-sized example."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import CLS, MASK, PAD, RANDOM_RANGE, SEP, TINY, random_batch
from imagebert_jax.model import ImageBert
from imagebert_jax.objectives import pretraining as P


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mlm_loss_matches_numpy():
  logits = np.array([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [3.0, -2.0, 0.0, 1.0]]])
  labels = np.array([[0, 3, 1]])
  weights = np.array([[1.0, 1.0, 0.0]])  # the third slot is unused
  lp = np_log_softmax(logits)
  want = -(lp[0, 0, 0] + lp[0, 1, 3]) / 2
  loss, acc = P.mlm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(acc, 1.0)  # argmax 0 == 0, argmax 3 == 3


def test_moc_cross_entropy_and_kl_match_numpy():
  logits = np.array([[[1.0, 2.0, 0.5], [0.0, -1.0, 2.0]]])
  labels = np.array([[1, 0]])
  weights = np.array([[1.0, 1.0]])
  lp = np_log_softmax(logits)
  loss, acc = P.moc_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  np.testing.assert_allclose(loss, -(lp[0, 0, 1] + lp[0, 1, 0]) / 2, rtol=1e-6)
  np.testing.assert_allclose(acc, 0.5)
  target = np.array([[[0.2, 0.8, 0.0], [0.5, 0.25, 0.25]]])
  kl = [sum(p * (np.log(p) - q) for p, q in zip(target[0, i], lp[0, i]) if p > 0)
        for i in range(2)]
  loss, _ = P.moc_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights),
                       jnp.asarray(target))
  np.testing.assert_allclose(loss, np.mean(kl), rtol=1e-5)


def test_mrfr_loss_matches_numpy():
  pred = np.array([[[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]]])
  target = np.array([[[0.0, 0.0], [1.0, 3.0], [0.0, 0.0]]])
  weights = np.array([[1.0, 1.0, 0.0]])
  want = ((1 + 4) / 2 + (1 + 9) / 2) / 2  # squared error averaged over dims, then regions
  got = P.mrfr_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(weights))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_itm_loss_matches_numpy():
  logits = np.array([2.0, -1.0, 0.5, -3.0])
  labels = np.array([1.0, 0.0, 0.0, 1.0])
  p = 1 / (1 + np.exp(-logits))
  want = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  loss, acc = P.itm_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(acc, 0.5)  # right on the first two only


def _objective(**kw):
  return P.PretrainObjective(pad_id=PAD, cls_id=CLS, sep_id=SEP, mask_id=MASK,
                             random_token_range=RANDOM_RANGE, **kw)


def test_masked_losses_count_only_matched_pairs():
  model = ImageBert(TINY, rngs=nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(0), 6).items()}
  # Every pair a negative (all images distinct): nothing is predicted, only ITM counts.
  _, m = P.pretrain_loss(model, batch, jax.random.key(1), _objective(itm_neg_prob=1.0))
  assert float(m["itm_positive_share"]) == 0.0
  for k in ("mlm_loss", "moc_loss", "mrfr_loss"):
    assert float(m[k]) == 0.0, k
  # All matched: the masked losses are real, and the total is their weighted sum.
  obj = _objective(itm_neg_prob=0.0, mlm_weight=0.5, moc_weight=2.0, mrfr_weight=3.0,
                   itm_weight=0.25)
  total, m = P.pretrain_loss(model, batch, jax.random.key(1), obj)
  assert float(m["itm_positive_share"]) == 1.0
  assert min(float(m["mlm_loss"]), float(m["moc_loss"]), float(m["mrfr_loss"])) > 0
  want = (0.5 * m["mlm_loss"] + 2.0 * m["moc_loss"] + 3.0 * m["mrfr_loss"]
          + 0.25 * m["itm_loss"])
  np.testing.assert_allclose(total, want, rtol=1e-6)


def test_mlm_loss_recomputed_from_logits_by_hand():
  """The MLM term equals a NumPy cross-entropy over the masked positions, recomputed outside."""
  model = ImageBert(TINY, rngs=nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(1), 4).items()}
  obj = _objective(itm_neg_prob=0.0)
  key = jax.random.key(7)
  _, m = P.pretrain_loss(model, batch, key, obj, train=False)
  # Redo the masking with the same keys, then the forward, then the loss in NumPy.
  from imagebert_jax.objectives import masking
  _, text_key, region_key, _ = jax.random.split(key, 4)
  ids = batch["text_ids"]
  maskable = (ids != PAD) & (ids != CLS) & (ids != SEP)
  slots = masking.max_predictions(ids.shape[1], 0.15)
  tm = masking.mask_text(text_key, ids, maskable, rate=0.15, num_slots=slots, mask_id=MASK,
                         random_token_range=RANDOM_RANGE)
  region_mask = jnp.arange(TINY.max_regions)[None] < batch["num_regions"][:, None]
  rm = masking.mask_regions(region_key, batch["region_feat"], region_mask, rate=0.15,
                            num_slots=masking.max_predictions(TINY.max_regions, 0.15))
  text_h, _ = model.encode(tm.input_ids, ids != PAD, rm.features, batch["region_loc"],
                           region_mask)
  logits = np.asarray(model.mlm_logits(text_h))  # all positions
  lp = np_log_softmax(logits)
  pos, lab, w = map(np.asarray, (tm.positions, tm.labels, tm.weights))
  ce = [-lp[b, pos[b, j], lab[b, j]] for b in range(4) for j in range(slots) if w[b, j] > 0]
  np.testing.assert_allclose(m["mlm_loss"], np.mean(ce), rtol=1e-5)


def test_kl_variant_needs_and_uses_class_distributions():
  model = ImageBert(TINY, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  batch = random_batch(rng, 4)
  probs = rng.dirichlet(np.ones(TINY.num_object_classes), size=(4, TINY.max_regions))
  batch["region_probs"] = probs.astype(np.float32)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  _, m_ce = P.pretrain_loss(model, batch, jax.random.key(0), _objective(itm_neg_prob=0.0))
  _, m_kl = P.pretrain_loss(model, batch, jax.random.key(0),
                            _objective(itm_neg_prob=0.0, moc_loss="kl"))
  assert np.isfinite(float(m_kl["moc_loss"])) and float(m_kl["moc_loss"]) > 0
  assert abs(float(m_kl["moc_loss"]) - float(m_ce["moc_loss"])) > 1e-3


def test_padded_vocabulary_rows_are_never_predicted():
  """A model vocabulary padded past the tokenizer's: those rows cannot win, whatever their bias."""
  cfg = dataclasses.replace(TINY, vocab_size=64)  # the tokenizer has 60
  model = ImageBert(cfg, rngs=nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(5), 4).items()}
  obj = _objective(itm_neg_prob=0.0, vocab_size=60)
  losses = []
  for bias in (100.0, -100.0):
    model.mlm_bias[...] = model.mlm_bias[...].at[60:].set(bias)
    _, m = P.pretrain_loss(model, batch, jax.random.key(3), obj, train=False)
    losses.append(float(m["mlm_loss"]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
  assert losses[0] < 20  # a +100 bias on the padding would have made it about 100


def test_regions_without_a_detector_class_do_not_count_for_moc():
  model = ImageBert(TINY, rngs=nnx.Rngs(0))
  batch = random_batch(np.random.default_rng(6), 4)
  batch["region_class"][:] = -1  # e.g. npz features stored without class distributions
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  _, m = P.pretrain_loss(model, batch, jax.random.key(0), _objective(itm_neg_prob=0.0))
  assert float(m["moc_loss"]) == 0.0 and float(m["mlm_loss"]) > 0


def test_spatial_foils_reach_the_matching_rows():
  """With spatial foils, each pair whose caption has a spatial word (here token 7, "left", whose
  opposite is 8) gets its flipped caption on its own image as a negative; without them, only
  captions with two object words of their own do (here none: token 50 is the only object)."""
  model = ImageBert(TINY, rngs=nnx.Rngs(0))
  raw = random_batch(np.random.default_rng(0), 6)
  ids = raw["text_ids"]
  ids[np.isin(ids, (7, 8, 50))] = 9
  ids[:3, 1] = 7
  batch = {k: jnp.asarray(v) for k, v in raw.items()}
  base = dict(itm_negatives="hard", itc_weight=1.0, itm_foil_share=1.0, object_token_ids=(50,),
              spatial_opposite_ids=((7, 8),))
  _, m = P.pretrain_loss(model, batch, jax.random.key(1), _objective(itm_foil_spatial=True, **base))
  assert float(m["itm_foil_share"]) == 0.5
  assert float(m["itm_flip_share"]) == 0.5  # every foil here is a flip
  assert float(m["itm_flip_accuracy"]) == float(m["itm_foil_accuracy"])  # the same rows
  _, m = P.pretrain_loss(model, batch, jax.random.key(1), _objective(**base))
  assert float(m["itm_foil_share"]) == 0.0
  with pytest.raises(ValueError, match="itm_foil_spatial"):
    _objective(itm_foil_spatial=True, **dict(base, spatial_opposite_ids=())).validate()
