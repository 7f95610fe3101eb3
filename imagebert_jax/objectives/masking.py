"""On-device masking for the pretraining objectives and image-text matching negatives.

All randomness comes from a key made of (seed, step) inside the jitted step, so a resumed run draws
exactly the same masks. Shapes are static: each example predicts at most `max_predictions`
positions, gathered into [B, P] arrays with a 0/1 weight, so the vocabulary decoder and the region
heads run on masked positions only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def max_predictions(length: int, rate: float) -> int:
  """Static number of prediction slots for `length` positions masked at `rate`.

  The count drawn per example is floor(rate * n + u) with u ~ U[0, 1), at most ceil(rate * n),
  so ceil(rate * length) slots always suffice (and at least one, for the one-per-pair minimum).
  """
  return max(1, min(length, math.ceil(rate * length)))


def select_positions(key: jax.Array, valid: jax.Array, rate: float,
                     num_slots: int, first: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Chooses a random subset of the valid positions of each row.

  The count is floor(rate * n_valid + u), u ~ U[0, 1) (so its mean is exactly rate * n_valid),
  at least one when the row has any valid position, at most `num_slots`. Positions where `first`
  [B, L] is true are chosen before the others (at random among themselves). Returns
  (positions [B, P] int32, weights [B, P] float32); slots beyond the count have weight 0 and point
  at some position whose content must be ignored.
  """
  count_key, order_key = jax.random.split(key)
  n_valid = valid.sum(-1)
  u = jax.random.uniform(count_key, n_valid.shape)
  count = jnp.floor(rate * n_valid + u).astype(jnp.int32)
  count = jnp.clip(count, jnp.minimum(1, n_valid), jnp.minimum(num_slots, n_valid))
  scores = jax.random.uniform(order_key, valid.shape)
  if first is not None:
    scores = scores + first.astype(scores.dtype)
  scores = jnp.where(valid, scores, -1.0)
  _, positions = jax.lax.top_k(scores, num_slots)
  weights = (jnp.arange(num_slots)[None, :] < count[:, None]).astype(jnp.float32)
  return positions.astype(jnp.int32), weights


class TextMasking(NamedTuple):
  input_ids: jax.Array  # [B, T] with [MASK] / random / kept tokens at the chosen positions
  positions: jax.Array  # [B, P]
  labels: jax.Array     # [B, P] the original tokens
  weights: jax.Array    # [B, P] 1.0 where a prediction counts


def mask_text(key: jax.Array, text_ids: jax.Array, maskable: jax.Array, *, rate: float,
              num_slots: int, mask_id: int, random_token_range: tuple[int, int],
              mask_prob: float = 0.8, random_prob: float = 0.1,
              first: jax.Array | None = None) -> TextMasking:
  """BERT masking: of the chosen tokens, `mask_prob` become [MASK], `random_prob` a random token
  drawn uniformly from `random_token_range` (low inclusive, high exclusive), the rest unchanged.
  Tokens where `first` is true are chosen before the others (`select_positions`)."""
  select_key, action_key, token_key = jax.random.split(key, 3)
  positions, weights = select_positions(select_key, maskable, rate, num_slots, first)
  labels = jnp.take_along_axis(text_ids, positions, axis=1)
  action = jax.random.uniform(action_key, positions.shape)
  random_tokens = jax.random.randint(token_key, positions.shape, *random_token_range,
                                     dtype=text_ids.dtype)
  new = jnp.where(action < mask_prob, jnp.asarray(mask_id, text_ids.dtype),
                  jnp.where(action < mask_prob + random_prob, random_tokens, labels))
  new = jnp.where(weights > 0, new, labels)
  rows = jnp.arange(text_ids.shape[0])[:, None]
  input_ids = text_ids.at[rows, positions].set(new)
  return TextMasking(input_ids, positions, labels, weights)


class RegionMasking(NamedTuple):
  features: jax.Array   # [B, R, D] with the masked regions' features zeroed (or kept)
  positions: jax.Array  # [B, P]
  weights: jax.Array    # [B, P]


def mask_regions(key: jax.Array, region_feat: jax.Array, region_mask: jax.Array, *, rate: float,
                 num_slots: int, zero_prob: float = 0.9) -> RegionMasking:
  """Chooses regions to mask; a chosen region's feature is zeroed with `zero_prob`, else kept.

  The 5-d location is left as it is. Targets (label, feature, distribution) are read by the
  caller at `positions` from the unmasked inputs.
  """
  select_key, action_key = jax.random.split(key)
  positions, weights = select_positions(select_key, region_mask, rate, num_slots)
  zero = (jax.random.uniform(action_key, positions.shape) < zero_prob) & (weights > 0)
  rows = jnp.arange(region_feat.shape[0])[:, None]
  keep = jnp.ones(region_mask.shape, region_feat.dtype).at[rows, positions].min(
      jnp.where(zero, 0, 1).astype(region_feat.dtype))
  return RegionMasking(region_feat * keep[..., None], positions, weights)


class PairSwap(NamedTuple):
  text_src: jax.Array    # [B] which example's caption each pair uses
  region_src: jax.Array  # [B] which example's regions each pair uses
  labels: jax.Array      # [B] float32: 1.0 when caption and regions belong to the same image


def itm_pairs(key: jax.Array, image_key: jax.Array, neg_prob: float) -> PairSwap:
  """Image-text matching pairs from a batch of matched pairs.

  With probability `neg_prob` an example becomes a negative: half of the time its caption is
  replaced by another example's, otherwise its image. The partner is a uniformly chosen other
  example of the batch. The label compares image identities, so a "negative" that happens to draw
  a caption of the same image is labelled as the match it is.
  """
  neg_key, side_key, partner_key = jax.random.split(key, 3)
  b = image_key.shape[0]
  idx = jnp.arange(b)
  neg = jax.random.uniform(neg_key, (b,)) < neg_prob
  swap_text = jax.random.uniform(side_key, (b,)) < 0.5
  shift = jax.random.randint(partner_key, (b,), 1, max(b, 2))
  partner = (idx + shift) % b
  text_src = jnp.where(neg & swap_text, partner, idx)
  region_src = jnp.where(neg & ~swap_text, partner, idx)
  labels = (image_key[text_src] == image_key[region_src]).astype(jnp.float32)
  return PairSwap(text_src, region_src, labels)


def sample_negatives(key: jax.Array, logits: jax.Array,
                     image_key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Hard negatives drawn from a batch's contrastive logits (ALBEF's sampling, Li et al. 2021).

  `logits` [B, B] is caption j against image i (the contrastive head's scale x cosine). Each
  image draws one negative caption with probability softmax over the captions of other images of
  its column, and each caption one negative image from its row the same way: the most similar
  wrong partners are the likeliest, yet every one can be drawn, so one near-duplicate of the
  right answer (a false negative) does not get every draw. Returns (caption for each image [B],
  image for each caption [B]); an entry with no other image in the batch gets itself.
  """
  k_caption, k_image = jax.random.split(key)
  b = logits.shape[0]
  other = image_key[:, None] != image_key[None, :]  # [caption, image]: different images
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  masked = jnp.where(other, logits, -jnp.inf)
  own = jnp.arange(b)
  caption_for_image = jax.random.categorical(k_caption, masked.T, axis=-1)
  image_for_caption = jax.random.categorical(k_image, masked, axis=-1)
  has = other.any(axis=0)  # symmetric: an image has another when its caption does
  return (jnp.where(has, caption_for_image, own).astype(jnp.int32),
          jnp.where(has, image_for_caption, own).astype(jnp.int32))


def hard_itm_pairs(key: jax.Array, logits: jax.Array, image_key: jax.Array,
                   random_share: float = 0.0, num_negatives: int = 1) -> PairSwap:
  """Image-text matching pairs with hard negatives: the batch's B matched pairs first, then
  `num_negatives` blocks of one negative per pair each, its caption or (as often) its image
  replaced by one drawn from the contrastive logits (`sample_negatives`), or with probability
  `random_share` by one drawn uniformly from the other images' (the easy negatives that
  matching starts learning from). Each block draws afresh (block 0 from `key` itself, block k
  from its fold k), so a pair may meet one negative twice. [(1 + K) B] entries, pair i's
  negatives at B + i, 2B + i, ...; labels compare image identities."""
  b = image_key.shape[0]
  own = jnp.arange(b, dtype=jnp.int32)
  text_src, region_src = [own], [own]
  for k in range(num_negatives):
    sample_key, uniform_key, side_key, share_key = jax.random.split(
        key if k == 0 else jax.random.fold_in(key, k), 4)
    neg_caption, neg_image = sample_negatives(sample_key, logits, image_key)
    if random_share > 0:
      any_caption, any_image = sample_negatives(uniform_key, jnp.zeros_like(logits), image_key)
      easy = jax.random.uniform(share_key, (b,)) < random_share
      neg_caption = jnp.where(easy, any_caption, neg_caption)
      neg_image = jnp.where(easy, any_image, neg_image)
    swap_text = jax.random.uniform(side_key, (b,)) < 0.5
    text_src.append(jnp.where(swap_text, neg_caption, own))
    region_src.append(jnp.where(swap_text, own, neg_image))
  text_src, region_src = jnp.concatenate(text_src), jnp.concatenate(region_src)
  labels = (image_key[text_src] == image_key[region_src]).astype(jnp.float32)
  return PairSwap(text_src, region_src, labels)


def swap_foils(key: jax.Array, text_ids: jax.Array,
               word_kinds: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Foils of captions: the same words with two of one kind swapped (NegCLIP's swaps,
  Yuksekgonul et al. 2023). `word_kinds` [V] int gives every token id its kind (0: none; e.g. 1 for
  the detector's object names, 2 for its attribute names). In each caption, two positions of
  one kind holding different tokens are drawn uniformly among all such pairs and swapped: "a red
  car next to a white bus" -> "a white car next to a red bus", "a dog left of a car" -> "a car
  left of a dog". Returns (foils [B, T], has_foil [B] bool: the caption had such a pair; where
  it had none its foil is the caption itself)."""
  b, t = text_ids.shape
  kind = word_kinds[text_ids]
  same_kind = (kind[:, :, None] == kind[:, None, :]) & (kind[:, :, None] > 0)
  differ = text_ids[:, :, None] != text_ids[:, None, :]
  upper = jnp.arange(t)[:, None] < jnp.arange(t)[None, :]
  valid = (same_kind & differ & upper[None]).reshape(b, t * t)
  noise = jax.random.gumbel(key, valid.shape)
  pick = jnp.argmax(jnp.where(valid, noise, -jnp.inf), axis=-1)
  has = valid.any(axis=-1)
  i, j = pick // t, pick % t
  rows = jnp.arange(b)
  swapped = text_ids.at[rows, i].set(text_ids[rows, j]).at[rows, j].set(text_ids[rows, i])
  return jnp.where(has[:, None], swapped, text_ids), has


def opposite_words(vocab_size: int, pairs: tuple[tuple[int, int], ...]) -> jax.Array:
  """[V] int32: every token id mapped to itself, but for the spatial words of `pairs` (token ids of
  "left" and "right", "above" and "below", ...), each mapped to the other of its pair."""
  table = jnp.arange(vocab_size, dtype=jnp.int32)
  if pairs:
    a, b = (jnp.asarray(x, jnp.int32) for x in zip(*pairs))
    table = table.at[a].set(b).at[b].set(a)
  return table


def flip_spatial(text_ids: jax.Array, opposite: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Captions with every spatial word turned into its opposite (`opposite_words`): "a dog to the
  left of a car" -> "a dog to the right of a car", the mirror image of what it said, false of
  the image where the caption was true; only the boxes tell which. Returns (flipped [B, T],
  has_flip [B] bool: the caption had a spatial word of a pair; where not, it is unchanged)."""
  flipped = opposite[text_ids]
  return flipped, jnp.any(flipped != text_ids, axis=-1)


def foils(key: jax.Array, text_ids: jax.Array, word_kinds: jax.Array,
          opposite_pairs: tuple[tuple[int, int], ...] = ()
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each caption's foil: with `opposite_pairs` given (`opposite_words`), a caption with a
  spatial word gets its flip (`flip_spatial`: rare in captions, and the one foil that asks where
  things are); the others (and all without pairs) their two words of one kind swapped
  (`swap_foils`). Returns (foils [B, T], has_foil [B] bool, flipped [B] bool: the foil is a
  spatial flip)."""
  swapped, has = swap_foils(key, text_ids, word_kinds)
  if not opposite_pairs:
    return swapped, has, jnp.zeros_like(has)
  flipped, has_flip = flip_spatial(text_ids, opposite_words(word_kinds.shape[0], opposite_pairs))
  return jnp.where(has_flip[:, None], flipped, swapped), has | has_flip, has_flip
