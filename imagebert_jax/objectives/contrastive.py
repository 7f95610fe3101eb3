"""The image-text contrastive loss (ITC): in-batch softmax over single-modality embeddings.

Text and image are each encoded alone by the same single-stream encoder ([CLS] projected and
normalised: `ImageBert.text_embedding` / `image_embedding`). For a batch of matched pairs, the
logits are scale x text . image for every (caption, image) of the batch; each caption's own image
is its class among the batch's images, and each image's caption among the captions (the loss
is the mean of both directions). Other captions of the same image are not negatives: they are
left out of the softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def itc_loss(text_emb: jax.Array, image_emb: jax.Array, image_key: jax.Array,
             scale: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) for L2-normalised [B, E] text and image embeddings of matched pairs."""
  b = text_emb.shape[0]
  logits = scale * jnp.einsum("te,ie->ti", text_emb.astype(jnp.float32),
                              image_emb.astype(jnp.float32))
  spread = jnp.std(logits)
  same = image_key[:, None] == image_key[None, :]
  logits = jnp.where(same & ~jnp.eye(b, dtype=bool), -1e9, logits)
  labels = jnp.arange(b)
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  metrics = {
      "itc_loss": 0.5 * (t2i + i2t),
      "itc_t2i_accuracy": jnp.mean((jnp.argmax(logits, 1) == labels).astype(jnp.float32)),
      "itc_i2t_accuracy": jnp.mean((jnp.argmax(logits, 0) == labels).astype(jnp.float32)),
      "itc_scale": scale, "itc_score_std": spread,
  }
  return metrics["itc_loss"], metrics


def embeddings(model, batch, *, pad_id: int, cls_sep: tuple[int, int],
               dropout_key: jax.Array | None,
               regions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(text, image) embeddings of a batch's matched pairs (`regions`: the batch's
  `project_regions`, when the caller has them already)."""
  text_key = image_key = None
  if dropout_key is not None:
    text_key, image_key = jax.random.split(dropout_key)
  text = batch["text_ids"]
  num_r = batch["region_feat"].shape[1]
  region_mask = jnp.arange(num_r)[None, :] < batch["num_regions"][:, None]
  t = model.text_embedding(text, text != pad_id, dropout_key=text_key)
  i = model.image_embedding(batch["region_feat"], batch["region_loc"], region_mask, cls_sep,
                            dropout_key=image_key, regions=regions)
  return t, i

