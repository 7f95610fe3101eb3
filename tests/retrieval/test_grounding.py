"""Word grounding: the masked words found and each caption's other image by hand, the own /
other bookkeeping on a hand-worked world, and the batched predictor against the model run row
by row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import CLS, MASK, PAD, SEP, TINY, random_batch
from imagebert_jax import parallel
from imagebert_jax.config import defaults as config_defaults
from imagebert_jax.data.splits import Split
from imagebert_jax.retrieval import grounding
from imagebert_jax.training import state as state_lib

RULES = parallel.rules_from_config(config_defaults.DEFAULT_RULES)


def test_items_and_other_images_by_hand():
  text = np.array([[CLS, 10, 11, 20, SEP, PAD],
                   [CLS, 20, 12, SEP, PAD, PAD]], np.int32)
  found = grounding.items(text, (20, 11))
  np.testing.assert_array_equal(found.rows, [0, 0, 1])
  np.testing.assert_array_equal(found.positions, [2, 3, 1])
  np.testing.assert_array_equal(found.labels, [1, 0, 0])  # 11 is candidate 1, 20 candidate 0
  # shift 1 + (c mod 2): captions 0..3 of images 0, 0, 1, 2 get 1, 2, 2, 1.
  np.testing.assert_array_equal(grounding.other_images(np.array([0, 0, 1, 2]), 3), [1, 2, 2, 1])
  with pytest.raises(ValueError, match="one image"):
    grounding.other_images(np.array([0, 0]), 1)


def test_own_and_other_on_a_hand_worked_world():
  """Image i shows word SHOWN[i]; a reader of the image always names it. Captions 0, 1, 2 (of
  images 0, 1, 2) say 20, 11, 20; their other images are 1, 0, 0 (by hand above), which show
  11, 20, 20: right for caption 2 only."""
  shown = {0: 20, 1: 11, 2: 20}
  text = np.array([[CLS, 20, SEP], [CLS, 11, SEP], [CLS, 20, SEP]], np.int32)
  seen = []

  def reader(masked, image, position, candidates):
    seen.append(masked.copy())
    return np.array([list(candidates).index(shown[int(i)]) for i in image])

  out = grounding.evaluate(text, np.array([0, 1, 2]), 3, {"object": (20, 11), "none": ()},
                           reader, mask_id=MASK)
  assert set(out) == {"object"}
  np.testing.assert_allclose(out["object"]["own"], 100.0)
  np.testing.assert_allclose(out["object"]["other"], 100.0 / 3)
  assert out["object"]["words"] == 3 and out["object"]["chance"] == 50.0
  np.testing.assert_array_equal(seen[0][:, 1], [MASK] * 3)  # the word is masked, alone
  assert grounding.flat_metrics(out)["grounding/object/other"] == pytest.approx(100.0 / 3)


def test_batched_predictor_against_the_model_row_by_row():
  rng = np.random.default_rng(3)
  b = random_batch(rng, 5, TINY)
  mesh = parallel.make_mesh((-1, 1, 1))
  graphdef, params = state_lib.create_params(TINY, mesh, RULES, seed=0)
  split = Split(region_feat=b["region_feat"].astype(np.float16), region_loc=b["region_loc"],
                num_regions=b["num_regions"], text_ids=b["text_ids"],
                caption_image=np.arange(5), image_ids=[str(i) for i in range(5)],
                source_order=np.arange(5))
  predict = grounding.split_predictor(params, graphdef, mesh, RULES, split, pad_id=PAD, batch=2)
  text = b["text_ids"].copy()
  position = np.ones(7, np.int32)
  text = np.concatenate([text, text[:2]])
  text[:, 1] = MASK
  image = np.array([4, 3, 2, 1, 0, 0, 1], np.int32)
  candidates = np.array([7, 9, 30, 41], np.int32)
  got = predict(text, image, position, candidates)
  model = nnx.merge(graphdef, jax.device_get(params))
  for i in range(7):
    j = image[i]
    mask = jnp.asarray(np.arange(TINY.max_regions)[None] < b["num_regions"][j])
    text_h, _ = model.encode(jnp.asarray(text[i:i + 1]), jnp.asarray(text[i:i + 1] != PAD),
                             jnp.asarray(split.region_feat[j:j + 1]),
                             jnp.asarray(b["region_loc"][j:j + 1]), mask)
    logits = np.asarray(model.mlm_logits(text_h[:, 1]))[0, candidates]
    assert got[i] == int(np.argmax(logits)), i
