"""Masking rates and rules over many draws, and the ITM pairing."""

import jax
import jax.numpy as jnp
import numpy as np

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
