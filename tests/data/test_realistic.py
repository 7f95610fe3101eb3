"""The realistic scene generator: public formats, detector-like statistics, captions about the
salient things; and the alarms for a matcher that collapses or never learns."""

import json
import os

import numpy as np
import pytest

from imagebert_jax.data import captions as captions_lib
from imagebert_jax.data import formats, realistic


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("scenes"))
  spec = realistic.RealisticSpec(seed=5, feature_dim=256)
  paths = realistic.generate(out, {"train": 40, "test": 10}, spec, images_per_file=16)
  return spec, paths


def test_files_are_the_public_formats(generated):
  spec, paths = generated
  tsvs = sorted(os.listdir(paths["features"]))
  assert tsvs == ["scenes_000.tsv", "scenes_001.tsv", "scenes_002.tsv", "scenes_003.tsv"]
  first = open(os.path.join(paths["features"], tsvs[0]), "rb").readline()
  assert len(first.split(b"\t")) == len(formats.D2_FIELDS)  # the detectron2 layout
  items = [item for _, item in formats.read_regions(
      [os.path.join(paths["features"], t) for t in tsvs], "auto", spec.feature_dim)]
  assert len(items) == 50 and not [i for i in items if isinstance(i, formats.Problem)]
  caps = list(captions_lib.read_karpathy(paths["captions"]))
  assert len(caps) == 250 and {c.split for c in caps} == {"train", "test"}
  # Region ids are the Karpathy file names without extension, as for Flickr30k.
  assert {c.image_id for c in caps} == {r.image_id for r in items}
  with open(paths["captions"]) as f:
    entry = json.load(f)["images"][0]
  assert entry["filename"].endswith(".jpg") and len(entry["sentences"]) == 5


def test_detector_like_statistics(generated):
  spec, paths = generated
  records = [item for _, item in formats.read_regions(
      formats.expand_paths([paths["features"]]), "auto")]
  n = np.array([r.num_boxes for r in records])
  assert n.min() >= spec.min_regions and n.max() <= spec.max_regions
  feats = np.concatenate([r.features for r in records])
  assert feats.min() >= 0.0                      # post-ReLU
  zero = np.mean(feats == 0)
  assert 0.3 < zero < 0.85                       # sparse
  assert feats.max() > 20 * feats.mean()         # heavy-tailed
  conf = np.concatenate([r.object_conf for r in records])
  boxes = np.concatenate([r.boxes for r in records])
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  # Salience: bigger boxes are more confident (Spearman rank correlation).
  rank = lambda x: np.argsort(np.argsort(x))
  rho = np.corrcoef(rank(conf), rank(area))[0, 1]
  assert rho > 0.15
  # Most regions are not what a caption talks about: count the labels naming a caption word.
  labels = realistic.class_names()
  by_id = {}
  for c in captions_lib.read_karpathy(paths["captions"]):
    by_id.setdefault(c.image_id, set()).update(c.text.split())
  named = [np.mean([labels[k] in by_id[r.image_id] for k in r.object_id]) for r in records]
  assert np.mean(named) < 0.35


def test_captions_talk_about_the_salient_things():
  rng = np.random.default_rng(0)
  for _ in range(30):
    scene = realistic.random_scene(rng)
    info = realistic.THING_INFO[scene.things[0].cls]
    names = set(info[2]) | {info[3]}
    for text in realistic.describe(scene, rng, 5):
      assert names & set(text.split()), (text, scene)
      assert set(text.split()) <= set(realistic.vocabulary())


def test_generation_is_deterministic(tmp_path):
  spec = realistic.RealisticSpec(seed=1, feature_dim=64)
  a = realistic.generate(str(tmp_path / "a"), {"train": 6}, spec)
  b = realistic.generate(str(tmp_path / "b"), {"train": 6}, spec)
  for key in ("captions", "vocab"):
    assert open(a[key], "rb").read() == open(b[key], "rb").read()
  fa, fb = (open(os.path.join(p["features"], "scenes_000.tsv"), "rb").read() for p in (a, b))
  assert fa == fb


# ------------------------------------------------------------------------------------------------
# Alarms.
# ------------------------------------------------------------------------------------------------
def test_collapse_alarm_after_patience_intervals():
  from imagebert_jax.training.monitor import LearningMonitor, MonitorConfig
  mon = LearningMonitor("finetune", MonitorConfig(min_score_std=1e-3, patience=3))
  seen = [mon.check(step, {"score_std": std})["alarm/score_collapse"]
          for step, std in [(10, 0.5), (20, 1e-4), (30, 2e-4), (40, 5e-5), (50, 1e-5), (60, 0.2)]]
  assert seen == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
  assert [a["step"] for a in mon.alarms] == [40]  # raised once while it held


def test_itm_at_chance_alarm():
  from imagebert_jax.training.monitor import LearningMonitor, MonitorConfig
  mon = LearningMonitor("pretrain", MonitorConfig(itm_chance_steps=100))
  base = {"itm_positive_share": 0.5, "itm_score_std": 0.3}
  assert mon.check(50, {**base, "itm_accuracy": 0.5})["alarm/itm_at_chance"] == 0.0  # too early
  assert mon.check(100, {**base, "itm_accuracy": 0.51})["alarm/itm_at_chance"] == 1.0
  assert mon.check(150, {**base, "itm_accuracy": 0.75})["alarm/itm_at_chance"] == 0.0
  # A 70/30 batch: always saying "no" scores 0.7, which is chance there.
  assert mon.check(200, {**base, "itm_positive_share": 0.3,
                         "itm_accuracy": 0.71})["alarm/itm_at_chance"] == 1.0


def test_score_matrix_spread():
  from imagebert_jax.retrieval.evaluate import score_spread
  rng = np.random.default_rng(0)
  constant = np.full((5, 25), -0.6931) + rng.uniform(-3e-6, 3e-6, (5, 25))
  assert score_spread(constant)["scores_near_constant"]
  s = score_spread(rng.normal(size=(5, 25)))
  assert not s["scores_near_constant"] and abs(s["score_std"] - 1.0) < 0.3


# ------------------------------------------------------------------------------------------------
# Feature standardisation with the training data's statistics.
# ------------------------------------------------------------------------------------------------
def test_feature_statistics_of_a_built_split(synthetic_dir):
  import glob

  import jax.numpy as jnp
  from flax import nnx

  from imagebert_jax.training import train
  from imagebert_jax.data import regionfile
  from imagebert_jax.model import ImageBert, ModelConfig
  # Independent reference: the source region file the builder read, train images only (the toy
  # scenes keep every region).
  source = glob.glob(os.path.join(synthetic_dir, "source", "*.ibrf"))[0]
  feats = np.concatenate([r.features.astype(np.float64)
                          for r in regionfile.read_region_file(source)
                          if r.image_id.startswith("train_")])
  mean, scale = train.region_feature_statistics(synthetic_dir, "train")
  np.testing.assert_allclose(mean, feats.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(1.0 / scale, feats.std(0), rtol=1e-3)
  # Set only on a model that has none yet; statistics from a checkpoint are kept.
  cfg = ModelConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16,
                    max_text_len=8, max_regions=16, region_feature_dim=feats.shape[1],
                    num_object_classes=16, region_input_norm="standardise")
  params = nnx.to_pure_dict(nnx.state(ImageBert(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  set_once = train.with_feature_statistics("t", params, cfg, synthetic_dir, "train")
  np.testing.assert_allclose(set_once["region_feature_mean"], mean, rtol=1e-6)
  trained = {**params, "region_feature_mean": jnp.full_like(mean, 0.5),
             "region_feature_scale": jnp.full_like(mean, 2.0)}
  kept = train.with_feature_statistics("t", trained, cfg, synthetic_dir, "train")
  assert float(kept["region_feature_mean"][0]) == 0.5


# ------------------------------------------------------------------------------------------------
# Spatial phrases, binding tests, web captions.
# ------------------------------------------------------------------------------------------------
def test_spatial_phrase_reads_the_boxes():
  left, right = (0.05, 0.3, 0.35, 0.8), (0.6, 0.3, 0.9, 0.8)  # centres 0.2 and 0.75
  top, bottom = (0.3, 0.0, 0.6, 0.3), (0.35, 0.5, 0.65, 0.9)  # centres y 0.15 and 0.7
  assert realistic.spatial_phrase(left, right) == "to the left of"
  assert realistic.spatial_phrase(right, left) == "to the right of"
  assert realistic.spatial_phrase(top, bottom) == "above"
  assert realistic.spatial_phrase(bottom, top) == "below"
  # Centres 0.1 apart (less than SPATIAL_MIN_OFFSET): the boxes do not show it clearly.
  assert realistic.spatial_phrase((0.2, 0.2, 0.6, 0.6), (0.3, 0.25, 0.7, 0.65)) is None


class _Fixed:
  """A stand-in generator whose draws are given: integers() returns 0 and uniform() 0.9."""

  def integers(self, n):
    return 0

  def uniform(self):
    return 0.9


def test_binding_items_hand_worked():
  car = realistic.Thing("car", "red", None, (0.05, 0.3, 0.35, 0.8))      # on the left
  bus = realistic.Thing("bus", "white", None, (0.6, 0.3, 0.9, 0.8))      # on the right
  scene = realistic.Scene(setting=1, things=[car, bus], relation=(0, "next to", 1), count=1)
  items = realistic.binding_items(scene, _Fixed())
  assert items == [
      {"kind": "attribute", "true_caption": "a red car next to a white bus",
       "false_caption": "a white car next to a red bus"},
      {"kind": "relation", "true_caption": "a car to the left of a bus",
       "false_caption": "a bus to the left of a car"}]
  # Attributes of different kinds (a person's age, a vehicle's colour) are not swapped: "an old
  # car" beside "a red man" would give the foil away; two things of one name are not swapped.
  man = realistic.Thing("man", "old", "red shirt", (0.05, 0.3, 0.35, 0.8))
  assert [i["kind"] for i in realistic.binding_items(
      realistic.Scene(1, [man, bus], (0, "standing next to", 1), 1), _Fixed())] == ["relation"]
  other_car = realistic.Thing("car", "white", None, (0.6, 0.3, 0.9, 0.8))
  assert realistic.binding_items(realistic.Scene(1, [car, other_car], None, 1), _Fixed()) == []
  # Two dogs ("count" 2) have no one place: no relation test with them.
  dog = realistic.Thing("dog", "brown", None, (0.05, 0.3, 0.35, 0.8))
  assert realistic.binding_items(realistic.Scene(2, [dog, bus], None, 2), _Fixed()) == []


def test_binding_files_and_web_set(tmp_path):
  spec = realistic.RealisticSpec(seed=2, feature_dim=32)
  paths = realistic.generate(str(tmp_path), {"train": 4, "test": 60}, spec, web_images=30)
  assert "binding_train" not in paths
  rows = [json.loads(line) for line in open(paths["binding_test"])]
  with open(paths["captions"]) as f:
    test_ids = {os.path.splitext(i["filename"])[0] for i in json.load(f)["images"]
                if i["split"] == "test"}
  assert rows and {r["image_id"] for r in rows} <= test_ids
  assert {r["kind"] for r in rows} == {"attribute", "relation"}
  for r in rows:  # the same words, another caption
    assert sorted(r["true_caption"].split()) == sorted(r["false_caption"].split())
    assert r["true_caption"] != r["false_caption"]
  # The web set: Conceptual Captions' layout (caption, URL), image ids the line numbers.
  lines = open(paths["web_captions"]).read().splitlines()
  assert len(lines) == 30 and all(len(line.split("\t")) == 2 for line in lines)
  caps = list(captions_lib.read_cc(paths["web_captions"], "web"))
  items = [item for _, item in formats.read_regions(
      formats.expand_paths([paths["web_features"]]), "auto", spec.feature_dim)]
  assert {c.image_id for c in caps} == {r.image_id for r in items} == {str(i) for i in range(30)}
  vocab = set(realistic.vocabulary())
  for c in caps:
    assert set(c.text.split()) <= vocab, c.text
