"""The four pretraining objectives of ImageBERT, computed together on one batch.

Per batch of matched (caption, image) pairs:
  1. Image-text matching: a share of the pairs become negatives by swapping the caption or the
     image with another pair's (`masking.itm_pairs`); binary cross-entropy on the [CLS] score.
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
  moc_loss: str = "ce"  # 'ce' (detector's top class) or 'kl' (its class distribution)
  mlm_weight: float = 1.0
  moc_weight: float = 1.0
  mrfr_weight: float = 1.0
  itm_weight: float = 1.0
  itc_weight: float = 0.0  # the contrastive loss on the unmasked matched pairs (0: off)

  def validate(self) -> None:
    if self.moc_loss not in ("ce", "kl"):
      raise ValueError(f"config.objective.moc_loss={self.moc_loss!r}: want 'ce' or 'kl'")
    for name in ("mlm_rate", "region_rate", "itm_neg_prob", "mlm_mask_prob", "mlm_random_prob",
                 "region_zero_prob"):
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
  swap = masking.itm_pairs(itm_key, batch["image_key"], obj.itm_neg_prob)
  text_ids = batch["text_ids"][swap.text_src]
  region_feat = batch["region_feat"][swap.region_src]
  region_loc = batch["region_loc"][swap.region_src]
  num_regions = batch["num_regions"][swap.region_src]
  region_class = batch["region_class"][swap.region_src]

  text_mask = text_ids != obj.pad_id
  maskable = text_mask & (text_ids != obj.cls_id) & (text_ids != obj.sep_id)
  text_slots = masking.max_predictions(text_ids.shape[1], obj.mlm_rate)
  tm = masking.mask_text(text_key, text_ids, maskable, rate=obj.mlm_rate, num_slots=text_slots,
                         mask_id=obj.mask_id, random_token_range=obj.random_token_range,
                         mask_prob=obj.mlm_mask_prob, random_prob=obj.mlm_random_prob)
  num_r = region_feat.shape[1]
  region_mask = jnp.arange(num_r)[None, :] < num_regions[:, None]
  region_slots = masking.max_predictions(num_r, obj.region_rate)
  rm = masking.mask_regions(region_key, region_feat, region_mask, rate=obj.region_rate,
                            num_slots=region_slots, zero_prob=obj.region_zero_prob)

  text_h, region_h = model.encode(tm.input_ids, text_mask, rm.features, region_loc, region_mask,
                                  dropout_key=dropout_key if train else None)
  matched = swap.labels[:, None]

  itm_logits = model.itm_logit(text_h)
  l_itm, a_itm = itm_loss(itm_logits, swap.labels)

  mlm_logits = model.mlm_logits(gather_rows(text_h, tm.positions))
  if obj.vocab_size and mlm_logits.shape[-1] > obj.vocab_size:
    # A vocabulary padded past the tokenizer's (for tile-aligned matrices): never predict those.
    mlm_logits = jnp.where(jnp.arange(mlm_logits.shape[-1]) < obj.vocab_size, mlm_logits, -1e9)
  l_mlm, a_mlm = mlm_loss(mlm_logits, tm.labels, tm.weights * matched)

  masked_h = gather_rows(region_h, rm.positions)
  class_labels = jnp.take_along_axis(region_class, rm.positions, axis=1)
  probs = None
  if obj.moc_loss == "kl":
    probs = gather_rows(batch["region_probs"][swap.region_src], rm.positions)
  known = (class_labels >= 0).astype(jnp.float32)  # -1: the detector gave no class
  l_moc, a_moc = moc_loss(model.moc_logits(masked_h), jnp.maximum(class_labels, 0),
                          rm.weights * matched * known, probs)

  target_feat = gather_rows(region_feat, rm.positions)
  l_mrfr = mrfr_loss(model.mrfr_prediction(masked_h), target_feat, rm.weights * matched)

  total = (obj.mlm_weight * l_mlm + obj.moc_weight * l_moc + obj.mrfr_weight * l_mrfr
           + obj.itm_weight * l_itm)
  metrics = {
      "loss": total, "mlm_loss": l_mlm, "moc_loss": l_moc, "mrfr_loss": l_mrfr,
      "itm_loss": l_itm, "mlm_accuracy": a_mlm, "moc_accuracy": a_moc, "itm_accuracy": a_itm,
      "itm_positive_share": jnp.mean(swap.labels), "itm_score_std": jnp.std(itm_logits),
  }
  if obj.itc_weight:
    l_itc, itc_metrics = contrastive.batch_itc(
        model, batch, pad_id=obj.pad_id, cls_sep=(obj.cls_id, obj.sep_id),
        dropout_key=jax.random.fold_in(dropout_key, 1) if train else None)
    total = total + obj.itc_weight * l_itc
    metrics.update(itc_metrics, loss=total)
  return total, metrics
