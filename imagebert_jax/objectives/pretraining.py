"""The four pretraining objectives of ImageBERT, computed together on one batch.

Per batch of matched (caption, image) pairs:
  1. Image-text matching: a share of the pairs become negatives by swapping the caption or the
     image with another pair's (`masking.itm_pairs`), or (itm_negatives='hard') every pair gets
     one more row, a negative drawn from the batch's contrastive similarities
     (`masking.hard_itm_pairs`); binary cross-entropy on the [CLS] score.
  2. Masked language modelling: 15% of the word tokens (80% [MASK], 10% random, 10% kept);
     cross-entropy over the vocabulary at those positions only.
  3. Masked object classification: 15% of the regions (feature zeroed 90% of the time); cross-entropy
     against the detector's top class, or KL divergence to its class distribution.
  4. Masked region feature regression: on the same regions, squared error against the original
     feature, averaged over the feature dimension.
Losses 2-4 count only on matched pairs. Masking is applied to every pair, matched or not, so the
presence of masks says nothing about the match.

The batch (global arrays, one row per pair):
  text_ids     int32 [B, T]  [CLS] words [SEP] then padding (pad id)
  region_feat  [B, R, D]     float16 or float32
  region_loc   float32 [B, R, 5]
  num_regions  int32 [B]     regions are a valid prefix of length num_regions
  region_class int32 [B, R]  the detector's top class per region
  region_probs [B, R, C]     the detector's class distribution (only for moc_loss='kl')
  image_key    int32 [B]     an identity of the image (equal keys: same image)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from imagebert_jax.objectives import contrastive, masking


@dataclasses.dataclass(frozen=True)
class PretrainObjective:
  """Static settings of the pretraining objectives (from config.objective and config.text)."""

  pad_id: int = 0
  cls_id: int = 101
  sep_id: int = 102
  mask_id: int = 103
  random_token_range: tuple[int, int] = (999, 30522)
  vocab_size: int = 0  # the tokenizer's; model rows past it (padding) are never predicted
  mlm_rate: float = 0.15
  mlm_mask_prob: float = 0.8
  mlm_random_prob: float = 0.1
  region_rate: float = 0.15
  region_zero_prob: float = 0.9
  itm_neg_prob: float = 0.5
  # Where image-text matching negatives come from: 'random' (the paper's: a share itm_neg_prob of
  # the pairs get another pair's caption or image, drawn uniformly) or 'hard' (every pair also
  # gets one negative drawn from the batch's contrastive similarities, masking.hard_itm_pairs:
  # twice the rows through the joint encoder; needs itc_weight > 0).
  itm_negatives: str = "random"
  itm_random_share: float = 0.0  # with 'hard': this share of the negatives drawn uniformly
  # What matching sees: 'masked' (the paper's: the pass that the masked objectives use, masked
  # alike for matched and unmatched rows) or 'clean' (a pass of its own over unmasked inputs, as
  # retrieval scores them; the masked pass then runs on the batch's matched pairs only).
  itm_inputs: str = "masked"
  # Visual words: the tokens that name what the detector sees (its object and attribute names;
  # filled from the dataset, not a config key). With mlm_visual_share > 0, that share of the
  # captions has its visual words masked before its other words: words only the image can tell.
  visual_token_ids: tuple[int, ...] = ()
  mlm_visual_share: float = 0.0
  # Foils (masking.swap_foils): the detector's object and attribute names' tokens (filled from
  # the dataset); with itm_negatives 'hard', this share of the pairs whose caption has two such
  # words of one kind takes as its negative that caption with them swapped, on its own image.
  object_token_ids: tuple[int, ...] = ()
  attribute_token_ids: tuple[int, ...] = ()
  itm_foil_share: float = 0.0
  # With itm_foil_spatial, a caption with a spatial word ("left", "above", ...) takes as its foil
  # that word turned into its opposite (masking.flip_spatial) rather than a swap. The pairs'
  # token ids come from the dataset's vocabulary.
  spatial_opposite_ids: tuple[tuple[int, int], ...] = ()
  itm_foil_spatial: bool = False
  moc_loss: str = "ce"  # 'ce' (detector's top class) or 'kl' (its class distribution)
  mlm_weight: float = 1.0
  moc_weight: float = 1.0
  mrfr_weight: float = 1.0
  itm_weight: float = 1.0
  # With itm_negatives 'hard': each pair's matching logit against its own negative's, as a
  # ranking (the logistic loss of their difference, BPR / RankNet): the comparison re-ranking
  # makes, where the binary loss only calibrates each score alone. 0: off (the paper's).
  itm_rank_weight: float = 0.0
  # With itm_negatives 'hard': negatives drawn per pair and step (each its own matching row;
  # the rank loss ranks the pair above all of them). 1: one, as ALBEF.
  itm_num_negatives: int = 1
  itc_weight: float = 0.0  # the contrastive loss on the unmasked matched pairs (0: off)

  def validate(self) -> None:
    if self.itm_negatives not in ("random", "hard"):
      raise ValueError(f"config.objective.itm_negatives={self.itm_negatives!r}: want 'random' or "
                       "'hard'")
    if self.itm_negatives == "hard" and not self.itc_weight:
      raise ValueError("config.objective.itm_negatives='hard' draws negatives from the contrastive "
                       "similarities: it needs config.objective.itc_weight > 0")
    if self.itm_inputs not in ("masked", "clean"):
      raise ValueError(f"config.objective.itm_inputs={self.itm_inputs!r}: want 'masked' or "
                       "'clean'")
    if self.itm_num_negatives < 1 or (self.itm_num_negatives > 1
                                      and self.itm_negatives != "hard"):
      raise ValueError(f"config.objective.itm_num_negatives={self.itm_num_negatives}: want 1, or "
                       "more with itm_negatives='hard'")
    if self.itm_rank_weight and self.itm_negatives != "hard":
      raise ValueError("config.objective.itm_rank_weight > 0 needs itm_negatives='hard' (each "
                       "pair is ranked against its own negative)")
    if self.itm_foil_share and self.itm_negatives != "hard":
      raise ValueError("config.objective.itm_foil_share > 0 needs itm_negatives='hard' (a foil "
                       "takes the place of a pair's drawn negative)")
    if self.itm_foil_share and not (self.object_token_ids or self.attribute_token_ids):
      raise ValueError("config.objective.itm_foil_share > 0 needs the detector's words: the "
                       "dataset names no detector classes or attributes")
    if self.itm_foil_spatial and not (self.itm_foil_share and self.spatial_opposite_ids):
      raise ValueError("config.objective.itm_foil_spatial needs itm_foil_share > 0 and the "
                       "spatial words (left/right, above/below) in the vocabulary")
    if self.mlm_visual_share and not self.visual_token_ids:
      raise ValueError("config.objective.mlm_visual_share > 0 needs the visual words: the "
                       "dataset names no detector classes or attributes")
    if self.moc_loss not in ("ce", "kl"):
      raise ValueError(f"config.objective.moc_loss={self.moc_loss!r}: want 'ce' or 'kl'")
    for name in ("mlm_rate", "region_rate", "itm_neg_prob", "mlm_mask_prob", "mlm_random_prob",
                 "region_zero_prob", "itm_random_share", "mlm_visual_share", "itm_foil_share"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"config.objective.{name}={getattr(self, name)}: want a value in [0, 1]")
    if self.mlm_mask_prob + self.mlm_random_prob > 1.0:
      raise ValueError("config.objective.mlm_mask_prob + mlm_random_prob exceed 1")
    lo, hi = self.random_token_range
    if not 0 <= lo < hi:
      raise ValueError(f"config.objective.random_token_range={self.random_token_range}: "
                       "want 0 <= low < high")


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


def gather_rows(x: jax.Array, positions: jax.Array) -> jax.Array:
  """x [B, L, ...], positions [B, P] -> [B, P, ...]."""
  idx = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def mlm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  acc = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return weighted_mean(ce, weights), weighted_mean(acc, weights)


def moc_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array,
             target_probs: jax.Array | None = None):
  """Cross-entropy against the top class, or KL(target || softmax(logits)) when given."""
  log_q = jax.nn.log_softmax(logits, axis=-1)
  if target_probs is None:
    per = -jnp.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]
  else:
    p = target_probs.astype(jnp.float32)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-9)
    per = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.maximum(p, 1e-30)) - log_q), 0.0), -1)
  acc = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return weighted_mean(per, weights), weighted_mean(acc, weights)


def mrfr_loss(prediction: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
  per = jnp.mean(jnp.square(prediction - target.astype(jnp.float32)), axis=-1)
  return weighted_mean(per, weights)


def rank_loss(positive: jax.Array, negatives: jax.Array, valid: jax.Array) -> jax.Array:
  """Each positive's score ranked above its own negatives': positive [B], negatives [B, K],
  valid [B, K]. Per pair with a valid negative, -log softmax of the positive among it and its
  valid negatives (ListNet's top-one loss); with K = 1 that is log(1 + exp(negative -
  positive)), RankNet's logistic loss of the difference. The mean over those pairs."""
  negatives = jnp.where(valid, negatives, -jnp.inf)
  per = jax.nn.logsumexp(jnp.concatenate([positive[:, None], negatives], 1), axis=1) - positive
  has = valid.any(axis=1)
  return weighted_mean(jnp.where(has, per, 0.0), has.astype(jnp.float32))


def itm_loss(logits: jax.Array, labels: jax.Array):
  loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
  acc = jnp.mean(((logits > 0).astype(jnp.float32) == labels).astype(jnp.float32))
  return loss, acc


def pretrain_loss(model: Any, batch: Mapping[str, jax.Array], key: jax.Array,
                  obj: PretrainObjective, *, train: bool = True,
                  step: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Total weighted loss and scalar metrics for one batch. `model` is an ImageBert. (`step` is
  not used: the masks come from `key`.)"""
  del step
  itm_key, text_key, region_key, dropout_key = jax.random.split(key, 4)
  b = batch["text_ids"].shape[0]
  clean = obj.itm_inputs == "clean"
  # The unmasked regions' input embeddings, once per image of the batch, for every pass that
  # takes them as they are (the contrastive image pass, clean matching).
  projected = model.project_regions(batch["region_feat"], batch["region_loc"]) if clean else None
  embedded = None
  if obj.itc_weight:
    embedded = contrastive.embeddings(
        model, batch, pad_id=obj.pad_id, cls_sep=(obj.cls_id, obj.sep_id),
        dropout_key=jax.random.fold_in(dropout_key, 1) if train else None, regions=projected)
  if obj.itm_negatives == "hard":
    logits = model.itc_scale() * (embedded[0] @ embedded[1].T)
    swap = masking.hard_itm_pairs(itm_key, logits, batch["image_key"], obj.itm_random_share,
                                  obj.itm_num_negatives)
  else:
    swap = masking.itm_pairs(itm_key, batch["image_key"], obj.itm_neg_prob)
  pair_fields = ("text_ids", "region_feat", "region_loc", "num_regions", "region_class")
  pairs = {k: batch[k][swap.text_src if k == "text_ids" else swap.region_src]
           for k in pair_fields}
  if obj.itm_foil_share:
    # A share of the negatives become their pair's foil: its own caption with two words swapped
    # (or a spatial word flipped).
    foil_key, share_key = jax.random.split(jax.random.fold_in(itm_key, 1))
    kinds = word_kinds(model.cfg.vocab_size, obj.object_token_ids, obj.attribute_token_ids)
    foils, has, flipped = masking.foils(
        foil_key, batch["text_ids"], kinds,
        obj.spatial_opposite_ids if obj.itm_foil_spatial else ())
    use = has & (jax.random.uniform(share_key, has.shape) < obj.itm_foil_share)
    foil_pairs, flip_pairs = use, use & flipped  # [B]: the pairs whose first negative is a foil
    blocks = 1 + obj.itm_num_negatives
    # The first negative block only.
    use = jnp.concatenate([jnp.zeros_like(use), use] + [jnp.zeros_like(use)] * (blocks - 2))
    own = jnp.tile(jnp.arange(b), blocks)
    pairs = {k: jnp.where(use.reshape((-1,) + (1,) * (v.ndim - 1)),
                          jnp.tile(foils, (blocks, 1)) if k == "text_ids" else batch[k][own], v)
             for k, v in pairs.items()}
    swap = swap._replace(region_src=jnp.where(use, own, swap.region_src),
                         labels=jnp.where(use, 0.0, swap.labels))
  drop = dropout_key if train else None

  # The masked pass: over the matching rows (masked alike whatever their label), or with clean
  # matching inputs over the batch's own pairs, all matched.
  masked_rows = {k: batch[k] for k in pair_fields} if clean else pairs
  matched = jnp.ones((b,), jnp.float32) if clean else swap.labels
  region_src = jnp.arange(b) if clean else swap.region_src
  text_h, region_h, tm, rm, region_mask = _masked_pass(model, masked_rows, text_key, region_key,
                                                       drop, obj)
  if clean:
    itm_text = pairs["text_ids"]
    itm_regions = (jnp.arange(pairs["region_feat"].shape[1])[None, :]
                   < pairs["num_regions"][:, None])
    itm_text_h, itm_region_h = model.encode(
        itm_text, itm_text != obj.pad_id, None, None, itm_regions,
        dropout_key=jax.random.fold_in(drop, 2) if train else None,
        regions=projected[swap.region_src])
    itm_logits = model.itm_logit(itm_text_h, itm_region_h, itm_regions, itm_text != obj.pad_id)
  else:
    itm_logits = model.itm_logit(text_h, region_h, region_mask,
                                 masked_rows["text_ids"] != obj.pad_id)
  l_itm, a_itm = itm_loss(itm_logits, swap.labels)

  # The masked objectives, on the rows that can be matched pairs (in 'hard' mode the first B).
  rows = slice(0, b) if (obj.itm_negatives == "hard" and not clean) else slice(None)
  weights = matched[rows, None]
  mlm_logits = model.mlm_logits(gather_rows(text_h[rows], tm.positions[rows]))
  if obj.vocab_size and mlm_logits.shape[-1] > obj.vocab_size:
    # A vocabulary padded past the tokenizer's (for tile-aligned matrices): never predict those.
    mlm_logits = jnp.where(jnp.arange(mlm_logits.shape[-1]) < obj.vocab_size, mlm_logits, -1e9)
  l_mlm, a_mlm = mlm_loss(mlm_logits, tm.labels[rows], tm.weights[rows] * weights)

  positions = rm.positions[rows]
  masked_h = gather_rows(region_h[rows], positions)
  region_class = masked_rows["region_class"]
  class_labels = jnp.take_along_axis(region_class[rows], positions, axis=1)
  probs = None
  if obj.moc_loss == "kl":
    probs = gather_rows(batch["region_probs"][region_src[rows]], positions)
  known = (class_labels >= 0).astype(jnp.float32)  # -1: the detector gave no class
  l_moc, a_moc = moc_loss(model.moc_logits(masked_h), jnp.maximum(class_labels, 0),
                          rm.weights[rows] * weights * known, probs)

  target_feat = gather_rows(masked_rows["region_feat"][rows], positions)
  l_mrfr = mrfr_loss(model.mrfr_prediction(masked_h), target_feat, rm.weights[rows] * weights)

  total = (obj.mlm_weight * l_mlm + obj.moc_weight * l_moc + obj.mrfr_weight * l_mrfr
           + obj.itm_weight * l_itm)
  l_rank = None
  if obj.itm_rank_weight:  # rows [0, b): the matched pairs; b + i, 2b + i, ...: pair i's negatives
    l_rank = rank_loss(itm_logits[:b], itm_logits[b:].reshape(-1, b).T,
                       (swap.labels[b:] == 0).reshape(-1, b).T)
    total = total + obj.itm_rank_weight * l_rank
  metrics = {
      "loss": total, "mlm_loss": l_mlm, "moc_loss": l_moc, "mrfr_loss": l_mrfr,
      "itm_loss": l_itm, "mlm_accuracy": a_mlm, "moc_accuracy": a_moc, "itm_accuracy": a_itm,
      "itm_positive_share": jnp.mean(swap.labels), "itm_score_std": jnp.std(itm_logits),
  }
  if l_rank is not None:
    metrics["itm_rank_loss"] = l_rank
  if obj.itm_foil_share:  # foils stand in the first negative block, rows b .. 2b
    def told_apart(pairs):
      return (jnp.sum(((itm_logits[b:2 * b] < 0) & pairs).astype(jnp.float32))
              / jnp.maximum(jnp.sum(pairs), 1))
    metrics["itm_foil_accuracy"] = told_apart(foil_pairs)
    metrics["itm_foil_share"] = jnp.sum(foil_pairs) / b
    if obj.itm_foil_spatial:  # the flips alone
      metrics["itm_flip_accuracy"] = told_apart(flip_pairs)
      metrics["itm_flip_share"] = jnp.sum(flip_pairs) / b
  if obj.itm_negatives == "hard":
    # The matching head on the drawn negatives alone: how often it tells them apart.
    negatives = swap.labels[b:] == 0
    metrics["itm_hard_negative_accuracy"] = (
        jnp.sum(((itm_logits[b:] < 0) & negatives).astype(jnp.float32))
        / jnp.maximum(jnp.sum(negatives), 1))
  if obj.itc_weight:
    l_itc, itc_metrics = contrastive.itc_loss(*embedded, batch["image_key"], model.itc_scale())
    total = total + obj.itc_weight * l_itc
    metrics.update(itc_metrics, loss=total)
  return total, metrics


def word_kinds(vocab_size: int, object_ids: tuple[int, ...],
               attribute_ids: tuple[int, ...]) -> jax.Array:
  """[V] int32: 1 for the object names' tokens, 2 for the attribute names', 0 for the others."""
  kinds = jnp.zeros((vocab_size,), jnp.int32)
  if object_ids:
    kinds = kinds.at[jnp.asarray(object_ids)].set(1)
  if attribute_ids:
    kinds = kinds.at[jnp.asarray(attribute_ids)].set(2)
  return kinds


def _masked_pass(model, rows: Mapping[str, jax.Array], text_key: jax.Array,
                 region_key: jax.Array, dropout_key: jax.Array | None, obj: PretrainObjective):
  """Masks the words and regions of `rows` and runs the encoder: (text hidden, region hidden,
  text masking, region masking, region mask)."""
  text_ids, region_feat = rows["text_ids"], rows["region_feat"]
  text_mask = text_ids != obj.pad_id
  maskable = text_mask & (text_ids != obj.cls_id) & (text_ids != obj.sep_id)
  first = None
  if obj.mlm_visual_share:
    share_key, text_key = jax.random.split(text_key)
    visual = jnp.isin(text_ids, jnp.asarray(obj.visual_token_ids, text_ids.dtype))
    chosen = jax.random.uniform(share_key, (text_ids.shape[0], 1)) < obj.mlm_visual_share
    first = visual & chosen
  text_slots = masking.max_predictions(text_ids.shape[1], obj.mlm_rate)
  tm = masking.mask_text(text_key, text_ids, maskable, rate=obj.mlm_rate, num_slots=text_slots,
                         mask_id=obj.mask_id, random_token_range=obj.random_token_range,
                         mask_prob=obj.mlm_mask_prob, random_prob=obj.mlm_random_prob,
                         first=first)
  num_r = region_feat.shape[1]
  region_mask = jnp.arange(num_r)[None, :] < rows["num_regions"][:, None]
  region_slots = masking.max_predictions(num_r, obj.region_rate)
  rm = masking.mask_regions(region_key, region_feat, region_mask, rate=obj.region_rate,
                            num_slots=region_slots, zero_prob=obj.region_zero_prob)
  text_h, region_h = model.encode(tm.input_ids, text_mask, rm.features, rows["region_loc"],
                                  region_mask, dropout_key=dropout_key)
  return text_h, region_h, tm, rm, region_mask
