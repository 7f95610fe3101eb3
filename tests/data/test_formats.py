"""Building datasets from files written here in the public formats, good and bad."""

import base64
import glob
import json

import numpy as np
import pytest

from imagebert_jax.data import build as build_lib
from imagebert_jax.data.regionfile import RegionFileWriter, RegionRecord
from imagebert_jax.data.tokenizer import write_vocab

D = 8  # feature dimension of these small files


def b64(a, dtype):
  return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode()


def boxes(rng, n):
  xy = rng.uniform(0, 100, (n, 2))
  return np.concatenate([xy, xy + rng.uniform(5, 50, (n, 2))], 1)


def bua_line(image_id, n, rng, *, dim=D, w=200, h=150, feats=None, box_field=None, n_field=None):
  """One line of bottom-up-attention's generate_tsv.py output."""
  feats = rng.uniform(0, 3, (n, dim)) if feats is None else feats
  return "\t".join([str(image_id), str(w), str(h), str(n if n_field is None else n_field),
                    box_field or b64(boxes(rng, n), np.float32), b64(feats, np.float32)])


def d2_line(image_id, n, rng, dim=D):
  """One line of the detectron2 variant (img_id, img_h, img_w, objects..., boxes, features)."""
  return "\t".join([str(image_id), "150", "200", b64(np.arange(n) % 5, np.int64),
                    b64(np.linspace(0.9, 0.3, n), np.float32), b64(np.arange(n) % 3, np.int64),
                    b64(np.full(n, 0.5), np.float32), str(n), b64(boxes(rng, n), np.float32),
                    b64(rng.uniform(0, 3, (n, dim)), np.float32)])


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vocab") / "vocab.txt")
  write_vocab(path, ["a", "dog", "cat", "red", "on", "grass", "photo", "of", "the"])
  return path


def spec(tmp, vocab, regions, captions, source="jsonl", **kw):
  base = dict(name="t", out_dir=str(tmp / "out"), regions=regions, captions=captions,
              caption_source=source, vocab_file=vocab, max_text_len=8, feature_dim=D,
              min_boxes=2, max_boxes=12)
  base.update(kw)
  return build_lib.BuildSpec(**base)


def jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def read_all(out_dir, split="train"):
  import tensorflow_datasets as tfds
  b = tfds.builder_from_directory(out_dir)
  return list(tfds.as_numpy(b.as_dataset(split=split)))


def test_bua_tsv_with_every_kind_of_bad_input(tmp_path, vocab, caplog):
  rng = np.random.default_rng(0)
  good_feats = rng.uniform(0, 3, (4, D))
  lines = [
      bua_line("100", 4, rng, feats=good_feats),                    # line 1: good
      bua_line("101", 3, rng),                                      # line 2: good
      bua_line("102", 3, rng, box_field="@@not base64@@"),          # line 3: bad base64
      bua_line("103", 3, rng, n_field=5),                           # line 4: num_boxes mismatch
      bua_line("104", 3, rng, dim=D + 1),                           # line 5: wrong feature dim
      bua_line("105", 0, rng, feats=np.zeros((0, D))),              # line 6: no boxes
      bua_line("100", 2, rng),                                      # line 7: duplicate id
      bua_line("106", 3, rng),                                      # line 8: no captions
      bua_line("107", 15, rng),                                     # line 9: 15 > 12 boxes
  ]
  truncated = bua_line("108", 3, rng)[:-20]                          # line 10: cut off
  path = tmp_path / "feats.tsv"
  path.write_text("\n".join(lines) + "\n" + truncated)
  caps = tmp_path / "caps.jsonl"
  jsonl(caps, [{"image_id": "100", "caption": "a red dog"}, {"image_id": "100", "caption": "a dog"},
               {"image_id": "101", "caption": "a cat on the grass"},
               {"image_id": "107", "caption": "photo of a cat"},
               {"image_id": "999", "caption": "a cat"},             # unknown image
               {"image_id": "101", "caption": "   "}])              # empty caption
  with caplog.at_level("DEBUG"):  # a repaired record is logged at DEBUG
    info = build_lib.build_dataset(spec(tmp_path, vocab, [str(path)], [str(caps)]))
  assert info["splits"]["train"] == {"records": 3, "pairs": 4}
  assert info["options"]["has_object_labels"] is False  # MOC will be off, and it was said
  assert any("masked object classification will be turned off" in r.message
             for r in caplog.records)
  want = {"bad_base64": 1, "num_boxes_mismatch": 1, "feature_dim": 1, "no_boxes": 1,
          "duplicate_image_id": 1, "image_without_captions": 1,
          "truncated_file": 1, "captions_without_image": 1, "empty_caption": 1}
  assert info["skipped"] == want
  # An image with more boxes than the maximum is kept (its best boxes): repaired, not skipped.
  assert info["repaired"] == {"too_many_boxes": 1}
  text = "\n".join(r.message for r in caplog.records)
  for needle in ("feats.tsv line 3 (image 102)", "feats.tsv line 4 (image 103)",
                 "feats.tsv line 5 (image 104)", "feats.tsv line 6 (image 105)",
                 "feats.tsv line 10", "feats.tsv line 7 (image 100): a second set", "feats.tsv line 8 (image 106)",
                 "feats.tsv line 9 (image 107): 15 boxes",
                 "caps.jsonl line 6", "images 999"):
    assert needle in text, needle
  examples = read_all(str(tmp_path / "out"))
  by_id = {e["image_id"].decode(): e for e in examples}
  assert set(by_id) == {"100", "101", "107"}
  np.testing.assert_array_equal(by_id["100"]["features"], good_feats.astype(np.float16))
  assert by_id["107"]["features"].shape == (12, D)  # cut to the maximum
  assert (by_id["100"]["object_id"] == -1).all()
  assert list(by_id["100"]["caption_lengths"]) == [5, 4]  # [CLS] a red dog [SEP], [CLS] a dog [SEP]


def test_detectron2_tsv_keeps_labels_and_attributes(tmp_path, vocab):
  rng = np.random.default_rng(1)
  path = tmp_path / "d2.tsv"
  path.write_text(d2_line("7", 6, rng) + "\n")
  caps = tmp_path / "caps.jsonl"
  jsonl(caps, [{"image_id": "7", "caption": "a dog"}])
  info = build_lib.build_dataset(spec(tmp_path, vocab, [str(path)], [str(caps)],
                                      conf_threshold=0.5))
  assert info["options"]["has_object_labels"] is True
  (ex,) = read_all(str(tmp_path / "out"))
  # Confidences 0.9 .. 0.3 in 6 steps: 0.9, 0.78, 0.66, 0.54 pass 0.5; best first.
  np.testing.assert_allclose(ex["object_conf"], [0.9, 0.78, 0.66, 0.54], rtol=1e-5)
  np.testing.assert_array_equal(ex["object_id"], [0, 1, 2, 3])
  assert (ex["image_w"], ex["image_h"]) == (200, 150)


def test_uniter_npz_with_karpathy_captions(tmp_path, vocab):
  rng = np.random.default_rng(2)
  npz_dir = tmp_path / "img_db"
  npz_dir.mkdir()
  for cocoid in (9, 25):
    n = 5
    soft = rng.dirichlet(np.ones(7), size=n)
    np.savez(npz_dir / f"coco_val2014_{cocoid:012d}.npz", features=rng.normal(size=(n, D)),
             norm_bb=rng.uniform(0, 1, (n, 7)), conf=soft[:, 1:].max(1), soft_labels=soft)
  (npz_dir / "coco_val2014_000000000031.npz").write_bytes(b"not a zip file")
  karpathy = {"dataset": "coco", "images": [
      {"cocoid": 9, "filename": "COCO_val2014_000000000009.jpg", "split": "test",
       "sentences": [{"raw": "A dog on the grass."}, {"raw": "A red dog."}]},
      {"cocoid": 25, "filename": "COCO_val2014_000000000025.jpg", "split": "restval",
       "sentences": [{"raw": "A cat."}]},
      {"cocoid": 31, "filename": "COCO_val2014_000000000031.jpg", "split": "train",
       "sentences": [{"raw": "The cat."}]}]}
  caps = tmp_path / "dataset_coco.json"
  caps.write_text(json.dumps(karpathy))
  info = build_lib.build_dataset(spec(tmp_path, vocab, [str(npz_dir)], [str(caps)], "karpathy",
                                      image_id_mode="trailing_int", class_probs_dim=6))
  assert info["splits"]["test"] == {"records": 1, "pairs": 2}
  assert info["splits"]["restval"] == {"records": 1, "pairs": 1}
  assert info["splits"]["train"] == {"records": 0, "pairs": 0}
  assert info["skipped"] == {"unreadable_file": 1, "captions_without_image": 1}
  (ex,) = read_all(str(tmp_path / "out"), "test")
  z = np.load(npz_dir / "coco_val2014_000000000009.npz")
  order = np.argsort(-z["conf"], kind="stable")
  np.testing.assert_array_equal(ex["object_id"], z["soft_labels"][order, 1:].argmax(1))
  np.testing.assert_allclose(ex["boxes"], z["norm_bb"][order, :4], rtol=1e-6)
  assert ex["class_probs"].shape == (5, 6)
  assert ex["image_id"] == b"9"


def write_regions(path: str, image_ids, rng) -> None:
  """A region file of 10 x 10 images with three random boxes each."""
  with RegionFileWriter(path) as w:
    for image_id in image_ids:
      w.write(RegionRecord(image_id=image_id, image_w=10, image_h=10, boxes=boxes(rng, 3),
                           features=rng.normal(size=(3, D)).astype(np.float16),
                           object_id=np.zeros(3, np.int32), object_conf=np.ones(3, np.float32)))


def test_cc_and_sbu_caption_ids(tmp_path, vocab):
  rng = np.random.default_rng(3)
  regions = tmp_path / "r.ibrf"
  write_regions(str(regions), ("0", "2", "4385058960"), rng)
  cc = tmp_path / "Train_GCC-training.tsv"
  cc.write_text("a dog\thttp://x/1.jpg\n\thttp://x/2.jpg\na cat\thttp://x/3.jpg\n")
  info = build_lib.build_dataset(spec(tmp_path, vocab, [str(regions)], [str(cc)], "cc",
                                      name="cc", out_dir=str(tmp_path / "cc")))
  # Line 1 -> image "0"; line 2 is empty; line 3 -> image "2".
  assert info["splits"]["train"]["records"] == 2
  assert info["skipped"]["empty_caption"] == 1
  caps = tmp_path / "SBU_captioned_photo_dataset_captions.txt"
  urls = tmp_path / "SBU_captioned_photo_dataset_urls.txt"
  caps.write_text("a red dog\n")
  urls.write_text("http://static.flickr.com/2723/4385058960_b0f291553e.jpg\n")
  info = build_lib.build_dataset(spec(tmp_path, vocab, [str(regions)], [str(caps), str(urls)],
                                      "sbu", name="sbu", out_dir=str(tmp_path / "sbu")))
  assert info["splits"]["train"]["records"] == 1


def _files(folder):
  """{shard file: its records as tf.train.Example protos, in order} (protos, not bytes: a map's
  serialized order may differ between processes)."""
  import tensorflow as tf
  return {f.split("/")[-1]: [tf.train.Example.FromString(r.numpy())
                             for r in tf.data.TFRecordDataset(f)]
          for f in glob.glob(f"{folder}/t-*.tfrecord-*")}


def test_build_is_the_same_on_one_worker_and_on_two_processes(tmp_path, vocab, caplog):
  """The pipeline on Beam's DirectRunner in this process and on two worker processes
  (multi-processing mode): the same shard files holding the same records in the same order, the
  same counts; and the records
  are the source's, checked against a NumPy selection of the TSV rows."""
  rng = np.random.default_rng(4)
  feats = {}
  folder = tmp_path / "regions"
  folder.mkdir()
  for f, ids in enumerate([range(0, 9), range(9, 14), range(14, 23)]):
    lines = []
    for i in ids:
      n = 3 + i % 4
      feats[str(i)] = rng.uniform(0, 3, (n, D))
      lines.append(bua_line(str(i), n, rng, feats=feats[str(i)]))
    if f == 1:
      lines.append(bua_line("3", 2, rng))                  # a duplicate of file 0's image 3
      lines.append(bua_line("77", 3, rng, n_field=4))      # a bad row
    (folder / f"part-{f}.tsv").write_text("\n".join(lines) + "\n")
  caps = tmp_path / "c.jsonl"
  rows = [{"image_id": str(i), "caption": "a dog" if i % 2 else "a red cat on the grass",
           "split": "test" if i % 5 == 0 else "train"} for i in range(22)]  # 22: no captions
  rows += [{"image_id": "5", "caption": "photo of a dog"}, {"image_id": "404", "caption": "a cat"}]
  jsonl(caps, rows)
  base = dict(records_per_shard=3)
  with caplog.at_level("INFO"):
    one = build_lib.build_dataset(spec(tmp_path, vocab, [str(folder)], [str(caps)],
                                       out_dir=str(tmp_path / "one"), **base))
  two = build_lib.build_dataset(spec(
      tmp_path, vocab, [str(folder)], [str(caps)], out_dir=str(tmp_path / "two"),
      beam_options="direct_num_workers=2,direct_running_mode=multi_processing", **base))
  assert one == {**two, "sources": one["sources"]}
  assert one["skipped"] == two["skipped"] == {
      "duplicate_image_id": 1, "num_boxes_mismatch": 1, "image_without_captions": 1,
      "captions_without_image": 1}
  assert _files(tmp_path / "one") == _files(tmp_path / "two")
  # 18 train records in 3-record shards per region file: 8/4/6 per file -> 3 + 2 + 2 shards.
  assert sorted(f for f in _files(tmp_path / "one") if "-train." in f)[-1] == \
      "t-train.tfrecord-00006-of-00007"
  # Image 5 has a caption in each split: a record in each.
  assert one["splits"] == {"train": {"records": 18, "pairs": 18},
                           "test": {"records": 5, "pairs": 5}}
  # Rebuilt into the same folder with bigger shards: the earlier shards are gone.
  build_lib.build_dataset(spec(tmp_path, vocab, [str(folder)], [str(caps)],
                               out_dir=str(tmp_path / "one")))
  assert sorted(_files(tmp_path / "one")) == ["t-test.tfrecord-00000-of-00003",
                                              "t-test.tfrecord-00001-of-00003",
                                              "t-test.tfrecord-00002-of-00003",
                                              "t-train.tfrecord-00000-of-00003",
                                              "t-train.tfrecord-00001-of-00003",
                                              "t-train.tfrecord-00002-of-00003"]
  for split in ("train", "test"):
    for e in read_all(tmp_path / "one", split):
      image_id = e["image_id"].decode()
      want = feats[image_id]  # the first copy of image 3, not the duplicate
      assert e["features"].shape == want.shape
      np.testing.assert_array_equal(e["features"], want.astype(np.float16))
      texts = [r["caption"] for r in rows
               if r["image_id"] == image_id and r.get("split", "train") == split]
      assert [c.decode() for c in e["captions"]] == texts
      assert e["source_order"] == next(i for i, r in enumerate(rows)
                                       if r["image_id"] == image_id)  # of either split


def _d2_with(image_id, rng, index, value):
  """A detectron2 line with field `index` replaced."""
  fields = d2_line(image_id, 4, rng).split("\t")
  fields[index] = value
  return "\t".join(fields)


def test_detectron2_tsv_with_every_kind_of_bad_input(tmp_path, vocab, caplog):
  rng = np.random.default_rng(5)
  lines = [
      d2_line("1", 4, rng),                                          # line 1: good
      _d2_with("2", rng, 3, "@@not base64@@"),                       # line 2: objects_id
      _d2_with("3", rng, 4, b64(np.ones(3), np.float32)),            # line 3: 3 confidences
      _d2_with("4", rng, 7, "four"),                                 # line 4: num_boxes
      "\t".join(d2_line("5", 4, rng).split("\t")[:9]),               # line 5: 9 fields
      _d2_with("6", rng, 9, b64(np.full((4, D), np.nan), np.float32)),  # line 6: NaN features
      d2_line("7", 4, rng, dim=D + 2),                               # line 7: feature dimension
      _d2_with("8", rng, 8, b64(np.ones(12), np.float32)),           # line 8: boxes of 3 values
  ]
  truncated = d2_line("9", 4, rng)[:-30]                              # line 9: cut off
  path = tmp_path / "d2.tsv"
  path.write_text("\n".join(lines) + "\n" + truncated)
  caps = tmp_path / "caps.jsonl"
  jsonl(caps, [{"image_id": str(i), "caption": "a dog"} for i in range(1, 10)])
  with caplog.at_level("WARNING"):
    info = build_lib.build_dataset(spec(tmp_path, vocab, [str(path)], [str(caps)]))
  assert info["options"]["has_object_labels"] is True
  assert info["skipped"] == {"bad_base64": 1, "num_boxes_mismatch": 2, "bad_number": 1,
                             "bad_field_count": 1, "non_finite": 1, "feature_dim": 1,
                             "truncated_file": 1, "captions_without_image": 8}
  for needle in ("d2.tsv line 2 (image 2): objects_id is not valid base64",
                 "d2.tsv line 3 (image 3): objects_conf holds 3 values, num_boxes is 4",
                 "d2.tsv line 4 (image 4): num_boxes, width or height is not a number",
                 "d2.tsv line 5: 9 tab-separated fields, want 6",
                 "d2.tsv line 6 (image 6): features contain NaN or infinity",
                 "d2.tsv line 7 (image 7): feature dimension 10, want 8",
                 "d2.tsv line 8 (image 8): boxes hold 12 values, which do not make num_boxes=4 "
                 "rows of 4",
                 "d2.tsv line 9: the file ends inside this record"):
    assert needle in caplog.text, needle
  assert [e["image_id"] for e in read_all(str(tmp_path / "out"))] == [b"1"]


def test_uniter_npz_with_every_kind_of_bad_input(tmp_path, vocab, caplog):
  rng = np.random.default_rng(6)
  folder = tmp_path / "npz"
  folder.mkdir()

  def save(name, n=4, dim=D, **override):
    soft = rng.dirichlet(np.ones(5), size=n)
    arrays = dict(features=rng.normal(size=(n, dim)), norm_bb=rng.uniform(0, 1, (n, 7)),
                  conf=soft[:, 1:].max(1), soft_labels=soft)
    arrays.update(override)
    np.savez(folder / f"{name}.npz", **{k: v for k, v in arrays.items() if v is not None})

  save("a")                                                     # good
  save("b", norm_bb=None)                                       # no norm_bb
  save("c", features=np.zeros((0, D)), norm_bb=np.zeros((0, 7)))  # no boxes
  save("d", norm_bb=rng.uniform(0, 1, (3, 7)))                  # 3 boxes for 4 features
  save("e", soft_labels=rng.dirichlet(np.ones(5), size=2))      # 2 label rows for 4 boxes
  save("f", features=np.full((4, D), np.inf))                   # infinite features
  save("g", dim=D + 1)                                          # feature dimension
  (folder / "h.npz").write_bytes(b"PK not really a zip")        # unreadable
  caps = tmp_path / "caps.jsonl"
  jsonl(caps, [{"image_id": x, "caption": "a cat"} for x in "abcdefgh"])
  with caplog.at_level("WARNING"):
    info = build_lib.build_dataset(spec(tmp_path, vocab, [str(folder)], [str(caps)]))
  assert info["skipped"] == {"missing_field": 1, "no_boxes": 1, "num_boxes_mismatch": 2,
                             "non_finite": 1, "feature_dim": 1, "unreadable_file": 1,
                             "captions_without_image": 7}
  for needle in ("b.npz (image b): no norm_bb in the file",
                 "c.npz (image c): features have shape (0, 8)",
                 "d.npz (image d): norm_bb has shape (3, 7) for 4 feature rows",
                 "e.npz (image e): soft_labels have shape (2, 5) for 4 boxes",
                 "f.npz (image f): features contain NaN or infinity",
                 "g.npz (image g): feature dimension 9, want 8",
                 "h.npz (image h): cannot read"):
    assert needle in caplog.text, needle
  assert [e["image_id"] for e in read_all(str(tmp_path / "out"))] == [b"a"]


@pytest.fixture()
def two_images(tmp_path):
  """A region file of the images '0', '1' and '4385058960'."""
  rng = np.random.default_rng(7)
  path = tmp_path / "r.ibrf"
  write_regions(str(path), ("0", "1", "4385058960"), rng)
  return str(path)


def _report(tmp_path, vocab, regions, captions, source, caplog, name):
  caplog.clear()
  with caplog.at_level("WARNING"):
    info = build_lib.build_dataset(spec(tmp_path, vocab, [regions], captions, source, name=name,
                                        out_dir=str(tmp_path / name)))
  return info, caplog.text


def test_every_caption_source_reports_its_bad_entries(tmp_path, vocab, two_images, caplog):
  # Karpathy: an image without cocoid or filename, an empty sentence.
  k = tmp_path / "dataset_flickr30k.json"
  k.write_text(json.dumps({"images": [
      {"filename": "0.jpg", "split": "test", "sentences": [{"raw": "a dog"}, {"raw": "  "}]},
      {"split": "test", "sentences": [{"raw": "a cat"}]},
      {"filename": "1.jpg", "split": "test", "sentences": [{"tokens": ["red", "cat"]}]}]}))
  info, text = _report(tmp_path, vocab, two_images, [str(k)], "karpathy", caplog, "k")
  assert info["splits"]["test"] == {"records": 2, "pairs": 2}
  assert info["skipped"] == {"bad_caption_entry": 1, "empty_caption": 1,
                             "image_without_captions": 1}
  assert "dataset_flickr30k.json image 1: neither cocoid nor filename" in text
  assert "dataset_flickr30k.json image 0 sentence 1: empty caption" in text
  # A file that is not Karpathy's: the build stops with one line naming it.
  bad = tmp_path / "not_karpathy.json"
  bad.write_text("{\"annotations\": []}")
  with pytest.raises(ValueError, match=r"not_karpathy.json: no 'images' list"):
    build_lib.build_dataset(spec(tmp_path, vocab, [two_images], [str(bad)], "karpathy"))
  bad.write_text("{\"images\": [")
  with pytest.raises(ValueError, match=r"not_karpathy.json: not valid JSON"):
    build_lib.build_dataset(spec(tmp_path, vocab, [two_images], [str(bad)], "karpathy"))

  # Conceptual Captions: an empty caption (its line number is still image 1's id).
  cc = tmp_path / "Train_GCC-training.tsv"
  cc.write_text("a dog\thttp://x/0.jpg\n \thttp://x/1.jpg\n")
  info, text = _report(tmp_path, vocab, two_images, [str(cc)], "cc", caplog, "cc")
  assert info["skipped"] == {"empty_caption": 1, "image_without_captions": 2}
  assert "Train_GCC-training.tsv line 2: empty caption" in text

  # SBU: a URL without a photo id, an empty caption, and a captions file longer than the URLs.
  caps = tmp_path / "sbu_captions.txt"
  urls = tmp_path / "sbu_urls.txt"
  caps.write_text("a red dog\na cat\n\nthe dog\none more\nand another\n")
  urls.write_text("http://static.flickr.com/2723/4385058960_b0f291553e.jpg\n"
                  "http://example.com/no-id.jpg\nhttp://static.flickr.com/1/1_a.jpg\n"
                  "http://static.flickr.com/1/0_b.jpg\n")
  info, text = _report(tmp_path, vocab, two_images, [str(caps), str(urls)], "sbu", caplog, "sbu")
  assert info["splits"]["train"]["records"] == 2
  assert info["skipped"] == {"bad_caption_entry": 1, "empty_caption": 1,
                             "line_count_mismatch": 2, "image_without_captions": 1}
  assert "sbu_urls.txt line 2: no Flickr photo id in 'http://example.com/no-id.jpg'" in text
  assert "sbu_captions.txt line 3: empty caption" in text
  assert "sbu_captions.txt lines 5-6: " in text and "sbu_urls.txt has only 4 lines" in text

  # JSON lines: not JSON, a missing field, an empty caption.
  j = tmp_path / "pairs.jsonl"
  j.write_text('{"image_id": "0", "caption": "a dog"}\nnot json\n{"image_id": "1"}\n'
               '{"image_id": "1", "caption": ""}\n{"image_id": "1", "caption": "a cat"}\n')
  info, text = _report(tmp_path, vocab, two_images, [str(j)], "jsonl", caplog, "j")
  assert info["splits"]["train"] == {"records": 2, "pairs": 2}
  assert info["skipped"] == {"bad_caption_entry": 2, "empty_caption": 1,
                             "image_without_captions": 1}
  assert "pairs.jsonl line 2: not a JSON object with image_id and caption" in text
  assert "pairs.jsonl line 3: not a JSON object with image_id and caption" in text
  assert "pairs.jsonl line 4: empty caption" in text


def test_beam_pipeline_options_as_tfds_build_takes_them():
  default = build_lib.pipeline_options("").get_all_options()
  assert (default["runner"], default["direct_num_workers"], default["direct_running_mode"]) == (
      "DirectRunner", 1, "in_memory")
  two = build_lib.pipeline_options(
      "direct_num_workers=2, direct_running_mode=multi_processing").get_all_options()
  assert (two["direct_num_workers"], two["direct_running_mode"]) == (2, "multi_processing")
  flink = build_lib.pipeline_options(
      "--runner=PortableRunner --environment_type=PROCESS "
      "--environment_config='{\"command\": \"/opt/beam/boot\", \"os\": \"linux\"}'"
  ).get_all_options()
  assert flink["runner"] == "PortableRunner"
  assert json.loads(flink["environment_config"]) == {"command": "/opt/beam/boot", "os": "linux"}


def test_hand_split_flags_are_refused_in_one_line(tmp_path, vocab, capsys):
  with pytest.raises(SystemExit) as e:
    build_lib.main(["--name", "t", "--out_dir", str(tmp_path), "--regions", "r.tsv",
                    "--captions", "c.jsonl", "--vocab_file", vocab, "--num_shards", "2"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("imagebert-build: error: --num_shards: a build is no longer split over "
                        "machines by hand") and "\n" not in err
