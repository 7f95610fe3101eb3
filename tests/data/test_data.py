"""Region files, record selection, the dataset builder and the tf.data pipelines."""

import dataclasses
import json
import os

import numpy as np
import pytest

from imagebert_jax.data import builder, pipeline, records, regionfile
from imagebert_jax.data.regionfile import RegionRecord
from imagebert_jax.data.tokenizer import Tokenizer, special_ids, write_vocab


def _record(i, n=12, d=8, rng=None):
  rng = rng or np.random.default_rng(i)
  xy = rng.uniform(0, 300, size=(n, 2))
  wh = rng.uniform(5, 100, size=(n, 2))
  return RegionRecord(
      image_id=f"img{i}", image_w=400, image_h=300,
      boxes=np.concatenate([xy, xy + wh], 1).astype(np.float32),
      features=rng.normal(size=(n, d)).astype(np.float16),
      object_id=rng.integers(0, 5, n).astype(np.int32),
      object_conf=rng.uniform(0, 1, n).astype(np.float32))


def test_region_file_round_trip_and_damage(tmp_path):
  path = str(tmp_path / "r.ibrf")
  recs = [_record(i) for i in range(3)]
  with regionfile.RegionFileWriter(path) as w:
    for r in recs:
      w.write(r)
  back = list(regionfile.read_region_file(path))
  assert [b.image_id for b in back] == ["img0", "img1", "img2"]
  np.testing.assert_array_equal(back[1].features, recs[1].features)
  np.testing.assert_array_equal(back[2].boxes, recs[2].boxes)
  # A writer killed inside the last record: readers name the file and the record...
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 10)
  got = []
  with pytest.raises(regionfile.RegionFileError, match=r"r\.ibrf: record 2 .* truncated"):
    for r in regionfile.read_region_file(path):
      got.append(r.image_id)
  assert got == ["img0", "img1"]  # nothing before the damage is lost
  # ...and appending cuts the damaged tail, knows what is there, and continues.
  with regionfile.RegionFileWriter(path, append=True) as w:
    assert w.existing_ids == {"img0", "img1"}
    w.write(recs[2])
  assert [r.image_id for r in regionfile.read_region_file(path)] == ["img0", "img1", "img2"]
  # A flipped byte is caught by the checksum.
  data = bytearray(open(path, "rb").read())
  data[40] ^= 0xFF
  open(path, "wb").write(bytes(data))
  with pytest.raises(regionfile.RegionFileError, match="record 0 .*checksum"):
    list(regionfile.read_region_file(path))


def test_select_regions_threshold_min_and_max():
  conf = np.array([0.9, 0.1, 0.5, 0.05, 0.3, 0.15, 0.8], np.float32)
  rec = dataclasses.replace(_record(0, n=7), object_conf=conf)
  pick = lambda **kw: records.select_regions(rec, records.RecordOptions(feature_dim=8, **kw))
  # Above 0.2: 0.9, 0.8, 0.5, 0.3 - best first.
  np.testing.assert_allclose(pick(min_boxes=2, max_boxes=10).object_conf, [0.9, 0.8, 0.5, 0.3])
  # At least 5: the best one below the threshold joins.
  np.testing.assert_allclose(pick(min_boxes=5, max_boxes=10).object_conf,
                             [0.9, 0.8, 0.5, 0.3, 0.15])
  # At most 2.
  kept = pick(min_boxes=1, max_boxes=2)
  np.testing.assert_allclose(kept.object_conf, [0.9, 0.8])
  np.testing.assert_array_equal(kept.boxes, rec.boxes[[0, 6]])
  np.testing.assert_array_equal(kept.features, rec.features[[0, 6]])


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
  """Five images written through the builder, with known captions and boxes."""
  out = str(tmp_path_factory.mktemp("ds"))
  vocab = os.path.join(out, "vocab.txt")
  write_vocab(vocab, ["a", "red", "dog", "cat", "on", "the", "left", "big", "small"])
  tok = Tokenizer(vocab, max_len=8)
  opts = records.RecordOptions(feature_dim=8, min_boxes=1, max_boxes=12)
  captions = {0: ["a red dog"], 1: ["a cat", "the big red dog on the left a cat"],
              2: ["a dog", "a cat", "red"], 3: ["small cat"], 4: ["a big dog"]}
  with builder.ShardWriter(out, "tiny", "train", opts) as w:
    for i in range(5):
      caps = captions[i]
      w.write(records.make_example(records.select_regions(_record(i), opts), caps,
                                   tok.encode_batch(caps), opts))
  builder.finalize(out, "tiny", opts, extra_info={"vocab_file": "vocab.txt"})
  return out, vocab, captions, tok


def _pipe(data_dir, vocab, **kw):
  ids = special_ids(vocab)
  base = dict(data_dir=data_dir, split="train", batch_size=4, max_text_len=6, max_regions=10,
              pad_id=ids.pad_id, sep_id=ids.sep_id, shuffle_buffer=1, pair_shuffle_buffer=1)
  base.update(kw)
  return pipeline.PipelineConfig(**base)


def test_builder_report_and_metadata(small_dataset):
  out, _, captions, _ = small_dataset
  info = records.read_info(out)
  assert info["splits"]["train"] == {"records": 5, "pairs": 8}
  with open(os.path.join(out, "tiny-train.report-00000-of-00001.json")) as f:
    assert json.load(f)["records"] == 5
  import tensorflow_datasets as tfds
  assert tfds.builder_from_directory(out).info.splits["train"].num_examples == 5


def test_eval_pipeline_yields_every_pair_once_with_fixed_shapes(small_dataset):
  out, vocab, captions, tok = small_dataset
  ids = special_ids(vocab)
  batches = list(pipeline.as_numpy(pipeline.eval_dataset(_pipe(out, vocab))))
  assert len(batches) == 2  # 8 pairs in batches of 4
  seen = []
  for b in batches:
    assert b["text_ids"].shape == (4, 6) and b["region_feat"].shape == (4, 10, 8)
    assert b["region_feat"].dtype == np.float16
    for j in range(4):
      if b["mask"][j]:
        seen.append((int(b["image_index"][j]), int(b["caption_index"][j])))
        want = tok.encode(captions[int(b["image_index"][j])][int(b["caption_index"][j])])
        if len(want) > 6:  # truncated to the budget, ending in [SEP]
          want = np.concatenate([want[:5], [ids.sep_id]])
        got = b["text_ids"][j]
        np.testing.assert_array_equal(got[:len(want)], want)
        assert (got[len(want):] == ids.pad_id).all()
  assert sorted(seen) == sorted((i, k) for i, c in captions.items() for k in range(len(c)))
  # Batches of 3: the third of three holds padding; only the two whole ones are kept on request.
  padded = list(pipeline.as_numpy(pipeline.eval_dataset(_pipe(out, vocab, batch_size=3))))
  whole = list(pipeline.as_numpy(pipeline.eval_dataset(_pipe(out, vocab, batch_size=3),
                                                        whole_only=True)))
  assert [b["mask"].tolist() for b in padded] == [[True] * 3, [True] * 3, [True, True, False]]
  assert len(whole) == 2 and all(b["mask"].all() for b in whole)


def test_a_process_with_no_records_still_runs_every_eval_batch(small_dataset, monkeypatch):
  """Five records over eight processes: the last processes hold none, yet must take part in as
  many evaluation batches as the others (here one), with every row marked as padding."""
  import jax
  from jax.experimental import multihost_utils
  out, vocab, _, _ = small_dataset
  monkeypatch.setattr(jax, "process_count", lambda: 8)
  monkeypatch.setattr(jax, "process_index", lambda: 7)
  # Another process needs one batch and holds one whole batch: (needed, -whole) = (1, -1).
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, [1, -1]]))
  cfg = _pipe(out, vocab, batch_size=16)  # two rows per process
  assert pipeline.count_local_pairs(cfg) == 0
  batches = list(pipeline.as_numpy(pipeline.eval_dataset(cfg)))
  assert len(batches) == 1 and batches[0]["text_ids"].shape == (2, 6)
  assert not batches[0]["mask"].any()
  with pytest.raises(ValueError, match=r"no records for process 7 of 8"):
    pipeline.train_dataset(cfg)


def test_region_inputs_match_numpy(small_dataset):
  out, vocab, _, _ = small_dataset
  opts = records.RecordOptions(feature_dim=8, min_boxes=1, max_boxes=12)
  b = next(pipeline.as_numpy(pipeline.eval_dataset(_pipe(out, vocab))))
  j = 0
  rec = records.select_regions(_record(int(b["image_index"][j])), opts)
  n = min(rec.num_boxes, 10)
  assert b["num_regions"][j] == n
  x1, y1, x2, y2 = rec.boxes[:n].T
  want = np.stack([x1 / 400, y1 / 300, x2 / 400, y2 / 300, (x2 - x1) * (y2 - y1) / 120000], 1)
  np.testing.assert_allclose(b["region_loc"][j, :n], np.clip(want, 0, 1), rtol=1e-5)
  np.testing.assert_array_equal(b["region_feat"][j, :n], rec.features[:n])
  assert (b["region_feat"][j, n:] == 0).all() and (b["region_class"][j, n:] == -1).all()
  np.testing.assert_array_equal(b["region_class"][j, :n], rec.object_id[:n])


def test_train_pipeline_is_deterministic_and_pads_nothing(small_dataset):
  out, vocab, _, _ = small_dataset
  cfg = _pipe(out, vocab, shuffle_buffer=5, pair_shuffle_buffer=4, seed=3)
  take = lambda: [next(it) for it in [pipeline.as_numpy(pipeline.train_dataset(cfg))]
                  for _ in range(5)]
  a, b = take(), take()
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert set(a[0]) == {"text_ids", "region_feat", "region_loc", "num_regions", "region_class",
                       "image_key"}
  # Captions of one image share its key; different images differ.
  keys = np.concatenate([x["image_key"] for x in a])
  assert len(set(keys.tolist())) == 5


def test_synthetic_dataset_is_learnable_shape(synthetic_dir):
  info = records.read_info(synthetic_dir)
  assert info["splits"]["train"]["records"] == 120
  assert info["splits"]["test"]["pairs"] == 150
  ids = special_ids(os.path.join(synthetic_dir, "vocab.txt"))
  assert ids.random_token_range[0] == 5


def test_a_built_dataset_still_works_after_its_folder_is_moved(tmp_path):
  """The build command copies the vocabulary it is given into the dataset and names it relative
  to the folder: moved elsewhere (as when it is copied to a bucket), with the original vocabulary
  and sources gone, the folder is still a whole dataset."""
  import shutil

  from imagebert_jax.data import build
  src = tmp_path / "src"
  src.mkdir()
  vocab = src / "vocab.txt"
  write_vocab(str(vocab), ["a", "red", "dog", "cat", "on", "the", "left"])
  with regionfile.RegionFileWriter(str(src / "regions.ibrf")) as w:
    for i in range(3):
      w.write(_record(i))
  with open(src / "pairs.jsonl", "w") as f:
    for i, caption in enumerate(["a red dog", "a cat", "the dog on the left"]):
      f.write(json.dumps({"image_id": f"img{i}", "caption": caption}) + "\n")
  built = tmp_path / "built" / "web"
  build.run_command(["build", "--name", "web", "--out_dir", str(built),
                     "--regions", str(src / "regions.ibrf"), "--captions",
                     str(src / "pairs.jsonl"), "--caption_source", "jsonl", "--split", "train",
                     "--vocab_file", str(vocab), "--min_boxes", "1", "--feature_dim", "8"])
  # The sources are noted as where the data came from; what is read back is inside the folder.
  assert records.read_info(str(built))["vocab_file"] == "vocab.txt"
  moved = tmp_path / "elsewhere" / "web"
  shutil.move(str(built), str(moved))
  shutil.rmtree(src)
  info = records.read_info(str(moved))
  assert info["splits"]["train"]["records"] == 3
  vocab_file = records.vocab_path(str(moved), info)
  assert vocab_file == str(moved / "vocab.txt")
  lines = (moved / "vocab.txt").read_text().split("\n")
  ids = Tokenizer(vocab_file, max_len=8).encode("a red dog").tolist()
  assert ids[1:4] == [lines.index("a"), lines.index("red"), lines.index("dog")]
  got = {r.image_id for r in pipeline.split_records(str(moved), "train")}
  assert got == {"img0", "img1", "img2"}


def test_region_locations_hand_worked():
  from imagebert_jax.model.inputs import region_locations
  # A 40 x 60 box at (10, 20) on a 100 x 200 image; one running past the right edge.
  boxes = np.array([[10, 20, 50, 80], [90, 0, 130, 200]], np.float32)
  np.testing.assert_allclose(region_locations(boxes, 100, 200),
                             [[0.1, 0.1, 0.5, 0.4, 0.12], [0.9, 0.0, 1.0, 1.0, 0.4]], rtol=1e-6)


def test_input_pipeline_and_inference_feed_the_model_alike(small_dataset):
  """The same record gives the model the same region inputs through the tf.data pipeline
  (training and evaluation) and through the Python API and search (pack_regions), bit for bit:
  features, box locations (boxes past the image's edge included), counts, and which regions are
  kept beyond max_regions."""
  from imagebert_jax.retrieval.inference import pack_regions
  out, vocab, _, _ = small_dataset
  recs = list(pipeline.split_records(out, "train"))
  r = 6
  assert any(len(rec.boxes) > r for rec in recs)  # some are cut to max_regions
  seen, clipped = 0, 0
  for b in pipeline.as_numpy(pipeline.eval_dataset(_pipe(out, vocab, max_regions=r))):
    for j in np.flatnonzero(b["mask"]):
      rec = recs[int(b["image_index"][j])]
      feat, loc, count = pack_regions([rec], max_regions=r, feature_dim=8)
      assert int(b["num_regions"][j]) == int(count[0]) == min(len(rec.boxes), r)
      np.testing.assert_array_equal(b["region_feat"][j], feat[0])
      np.testing.assert_array_equal(b["region_loc"][j], loc[0])
      seen += 1
      clipped += int((loc[0] == 1.0).any())
  assert seen == 8
  assert clipped  # boxes past the image's edge, clipped alike on both paths
