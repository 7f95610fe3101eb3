"""Self-describing runs (config.json beside the checkpoints) and the Python API
(imagebert_jax.retrieval.inference), on the demo's smoke run: loading from any folder of a run, one-line
errors, embeddings and scores against the model run example by example and against the
all-pairs evaluation, and two-stage ranking against NumPy."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagebert_jax.training import checkpoint as ckpt_lib
from imagebert_jax.data import splits
from imagebert_jax.config import runconfig
from imagebert_jax.data.tokenizer import special_ids
from imagebert_jax.retrieval.inference import RunConfigError, TrainedModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def demo(demo_smoke_run):
  return demo_smoke_run[1]


@pytest.fixture(scope="module")
def model(demo):
  return TrainedModel.load(demo, batch_size=16)


@pytest.fixture(scope="module")
def split(demo, model):
  ids = model.ids
  return splits.load_split(os.path.join(demo, "synthetic_data"), "test",
                           max_text_len=model.cfg.max_text_len,
                           max_regions=model.cfg.max_regions, pad_id=ids.pad_id,
                           sep_id=ids.sep_id)


@pytest.fixture(scope="module")
def records(demo, split):
  from imagebert_jax.data.pipeline import split_records
  recs = list(split_records(os.path.join(demo, "synthetic_data"), "test"))
  assert [r.image_id for r in recs] == split.image_ids
  return recs


def _newest_step(stage_dir):
  return max(int(p) for p in os.listdir(os.path.join(stage_dir, "checkpoints")) if p.isdigit())


def _reference_model(model):
  return nnx.merge(model.graphdef, jax.device_get(model.params))


# ---- Self-describing runs --------------------------------------------------------------------
def test_run_and_every_stage_write_their_config(demo_smoke_run):
  config, workdir, _ = demo_smoke_run
  with open(os.path.join(workdir, "config.json")) as f:
    run = json.load(f)
  assert run == json.loads(json.dumps(config.to_dict()))
  data_dir = os.path.join(workdir, "synthetic_data")
  with open(os.path.join(data_dir, "vocab.txt"), "rb") as f:
    vocab = f.read()
  with open(os.path.join(data_dir, "imagebert_dataset.json")) as f:
    options = json.load(f)["options"]
  for name in ("pretrain", "finetune", "zero_shot", "finetuned"):
    stage = runconfig.read_stage_config(os.path.join(workdir, name))
    assert stage["stage"] == name and stage["kind"] == config.stages[name].kind
    assert stage["run_config"] == run
    # The vocabulary size the config left at 0 is filled in; the vocabulary travels along.
    assert config.model.vocab_size == 0
    assert stage["model"]["vocab_size"] == len(vocab.decode().splitlines())
    assert stage["model"]["hidden_size"] == config.model.hidden_size
    with open(os.path.join(workdir, name, "vocab.txt"), "rb") as f:
      assert f.read() == vocab
    assert stage["data_options"] == options


def _best_step(stage_dir):
  folder = os.path.join(stage_dir, ckpt_lib.BEST_DIR)
  (step,) = [int(p) for p in os.listdir(folder) if p.isdigit()]
  return step


def test_a_stage_folder_alone_rebuilds_its_model(demo, model, tmp_path):
  moved = tmp_path / "elsewhere" / "finetune"
  shutil.copytree(os.path.join(demo, "finetune"), moved)
  # The run folder gives its last training stage, and of a fine-tuning stage the checkpoint of
  # the best validation (what its evaluation scores); `select='last'` the newest.
  best = ckpt_lib.flatten_paths(jax.device_get(model.params))
  step, best_step = _newest_step(moved), _best_step(moved)
  assert model.source.endswith(os.path.join("finetune", ckpt_lib.BEST_DIR, str(best_step)))
  newest = ckpt_lib.flatten_paths(jax.device_get(
      TrainedModel.load(str(moved), select="last").params))
  for path, kw, want in (
      (moved, {}, best), (moved, {"select": "last"}, newest),
      (moved / ckpt_lib.BEST_DIR / str(best_step), {}, best), (moved / "checkpoints", {}, newest),
      (moved / "checkpoints" / str(step), {}, newest),
      (moved / "checkpoints" / str(step) / "state", {}, newest)):
    loaded = TrainedModel.load(str(path), **kw)
    assert loaded.cfg == model.cfg
    got = ckpt_lib.flatten_paths(jax.device_get(loaded.params))
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{path} {kw}")
  pretrain = TrainedModel.load(demo, stage="pretrain")
  assert pretrain.source.endswith(os.path.join(
      "pretrain", "checkpoints", str(_newest_step(os.path.join(demo, "pretrain")))))
  assert pretrain.config_digest == model.config_digest
  assert pretrain.weights_digest != model.weights_digest
  # The same parameters as the training loop's own loader restores.
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding),
                          model.params)
  restored, missing, unexpected = ckpt_lib.load_params(os.path.join(demo, "finetune",
                                                                    "checkpoints"), abstract)
  assert not missing and not unexpected
  for key, value in restored.items():
    np.testing.assert_array_equal(np.asarray(value), newest[key])


def test_rerunning_a_finished_run_describes_its_stages(demo_smoke_run, tmp_path):
  """A run finished before stages described themselves gets their config.json on a rerun."""
  config, workdir, _ = demo_smoke_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  for name in ("pretrain", "finetune", "finetuned"):
    os.remove(copy / name / "config.json")
  with pytest.raises(RunConfigError, match="rerun the run's command on its work directory"):
    TrainedModel.load(str(copy))
  from imagebert_jax.training import train
  train.train_and_evaluate(config, str(copy))  # every stage is finished: nothing runs
  for name in ("pretrain", "finetune", "finetuned"):
    assert (json.loads((copy / name / "config.json").read_text())
            == json.loads(open(os.path.join(workdir, name, "config.json")).read()))
  assert TrainedModel.load(str(copy)).source.endswith(
      os.path.join("finetune", ckpt_lib.BEST_DIR, str(_best_step(copy / "finetune"))))


def test_missing_or_disagreeing_config_is_one_line(demo, tmp_path):
  stage = tmp_path / "finetune"
  shutil.copytree(os.path.join(demo, "finetune"), stage)
  config_path = stage / "config.json"
  original = json.loads(config_path.read_text())
  os.remove(config_path)
  with pytest.raises(RunConfigError) as e:
    TrainedModel.load(str(stage / "checkpoints"))
  assert "no config.json" in str(e.value) and "\n" not in str(e.value)

  def load_with(**model_changes):
    changed = json.loads(json.dumps(original))
    changed["model"].update(model_changes)
    config_path.write_text(json.dumps(changed))
    with pytest.raises(RunConfigError) as e:
      TrainedModel.load(str(stage))
    message = str(e.value)
    assert "\n" not in message and "does not match the model its config.json describes" in message
    return message

  hidden = original["model"]["hidden_size"]
  message = load_with(hidden_size=hidden // 2, num_heads=2)
  named = re.findall(r"([\w/]+): shape \(([\d, ]*)\) in the checkpoint, \(([\d, ]*)\) in "
                     r"config.json", message)
  assert named and all(a != b for _, a, b in named)
  assert re.search(r"\(and \d+ more\)$", message)
  layers = original["model"]["num_layers"]
  message = load_with(num_layers=layers - 1)
  assert f"not in the model: encoder/layers/{layers - 1}/" in message
  message = load_with(itc_dim=8)
  assert "itc_image/kernel: shape" in message
  with pytest.raises(RunConfigError, match="not a run, stage, checkpoints or step folder"):
    TrainedModel.load(str(tmp_path))


# ---- Embeddings and scores -------------------------------------------------------------------
def test_inputs_match_the_input_pipeline(model, split, records, demo):
  # Tokenization: the API's ids of a raw caption are the dataset's.
  with open(os.path.join(demo, "synthetic_data", "source", "captions.jsonl")) as f:
    captions = [json.loads(line) for line in f]
  for i in (0, 7, 31):
    text = next(c["caption"] for c in captions if c["image_id"] == split.image_ids[i])
    row = int(np.nonzero(split.caption_image == i)[0][0])
    np.testing.assert_array_equal(model.tokenize([text])[0], split.text_ids[row])
  # Regions: features, counts and 5-d locations as tf.data computes them.
  feat, loc, count = model.pack(records)
  np.testing.assert_array_equal(count, split.num_regions)
  np.testing.assert_array_equal(feat, split.region_feat)
  np.testing.assert_allclose(loc, split.region_loc, atol=1e-6)
  r = records[3]
  (x1, y1, x2, y2), w, h = r.boxes[1], r.image_w, r.image_h
  np.testing.assert_allclose(loc[3, 1], [x1 / w, y1 / h, x2 / w, y2 / h,
                                         (x2 - x1) * (y2 - y1) / (w * h)], rtol=1e-6)


def test_embeddings_match_the_model_example_by_example(model, split, records):
  ref = _reference_model(model)
  pad = model.ids.pad_id
  rows = [0, 99, 249]
  got = model.embed_texts(split.text_ids[rows])
  for a, row in enumerate(rows):
    ids = split.text_ids[row]
    n = int(np.sum(ids != pad))
    want = ref.text_embedding(jnp.asarray(ids[None, :n]), jnp.ones((1, n), bool))
    np.testing.assert_allclose(got[a], np.asarray(want)[0], atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
  images = [0, 40]
  got = model.embed_images([records[i] for i in images])
  cls_sep = (model.ids.cls_id, model.ids.sep_id)
  for a, i in enumerate(images):
    n = int(split.num_regions[i])
    want = ref.image_embedding(jnp.asarray(split.region_feat[i:i + 1, :n]),
                               jnp.asarray(split.region_loc[i:i + 1, :n]),
                               jnp.ones((1, n), bool), cls_sep)
    np.testing.assert_allclose(got[a], np.asarray(want)[0], atol=2e-5)


def test_pair_scores_match_the_all_pairs_evaluation(model, split, records, demo):
  scores = np.load(os.path.join(demo, "finetuned", "scores.npy"))
  images = [2, 11, 47]
  n_cap = split.num_captions
  pairs_img = np.repeat(images, n_cap)
  pairs_cap = np.tile(np.arange(n_cap), len(images))
  got = model.score_pairs([records[i] for i in pairs_img], split.text_ids[pairs_cap])
  np.testing.assert_allclose(got.reshape(len(images), n_cap), scores[images], atol=1e-4)


def test_two_stage_ranking_against_numpy(model, split, records, demo):
  scores = np.load(os.path.join(demo, "finetuned", "scores.npy"))  # cross-encoder, all pairs
  gallery = model.image_gallery(records)
  captions = [3, 60, 200]
  queries = split.text_ids[captions]
  itc = model.embed_texts(queries) @ gallery.embeddings.T
  for rerank_k in (0, 3):
    hits = model.rank_images(queries, gallery, k=6, rerank_k=rerank_k)
    for q, cap in enumerate(captions):
      by_itc = sorted(range(split.num_images), key=lambda j: -itc[q, j])
      depth = split.num_images if rerank_k == 0 else rerank_k
      want = sorted(by_itc[:depth], key=lambda j: -scores[j, cap]) + by_itc[depth:]
      assert [h.index for h in hits[q]] == want[:6]
      for h in hits[q]:
        assert h.itc_rank == by_itc.index(h.index)
        assert h.itc_score == pytest.approx(itc[q, h.index], abs=1e-6)
        if by_itc.index(h.index) < depth:
          assert h.score == pytest.approx(scores[h.index, cap], abs=1e-4)
        else:
          assert h.score is None
  # An image against the split's captions.
  texts = model.text_gallery(split.text_ids)
  image = model.pack([records[5]])
  itc = (model.embed_images(image) @ texts.embeddings.T)[0]
  hits = model.rank_texts(image, texts, k=5, rerank_k=4)[0]
  by_itc = sorted(range(split.num_captions), key=lambda j: -itc[j])
  want = sorted(by_itc[:4], key=lambda j: -scores[5, j]) + by_itc[4:]
  assert [h.index for h in hits] == want[:5]


def test_api_works_without_tensorflow(demo):
  code = ("import sys; sys.modules['tensorflow'] = None; "
          "from imagebert_jax.retrieval.inference import TrainedModel; import imagebert_jax.retrieval.search, "
          "imagebert_jax.retrieval.report, imagebert_jax.config.runconfig; "
          f"m = TrainedModel.load({demo!r}, batch_size=2); "
          "e = m.embed_texts(['a red dog on the left']); assert e.shape == (1, m.cfg.itc_dim); "
          "assert 'tensorflow' not in [k for k, v in sys.modules.items() if v is not None]")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]


def test_special_ids_come_from_the_stage_vocabulary(model, demo):
  ids = special_ids(os.path.join(demo, "synthetic_data", "vocab.txt"))
  assert (model.ids.pad_id, model.ids.cls_id, model.ids.sep_id) == (ids.pad_id, ids.cls_id,
                                                                    ids.sep_id)
