"""Masking rates and rules over many draws, and the ITM pairing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagebert_jax.objectives import masking

PAD, CLS, SEP, MASK = 0, 101, 102, 103
LOW, HIGH = 1000, 30000


def _text(rng, batch=512, width=40):
  ids = np.full((batch, width), PAD, np.int32)
  lengths = rng.integers(8, width - 1, size=batch)
  for i, n in enumerate(lengths):
    ids[i, 0], ids[i, n + 1] = CLS, SEP
    ids[i, 1:n + 1] = rng.integers(LOW, HIGH, size=n)
  return ids


def test_text_masking_rates_and_rules():
  rng = np.random.default_rng(0)
  chosen = maskable_total = masked = randomised = kept = 0
  slots = masking.max_predictions(40, 0.15)
  mask_fn = jax.jit(lambda k, ids, ok: masking.mask_text(
      k, ids, ok, rate=0.15, num_slots=slots, mask_id=MASK, random_token_range=(LOW, HIGH)))
  for draw in range(8):
    ids = _text(rng)
    maskable = (ids != PAD) & (ids != CLS) & (ids != SEP)
    out = jax.device_get(mask_fn(jax.random.key(draw), jnp.asarray(ids), jnp.asarray(maskable)))
    w = out.weights > 0
    rows = np.arange(ids.shape[0])[:, None]
    # Chosen positions are words only, never [CLS], [SEP] or padding; labels are the originals.
    assert maskable[rows, out.positions][w].all()
    np.testing.assert_array_equal(out.labels[w], ids[rows, out.positions][w])
    # At least one prediction in every row; positions distinct within a row.
    assert (w.sum(1) >= 1).all()
    for b in range(ids.shape[0]):
      assert len(set(out.positions[b][w[b]])) == w[b].sum()
    # Nothing changes outside the chosen positions.
    changed = out.input_ids != ids
    chosen_map = np.zeros_like(maskable)
    chosen_map[np.repeat(rows, slots, 1)[w], out.positions[w]] = True
    assert not (changed & ~chosen_map).any()
    new = out.input_ids[rows, out.positions][w]
    chosen += w.sum()
    maskable_total += maskable.sum()
    masked += (new == MASK).sum()
    randomised += ((new != MASK) & (new != out.labels[w])).sum()
    kept += (new == out.labels[w]).sum()
  assert abs(chosen / maskable_total - 0.15) < 0.01
  assert abs(masked / chosen - 0.8) < 0.02
  # A random token equal to the original counts as kept: (HIGH - LOW) makes that negligible.
  assert abs(randomised / chosen - 0.1) < 0.015
  assert abs(kept / chosen - 0.1) < 0.015


def test_region_masking_rates_and_rules():
  rng = np.random.default_rng(1)
  batch, r, d = 512, 100, 4
  slots = masking.max_predictions(r, 0.15)
  fn = jax.jit(lambda k, f, m: masking.mask_regions(k, f, m, rate=0.15, num_slots=slots,
                                                    zero_prob=0.9))
  chosen = valid_total = zeroed = 0
  for draw in range(4):
    n = rng.integers(10, r + 1, size=batch)
    valid = np.arange(r)[None] < n[:, None]
    feat = rng.uniform(1.0, 2.0, size=(batch, r, d)).astype(np.float32)  # never zero
    out = jax.device_get(fn(jax.random.key(draw), jnp.asarray(feat), jnp.asarray(valid)))
    w = out.weights > 0
    rows = np.arange(batch)[:, None]
    assert valid[rows, out.positions][w].all()
    assert (w.sum(1) >= 1).all()
    is_zero = (out.features == 0).all(-1)
    # Only chosen regions are zeroed; the others are untouched.
    chosen_map = np.zeros_like(valid)
    chosen_map[np.repeat(rows, slots, 1)[w], out.positions[w]] = True
    assert not (is_zero & ~chosen_map).any()
    np.testing.assert_array_equal(out.features[~is_zero], feat[~is_zero])
    chosen += w.sum()
    valid_total += valid.sum()
    zeroed += is_zero.sum()
  assert abs(chosen / valid_total - 0.15) < 0.01
  assert abs(zeroed / chosen - 0.9) < 0.02


def test_count_has_mean_rate_times_length():
  """floor(rate * n + u) has mean rate * n exactly, also for short captions (n = 10: 1.5)."""
  valid = jnp.asarray(np.arange(12)[None] < 10).repeat(4096, 0)
  _, w = jax.jit(lambda k: masking.select_positions(k, valid, 0.15, 3))(jax.random.key(0))
  counts = np.asarray(w).sum(1)
  assert set(np.unique(counts)) <= {1, 2}
  assert abs(counts.mean() - 1.5) < 0.03


def test_itm_pairs_labels_and_shares():
  rng = np.random.default_rng(2)
  keys = rng.integers(0, 40, size=256).astype(np.int32)  # some images repeat in the batch
  negs = swapped_text = swapped_image = 0
  for draw in range(20):
    out = jax.device_get(masking.itm_pairs(jax.random.key(draw), jnp.asarray(keys), 0.5))
    idx = np.arange(len(keys))
    np.testing.assert_array_equal(out.labels, (keys[out.text_src] == keys[out.region_src]))
    # At most one side is replaced, and never by itself.
    assert not ((out.text_src != idx) & (out.region_src != idx)).any()
    swapped_text += (out.text_src != idx).sum()
    swapped_image += (out.region_src != idx).sum()
    negs += (out.text_src != idx).sum() + (out.region_src != idx).sum()
  total = 20 * len(keys)
  assert abs(negs / total - 0.5) < 0.03
  assert abs(swapped_text / max(negs, 1) - 0.5) < 0.05
  assert swapped_image > 0


def test_hard_negatives_are_drawn_by_the_softmax_of_the_similarities():
  """Each image's negative caption and each caption's negative image are drawn with the softmax
  of the contrastive logits over the other images' entries: frequencies over many draws against
  the NumPy probabilities of a fixed matrix; a pair's own image is never drawn."""
  logits = np.array([[4.0, 1.0, 0.0, 2.0, -1.0],
                     [0.5, 3.0, 2.5, 0.0, 0.0],
                     [1.0, 2.0, 3.0, 0.0, 1.5],
                     [2.0, 0.0, -1.0, 1.0, 0.5],
                     [0.0, 1.0, 0.5, 3.0, 0.0]], np.float32)  # [caption, image]
  keys = np.array([10, 11, 12, 13, 10], np.int32)  # captions 0 and 4 show the same image

  def softmax_others(row_logits, row_key, other_keys):
    w = np.where(other_keys != row_key, np.exp(row_logits - row_logits.max()), 0.0)
    return w / w.sum()

  want_caption = np.stack([softmax_others(logits[:, i], keys[i], keys) for i in range(5)])
  want_image = np.stack([softmax_others(logits[j, :], keys[j], keys) for j in range(5)])
  draws = 4000
  sample = jax.jit(jax.vmap(lambda k: masking.sample_negatives(k, jnp.asarray(logits),
                                                               jnp.asarray(keys))))
  caption_for_image, image_for_caption = jax.device_get(
      sample(jax.random.split(jax.random.key(0), draws)))
  for got, want in ((caption_for_image, want_caption), (image_for_caption, want_image)):
    freq = np.stack([np.bincount(got[:, i], minlength=5) / draws for i in range(5)])
    assert np.all(freq[want == 0] == 0)  # never the same image
    np.testing.assert_allclose(freq, want, atol=0.03)


def test_hard_itm_pairs_rows_and_labels():
  rng = np.random.default_rng(3)
  b = 64
  keys = np.arange(b, dtype=np.int32)
  logits = rng.normal(size=(b, b)).astype(np.float32)
  out = jax.device_get(masking.hard_itm_pairs(jax.random.key(1), jnp.asarray(logits),
                                              jnp.asarray(keys)))
  idx = np.arange(b)
  # The batch's own pairs first, all matched; then one negative per pair, one side replaced.
  np.testing.assert_array_equal(out.text_src[:b], idx)
  np.testing.assert_array_equal(out.region_src[:b], idx)
  np.testing.assert_array_equal(out.labels, np.r_[np.ones(b), np.zeros(b)])
  t, r = out.text_src[b:], out.region_src[b:]
  assert np.all((t == idx) ^ (r == idx))
  assert 0.3 < np.mean(t != idx) < 0.7
  # A batch of one image: nothing to draw, every row is that image's own pair (label 1).
  same = jax.device_get(masking.hard_itm_pairs(jax.random.key(1), jnp.asarray(logits[:4, :4]),
                                               jnp.zeros(4, jnp.int32)))
  np.testing.assert_array_equal(same.labels, np.ones(8))


def test_swap_foils_hand_worked():
  # Tokens: 5 'a', 6 'red', 7 'car', 8 'next', 9 'white', 10 'bus', 11 'blue'. Kinds: objects 1
  # (car, bus), attributes 2 (red, white, blue).
  kinds = np.zeros(128, np.int32)  # a kind for every token id (CLS is 101)
  kinds[[7, 10]] = 1
  kinds[[6, 9, 11]] = 2
  caption = [CLS, 5, 6, 7, 8, 5, 9, 10, SEP, PAD]   # a red car next a white bus
  one_pair = [CLS, 5, 7, 8, 5, 10, SEP, PAD, PAD, PAD]  # a car next a bus: only the objects
  nothing = [CLS, 5, 6, 7, 8, 5, 6, 7, SEP, PAD]    # a red car next a red car: nothing differs
  ids = jnp.asarray([caption, one_pair, nothing], jnp.int32)
  seen = set()
  for draw in range(40):
    foils, has = jax.device_get(masking.swap_foils(jax.random.key(draw), ids, jnp.asarray(kinds)))
    np.testing.assert_array_equal(has, [True, True, False])
    seen.add(tuple(foils[0]))
    np.testing.assert_array_equal(foils[1], [CLS, 5, 10, 8, 5, 7, SEP, PAD, PAD, PAD])
    np.testing.assert_array_equal(foils[2], nothing)
  # The two swaps of the first caption, each drawn: objects, or attributes.
  assert seen == {(CLS, 5, 6, 10, 8, 5, 9, 7, SEP, PAD), (CLS, 5, 9, 7, 8, 5, 6, 10, SEP, PAD)}


def test_spatial_foils_hand_worked():
  # Tokens: 5 'a', 7 'dog', 10 'car', 12 'left', 13 'right', 14 'above', 15 'below', 16 'of',
  # 6 'red', 9 'white'. Opposite pairs: left/right, above/below.
  opposite = jax.device_get(masking.opposite_words(128, ((12, 13), (14, 15))))
  want = np.arange(128)
  want[[12, 13, 14, 15]] = [13, 12, 15, 14]
  np.testing.assert_array_equal(opposite, want)
  kinds = np.zeros(128, np.int32)
  kinds[[7, 10]] = 1
  kinds[[6, 9]] = 2
  left = [CLS, 5, 7, 12, 16, 5, 10, SEP, PAD]      # a dog left of a car
  above = [CLS, 5, 6, 7, 14, 5, 9, 10, SEP]        # a red dog above a white car
  plain = [CLS, 5, 6, 7, 5, 9, 10, SEP, PAD]       # a red dog a white car: no spatial word
  neither = [CLS, 5, 7, SEP, PAD, PAD, PAD, PAD, PAD]
  ids = jnp.asarray([left, above, plain, neither], jnp.int32)
  flipped, has = jax.device_get(masking.flip_spatial(ids, jnp.asarray(opposite)))
  np.testing.assert_array_equal(has, [True, True, False, False])
  np.testing.assert_array_equal(flipped[0], [CLS, 5, 7, 13, 16, 5, 10, SEP, PAD])
  np.testing.assert_array_equal(flipped[1], [CLS, 5, 6, 7, 15, 5, 9, 10, SEP])
  np.testing.assert_array_equal(flipped[2:], ids[2:])
  # With the flips: a caption with a spatial word always gets its flip, the others a swap.
  for draw in range(10):
    f, h, flip = jax.device_get(masking.foils(jax.random.key(draw), ids, jnp.asarray(kinds),
                                              ((12, 13), (14, 15))))
    np.testing.assert_array_equal(h, [True, True, True, False])
    np.testing.assert_array_equal(flip, [True, True, False, False])
    np.testing.assert_array_equal(f[:2], flipped[:2])
    assert tuple(f[2]) in {(CLS, 5, 9, 7, 5, 6, 10, SEP, PAD), (CLS, 5, 6, 10, 5, 9, 7, SEP, PAD)}
    np.testing.assert_array_equal(f[3], neither)
  # Without them, the swaps alone (the dog and the car of the first caption).
  f, h, flip = jax.device_get(masking.foils(jax.random.key(0), ids, jnp.asarray(kinds)))
  np.testing.assert_array_equal(h, [True, True, True, False])
  assert not flip.any()
  np.testing.assert_array_equal(f[0], [CLS, 5, 10, 12, 16, 5, 7, SEP, PAD])


def test_rank_loss_against_numpy():
  from imagebert_jax.objectives.pretraining import PretrainObjective, rank_loss
  pos = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
  neg = np.array([1.0, 1.0, 0.5, -2.0], np.float32)
  valid = np.array([True, True, False, True])  # the third pair's "negative" is a match
  want = np.mean([np.log1p(np.exp(n - p)) for p, n, v in zip(pos, neg, valid) if v])
  got = rank_loss(pos, neg[:, None], valid[:, None])
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # Two negatives per pair: -log(e^p / (e^p + sum of the valid negatives' e^n)), by hand.
  negs = np.array([[1.0, 0.0], [1.0, 3.0], [0.5, 0.5], [-2.0, 4.0]], np.float32)
  ok = np.array([[True, True], [True, False], [False, False], [True, True]])
  per = [-p + np.log(np.exp(p) + np.exp(n[v]).sum()) for p, n, v in zip(pos, negs, ok) if v.any()]
  np.testing.assert_allclose(float(rank_loss(pos, negs, ok)), np.mean(per), rtol=1e-6)
  # A pair ranked right by a wide margin costs almost nothing; ranked wrong, about the margin.
  assert float(rank_loss(np.array([9.0]), np.array([[0.0]]), np.array([[True]]))) < 1e-3
  assert abs(float(rank_loss(np.array([0.0]), np.array([[9.0]]), np.array([[True]]))) - 9.0) < 1e-3
  with pytest.raises(ValueError, match="itm_rank_weight"):
    PretrainObjective(itm_rank_weight=1.0).validate()
  with pytest.raises(ValueError, match="itm_num_negatives=3"):
    PretrainObjective(itm_num_negatives=3).validate()


def test_hard_itm_pairs_with_several_negatives_per_pair():
  rng = np.random.default_rng(4)
  b, k = 32, 3
  logits = jnp.asarray(rng.normal(size=(b, b)).astype(np.float32))
  keys = jnp.arange(b, dtype=jnp.int32)
  one = jax.device_get(masking.hard_itm_pairs(jax.random.key(2), logits, keys))
  out = jax.device_get(masking.hard_itm_pairs(jax.random.key(2), logits, keys,
                                              num_negatives=k))
  idx = np.arange(b)
  np.testing.assert_array_equal(out.labels, np.r_[np.ones(b), np.zeros(k * b)])
  # The first block is the one-negative draw itself; each block replaces one side of each pair.
  np.testing.assert_array_equal(out.text_src[:2 * b], one.text_src)
  np.testing.assert_array_equal(out.region_src[:2 * b], one.region_src)
  for block in range(1, k + 1):
    t, r = out.text_src[block * b:(block + 1) * b], out.region_src[block * b:(block + 1) * b]
    assert np.all((t == idx) ^ (r == idx))
  assert not np.array_equal(out.text_src[b:2 * b], out.text_src[2 * b:3 * b])
