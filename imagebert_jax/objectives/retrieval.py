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

from imagebert_jax.objectives import contrastive, masking


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
  # for the whole batch: mining costs nothing more than the contrastive loss); or
  # 'itc_sample': the K negatives are drawn from all the batch's other images (captions) with
  # the probabilities of the softmax of the contrastive logits, without replacement (ALBEF's
  # sampling; M is not used): the hardest are the likeliest, a near-duplicate of the right
  # answer (a false negative) is not drawn every time.
  mine_with: str = "cross_encoder"
  # Foils (masking.swap_foils): with foil_share > 0, that share of the pairs whose caption has two
  # of the detector's object (or attribute) words gets one more caption negative for its image:
  # its own caption with them swapped. The token ids come from the dataset.
  foil_share: float = 0.0
  object_token_ids: tuple[int, ...] = ()
  attribute_token_ids: tuple[int, ...] = ()
  # With foil_spatial, a caption with a spatial word ("left", "above", ...) gets as its foil that
  # word turned into its opposite (masking.flip_spatial); the token ids come from the dataset.
  spatial_opposite_ids: tuple[tuple[int, int], ...] = ()
  foil_spatial: bool = False
  cls_id: int = 101
  sep_id: int = 102

  def validate(self) -> None:
    if not 1 <= self.num_hard <= self.num_candidates:
      raise ValueError(f"config.objective: want 1 <= num_hard ({self.num_hard}) <= "
                       f"num_candidates ({self.num_candidates})")
    if min(self.bce_weight, self.softmax_weight, self.triplet_weight, self.itc_weight) < 0:
      raise ValueError("config.objective: loss weights must not be negative")
    if not 0.0 <= self.foil_share <= 1.0:
      raise ValueError(f"config.objective.foil_share={self.foil_share}: want a share in [0, 1]")
    if self.foil_share and not (self.object_token_ids or self.attribute_token_ids):
      raise ValueError("config.objective.foil_share > 0 needs the detector's words: the dataset "
                       "names no detector classes or attributes")
    if self.foil_spatial and not (self.foil_share and self.spatial_opposite_ids):
      raise ValueError("config.objective.foil_spatial needs foil_share > 0 and the spatial words "
                       "(left/right, above/below) in the vocabulary")
    if self.mine_with not in ("cross_encoder", "itc", "itc_sample"):
      raise ValueError(f"config.objective.mine_with={self.mine_with!r}: want cross_encoder, itc "
                       "or itc_sample")


def _score(model, text_ids, feat, loc, num_regions, pad_id, dropout_key, regions=None):
  """Matching logits of (text, image) rows; `regions` [rows, R, H]: the images'
  `project_regions`, computed once per image (then `feat` and `loc` are not read)."""
  width = (feat if regions is None else regions).shape[1]
  region_mask = jnp.arange(width)[None, :] < num_regions[:, None]
  text_mask = text_ids != pad_id
  text_h, region_h = model.encode(text_ids, text_mask, feat, loc, region_mask,
                                  dropout_key=dropout_key, regions=regions)
  return model.itm_logit(text_h, region_h, region_mask, text_mask)


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


def draw_negatives(key: jax.Array, logits: jax.Array, image_key: jax.Array, k: int):
  """K negatives per entry drawn without replacement with the probabilities of the softmax of
  `logits` [caption, image] over the entries of other images (the Gumbel top-k trick):
  ((captions for each image [B, K], valid), (images for each caption [B, K], valid)). Slots past
  the number of other images in the batch are invalid."""
  b = logits.shape[0]
  other = image_key[:, None] != image_key[None, :]
  k_cap, k_img = jax.random.split(key)
  out = []
  for sub, scores in ((k_cap, logits.T), (k_img, logits)):  # rows: the query
    noisy = jnp.where(other, scores + jax.random.gumbel(sub, (b, b)), -jnp.inf)
    top, idx = jax.lax.top_k(noisy, min(k, b))
    valid = jnp.isfinite(top)
    if k > b:
      idx, valid = jnp.pad(idx, ((0, 0), (0, k - b))), jnp.pad(valid, ((0, 0), (0, k - b)))
    out.append((idx.astype(jnp.int32), valid))
  return tuple(out)


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
  # The regions' input embeddings once per image of the batch, for every pass and pair.
  projected = model.project_regions(feat, loc)
  embedded = None
  if obj.itc_weight or obj.mine_with in ("itc", "itc_sample"):
    embedded = contrastive.embeddings(
        model, batch, pad_id=obj.pad_id, cls_sep=(obj.cls_id, obj.sep_id),
        dropout_key=jax.random.fold_in(dropout_key, 1) if train else None, regions=projected)

  if obj.mine_with == "itc_sample":
    logits = jax.lax.stop_gradient(model.itc_scale() * (embedded[0] @ embedded[1].T))
    sampled = draw_negatives(cand_key, logits, ikey, k)
    if step is not None and obj.hard_from_step > 0:
      uniform = draw_negatives(cand_key, jnp.zeros_like(logits), ikey, k)
      sampled = jax.tree.map(lambda a, b_: jnp.where(step >= obj.hard_from_step, a, b_), sampled,
                             uniform)
    (cap_cand, cap_valid), (img_cand, img_valid) = sampled
  elif m > k:
    def mine(_):  # score all candidates without gradients, keep the K highest
      frozen = jax.lax.stop_gradient
      if obj.mine_with == "itc":
        sim = frozen(embedded[0] @ embedded[1].T)  # [caption, image] of the batch
        s_cap = jnp.take_along_axis(sim.T, cap_cand, 1)
        s_img = jnp.take_along_axis(sim, img_cand, 1)
      else:
        rows = jnp.repeat(jnp.arange(b), m)
        c, ci = cap_cand.reshape(-1), img_cand.reshape(-1)
        s_cap = frozen(_score(model, text[c], None, None, nreg[rows], obj.pad_id, None,
                              projected[rows])).reshape(b, m)
        s_img = frozen(_score(model, text[rows], None, None, nreg[ci], obj.pad_id, None,
                              projected[ci])).reshape(b, m)
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

  # One forward over positives, caption negatives and image negatives (and foils).
  rows = jnp.repeat(jnp.arange(b), k)
  texts = [text, text[cap_cand.reshape(-1)], text[rows]]
  image_idx = [jnp.arange(b), rows, img_cand.reshape(-1)]
  if obj.foil_share:
    from imagebert_jax.objectives.pretraining import word_kinds
    foil_key, share_key = jax.random.split(jax.random.fold_in(cand_key, 7))
    foils, has, flipped = masking.foils(
        foil_key, text, word_kinds(model.cfg.vocab_size, obj.object_token_ids,
                                   obj.attribute_token_ids),
        obj.spatial_opposite_ids if obj.foil_spatial else ())
    has = has & (jax.random.uniform(share_key, has.shape) < obj.foil_share)
    texts.append(foils)
    image_idx.append(jnp.arange(b))
  image_idx = jnp.concatenate(image_idx)
  s = _score(model, jnp.concatenate(texts), None, None, nreg[image_idx], obj.pad_id,
             dropout_key if train else None, projected[image_idx])
  pos, s_cap, s_img = s[:b], s[b:b + b * k].reshape(b, k), s[b + b * k:b + 2 * b * k].reshape(b, k)
  if obj.foil_share:  # the foil: one more caption negative for its image
    s_cap = jnp.concatenate([s_cap, s[b + 2 * b * k:, None]], axis=1)
    cap_valid = jnp.concatenate([cap_valid, has[:, None]], axis=1)
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
  if obj.foil_share:  # the share of the pairs ranked above their foil
    def told_apart(pairs):
      return (jnp.sum((pos > s_cap[:, -1]) & pairs)
              / jnp.maximum(jnp.sum(pairs), 1)).astype(jnp.float32)
    metrics["foil_accuracy"] = told_apart(has)
    if obj.foil_spatial:  # the spatial flips alone
      metrics["flip_accuracy"] = told_apart(has & flipped)
  if obj.itc_weight:
    l_itc, itc_metrics = contrastive.itc_loss(*embedded, ikey, model.itc_scale())
    total = total + obj.itc_weight * l_itc
    metrics.update(itc_metrics, loss=total)
  return total, metrics
