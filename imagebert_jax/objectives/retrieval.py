"""Retrieval fine-tuning of the cross-encoder: the paper's three losses with hard negatives.

For each matched pair i of the batch (image v_i, caption t_i), negatives come from the batch in
both directions: other captions for the image (v_i, t_j) and other images for the caption
(v_j, t_i), never ones of the same image. Online hard-negative mining scores `num_candidates`
random candidates per direction without gradients (no dropout) and keeps the `num_hard` that score
highest; with num_candidates == num_hard the negatives are random. Then, with s = the matching
logit, per direction and pair:
  binary   cross-entropy: the positive labelled 1, each kept negative 0;
  softmax  multi-class cross-entropy over [s_pos, s_neg_1 .. s_neg_K] (P = K + 1 classes);
  triplet  max(0, margin - s_pos + max_k s_neg_k), against the hardest negative.
The loss is the weighted sum, averaged over pairs and both directions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from imagebert_jax.objectives import contrastive


@dataclasses.dataclass(frozen=True)
class RetrievalObjective:
  pad_id: int = 0
  bce_weight: float = 1.0
  softmax_weight: float = 1.0
  triplet_weight: float = 1.0
  margin: float = 0.2
  num_candidates: int = 16   # M: candidates scored per pair and direction
  num_hard: int = 3          # K: negatives trained on per pair and direction (P = K + 1)
  itc_weight: float = 0.0    # the contrastive loss on the batch's pairs (0: off)
  hard_from_step: int = 0    # random negatives (the first K candidates) before this step
  # How candidates are ranked for mining: 'cross_encoder' (M forward passes per pair and
  # direction, as the paper) or 'itc' (the contrastive similarities of the batch, computed once
  # for the whole batch: mining costs nothing more than the contrastive loss).
  mine_with: str = "cross_encoder"
  cls_id: int = 101
  sep_id: int = 102

  def validate(self) -> None:
    if not 1 <= self.num_hard <= self.num_candidates:
      raise ValueError(f"config.objective: want 1 <= num_hard ({self.num_hard}) <= "
                       f"num_candidates ({self.num_candidates})")
    if min(self.bce_weight, self.softmax_weight, self.triplet_weight, self.itc_weight) < 0:
      raise ValueError("config.objective: loss weights must not be negative")
    if self.mine_with not in ("cross_encoder", "itc"):
      raise ValueError(f"config.objective.mine_with={self.mine_with!r}: want cross_encoder or itc")


def _score(model, text_ids, feat, loc, num_regions, pad_id, dropout_key):
  region_mask = jnp.arange(feat.shape[1])[None, :] < num_regions[:, None]
  return model(text_ids, text_ids != pad_id, feat, loc, region_mask, dropout_key=dropout_key)


def candidates(key: jax.Array, image_key: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
  """`num` random other batch entries per entry whose image differs: (index [B, M], valid [B, M]).

  When fewer than `num` exist, the remaining slots are marked invalid.
  """
  b = image_key.shape[0]
  allowed = image_key[:, None] != image_key[None, :]
  noise = jax.random.uniform(key, (b, b))
  score = jnp.where(allowed, noise, -1.0)
  top, idx = jax.lax.top_k(score, min(num, b))
  valid = top >= 0
  if num > b:
    pad = num - b
    idx = jnp.pad(idx, ((0, 0), (0, pad)))
    valid = jnp.pad(valid, ((0, 0), (0, pad)))
  return idx, valid


def group_losses(pos: jax.Array, neg: jax.Array, valid: jax.Array,
                 obj: RetrievalObjective) -> dict[str, jax.Array]:
  """Per-direction losses. pos [B], neg [B, K], valid [B, K] (invalid negatives are ignored)."""
  big = jnp.float32(1e9)
  neg_m = jnp.where(valid, neg, -big)
  # Binary cross-entropy, averaged over all scored pairs (positives and valid negatives).
  bce_pos = optax.sigmoid_binary_cross_entropy(pos, jnp.ones_like(pos))
  bce_neg = optax.sigmoid_binary_cross_entropy(neg, jnp.zeros_like(neg)) * valid
  bce = (bce_pos.sum() + bce_neg.sum()) / (pos.shape[0] + valid.sum())
  # Softmax over [positive, negatives].
  logits = jnp.concatenate([pos[:, None], neg_m], axis=1)
  softmax = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.zeros(pos.shape[0], jnp.int32)))
  # Triplet against the hardest valid negative.
  hardest = jnp.max(neg_m, axis=1)
  has = valid.any(axis=1)
  triplet = jnp.sum(jnp.where(has, jax.nn.relu(obj.margin - pos + hardest), 0.0)) / jnp.maximum(
      has.sum(), 1)
  acc = jnp.mean((pos[:, None] > neg_m).all(axis=1).astype(jnp.float32))
  return {"bce": bce, "softmax": softmax, "triplet": triplet, "rank1_accuracy": acc}


def retrieval_loss(model: Any, batch: Mapping[str, jax.Array], key: jax.Array,
                   obj: RetrievalObjective, *, train: bool = True,
                   step: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """The weighted fine-tuning loss over a batch of matched pairs, and metrics.

  Negatives are mined (the K highest-scoring of M candidates) from `obj.hard_from_step` on; before
  it (and when M == K) they are K random candidates. Without a step (evaluation) they are mined.
  """
  text, feat = batch["text_ids"], batch["region_feat"]
  loc, nreg, ikey = batch["region_loc"], batch["num_regions"], batch["image_key"]
  b, m, k = text.shape[0], obj.num_candidates, obj.num_hard
  cand_key, cand_key2, dropout_key = jax.random.split(key, 3)
  cap_cand, cap_valid = candidates(cand_key, ikey, m)    # other captions for image i
  img_cand, img_valid = candidates(cand_key2, ikey, m)   # other images for caption i
  embedded = None
  if obj.itc_weight or obj.mine_with == "itc":
    embedded = contrastive.embeddings(
        model, batch, pad_id=obj.pad_id, cls_sep=(obj.cls_id, obj.sep_id),
        dropout_key=jax.random.fold_in(dropout_key, 1) if train else None)

  if m > k:
    def mine(_):  # score all candidates without gradients, keep the K highest
      frozen = jax.lax.stop_gradient
      if obj.mine_with == "itc":
        sim = frozen(embedded[0] @ embedded[1].T)  # [caption, image] of the batch
        s_cap = jnp.take_along_axis(sim.T, cap_cand, 1)
        s_img = jnp.take_along_axis(sim, img_cand, 1)
      else:
        rows = jnp.repeat(jnp.arange(b), m)
        c, ci = cap_cand.reshape(-1), img_cand.reshape(-1)
        s_cap = frozen(_score(model, text[c], feat[rows], loc[rows], nreg[rows], obj.pad_id,
                              None)).reshape(b, m)
        s_img = frozen(_score(model, text[rows], feat[ci], loc[ci], nreg[ci], obj.pad_id,
                              None)).reshape(b, m)
      s_cap = jnp.where(cap_valid, s_cap.reshape(b, m), -jnp.inf)
      s_img = jnp.where(img_valid, s_img.reshape(b, m), -jnp.inf)
      return jax.lax.top_k(s_cap, k)[1], jax.lax.top_k(s_img, k)[1]

    def at_random(_):  # candidates come in random order, valid ones first
      first = jnp.broadcast_to(jnp.arange(k), (b, k))
      return first, first

    if step is None or obj.hard_from_step <= 0:
      pick_c, pick_i = mine(None)
    else:
      pick_c, pick_i = jax.lax.cond(step >= obj.hard_from_step, mine, at_random, None)
    cap_cand = jnp.take_along_axis(cap_cand, pick_c, 1)
    cap_valid = jnp.take_along_axis(cap_valid, pick_c, 1)
    img_cand = jnp.take_along_axis(img_cand, pick_i, 1)
    img_valid = jnp.take_along_axis(img_valid, pick_i, 1)

  # One forward over positives, caption negatives and image negatives.
  rows = jnp.repeat(jnp.arange(b), k)
  text_idx = jnp.concatenate([jnp.arange(b), cap_cand.reshape(-1), rows])
  image_idx = jnp.concatenate([jnp.arange(b), rows, img_cand.reshape(-1)])
  s = _score(model, text[text_idx], feat[image_idx], loc[image_idx], nreg[image_idx], obj.pad_id,
             dropout_key if train else None)
  pos, s_cap, s_img = s[:b], s[b:b + b * k].reshape(b, k), s[b + b * k:].reshape(b, k)
  by_caption = group_losses(pos, s_cap, cap_valid, obj)   # image -> other captions
  by_image = group_losses(pos, s_img, img_valid, obj)     # caption -> other images
  terms = {name: 0.5 * (by_caption[name] + by_image[name])
           for name in ("bce", "softmax", "triplet")}
  total = (obj.bce_weight * terms["bce"] + obj.softmax_weight * terms["softmax"]
           + obj.triplet_weight * terms["triplet"])
  metrics = {"loss": total, "bce_loss": terms["bce"], "softmax_loss": terms["softmax"],
             "triplet_loss": terms["triplet"],
             "i2t_batch_accuracy": by_caption["rank1_accuracy"],
             "t2i_batch_accuracy": by_image["rank1_accuracy"],
             "positive_score": jnp.mean(pos), "score_std": jnp.std(s)}
  if obj.itc_weight:
    l_itc, itc_metrics = contrastive.itc_loss(*embedded, ikey, model.itc_scale())
    total = total + obj.itc_weight * l_itc
    metrics.update(itc_metrics, loss=total)
  return total, metrics
