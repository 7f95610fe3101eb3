"""The one place retrieval calls the model: contrastive embeddings of texts and of images, and
the cross-encoder's matching logit of (text, image) pairs, on rows already gathered.

Everything that ranks goes through these three functions inside its own jitted step, which only
decides which rows meet on the devices and how they are sharded: fine-tuning's validation and the
all-pairs evaluation (retrieval.evaluate's tile scorer), the two-stage evaluation and the binding
tests (retrieval.two_stage's embedders and pair scorer), and the Python API and search
(retrieval.inference.TrainedModel). So a score is the same function of a pair wherever it is
computed. The inputs' other half, the regions' box locations, is model.inputs.region_locations,
shared with the input pipeline; recall is retrieval.evaluate.recall.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def region_mask(num_regions: jax.Array, width: int) -> jax.Array:
  """[B, width] bool: each row's first `num_regions` regions."""
  return jnp.arange(width)[None, :] < num_regions[:, None]


def text_embeddings(model, ids: jax.Array, pad_id: int) -> jax.Array:
  """[B, E] float32, L2-normalised: the text side of the contrastive embeddings."""
  return model.text_embedding(ids, ids != pad_id)


def image_embeddings(model, feat: jax.Array | None, loc: jax.Array | None,
                     num_regions: jax.Array, cls_sep: tuple[int, int], *,
                     regions: jax.Array | None = None) -> jax.Array:
  """[B, E] float32, L2-normalised: the image side (`regions`: the images' projected regions,
  in place of `feat` and `loc`)."""
  width = (feat if regions is None else regions).shape[1]
  return model.image_embedding(feat, loc, region_mask(num_regions, width), cls_sep,
                               regions=regions)


def match_logits(model, ids: jax.Array, feat: jax.Array | None, loc: jax.Array | None,
                 num_regions: jax.Array, pad_id: int, *,
                 regions: jax.Array | None = None) -> jax.Array:
  """[B] float32: the cross-encoder's matching logit of each (text, image) row (`regions`: the
  images' projected regions, in place of `feat` and `loc`)."""
  width = (feat if regions is None else regions).shape[1]
  mask = region_mask(num_regions, width)
  text_mask = ids != pad_id
  text_h, region_h = model.encode(ids, text_mask, feat, loc, mask, regions=regions)
  return model.itm_logit(text_h, region_h, mask, text_mask)
