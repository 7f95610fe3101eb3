"""The scoring layer every ranking goes through: its masks by hand, and its three calls against
the model's own methods with masks built here, example by example (a row scored alone gives what
it gives in a batch of others)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helpers import CLS, PAD, SEP, TINY, random_batch
from imagebert_jax import parallel
from imagebert_jax.config import defaults as config_defaults
from imagebert_jax.retrieval import scoring
from imagebert_jax.training import state as state_lib

RULES = parallel.rules_from_config(config_defaults.DEFAULT_RULES)


def test_region_mask_by_hand():
  np.testing.assert_array_equal(scoring.region_mask(jnp.asarray([0, 2, 4]), 4),
                                [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])


def test_the_three_calls_against_the_model_row_by_row():
  rng = np.random.default_rng(5)
  b = random_batch(rng, 6, TINY)
  mesh = parallel.make_mesh((-1, 1, 1))
  graphdef, params = state_lib.create_params(TINY, mesh, RULES, seed=0)
  model = nnx.merge(graphdef, jax.device_get(params))
  ids, feat, loc, n = (jnp.asarray(b[k]) for k in ("text_ids", "region_feat", "region_loc",
                                                   "num_regions"))
  logits = scoring.match_logits(model, ids, feat, loc, n, PAD)
  texts = scoring.text_embeddings(model, ids, PAD)
  images = scoring.image_embeddings(model, feat, loc, n, (CLS, SEP))
  for i in range(6):
    row = slice(i, i + 1)
    mask = jnp.asarray(np.arange(TINY.max_regions)[None] < b["num_regions"][i])
    want = model(ids[row], ids[row] != PAD, feat[row], loc[row], mask)
    np.testing.assert_allclose(logits[i], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(texts[i], model.text_embedding(ids[row], ids[row] != PAD)[0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        images[i], model.image_embedding(feat[row], loc[row], mask, (CLS, SEP))[0],
        rtol=1e-5, atol=1e-5)
  # Projected regions in place of the features: the same logits.
  projected = model.project_regions(feat, loc)
  np.testing.assert_allclose(scoring.match_logits(model, ids, None, None, n, PAD,
                                                  regions=projected), logits, rtol=1e-5,
                             atol=1e-5)
