"""The region-feature extractor (imagebert_jax.detector.extract_features, the command imagebert-extract)
end to end with a tiny random detector: output, the images split over JAX processes, resume,
bad images."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imagebert_jax.detector import extract_features as tool
from imagebert_jax.data.regionfile import read_region_file
from imagebert_jax.detector import export_state_dict, init_params, tiny_config
from imagebert_jax.errors import InputError

from helpers import free_port


def draw(path, seed, size):
  """An image of a few coloured rectangles; size is (width, height)."""
  rng = np.random.default_rng(seed)
  img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
  d = ImageDraw.Draw(img)
  for _ in range(4):
    x0, y0 = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
    d.rectangle([x0, y0, x0 + int(rng.integers(10, size[0] // 2)),
                 y0 + int(rng.integers(10, size[1] // 2))],
                fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
  img.save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny config file, its weights as a detectron2-style pickle, and an image folder."""
  base = tmp_path_factory.mktemp("extract")
  cfg = tiny_config()
  cfg_path = base / "tiny.json"
  cfg_path.write_text(json.dumps(cfg.to_dict()))
  weights = base / "tiny.pkl"
  with open(weights, "wb") as f:
    pickle.dump({"model": export_state_dict(init_params(cfg, seed=0), cfg),
                 "__author__": "test"}, f)
  images = base / "images"
  (images / "sub").mkdir(parents=True)
  sizes = {"a.jpg": (300, 200), "b.png": (330, 240), "sub/c.jpeg": (250, 180),
           "sub/d.jpg": (310, 210), "e.JPG": (280, 190)}
  for i, (name, size) in enumerate(sizes.items()):
    draw(images / name, i, size)
  (images / "notes.txt").write_text("not an image and not listed")
  return cfg, str(cfg_path), str(weights), images, sizes


def run_tool(setup, out, *extra):
  _, cfg_path, weights, images, _ = setup
  return tool.run(["--images", str(images), "--weights", weights, "--output", str(out),
                   "--config", cfg_path, "--no_progress", *extra])


def test_writes_region_records(setup, tmp_path):
  cfg, _, _, _, sizes = setup
  summary = run_tool(setup, tmp_path, "--class_probs", "--batch_size", "2")
  assert summary["written"] == 5 and not summary["skipped"]
  records = {r.image_id: r for r in read_region_file(summary["output"])}
  assert os.path.basename(summary["output"]) == "regions-00000-of-00001.ibrf"
  assert sorted(records) == ["a", "b", "c", "d", "e"]
  for name, (w, h) in sizes.items():
    r = records[os.path.splitext(os.path.basename(name))[0]]
    assert (r.image_w, r.image_h) == (w, h)
    assert cfg.min_boxes <= r.num_boxes <= cfg.max_boxes
    assert r.features.dtype == np.float16 and r.features.shape == (r.num_boxes, cfg.feature_dim)
    assert r.boxes.dtype == np.float32
    assert np.all(r.boxes >= 0) and np.all(r.boxes[:, [0, 2]] <= w)
    assert np.all(r.boxes[:, [1, 3]] <= h)
    assert np.all(r.boxes[:, 2] > r.boxes[:, 0]) and np.all(r.boxes[:, 3] > r.boxes[:, 1])
    assert np.all((r.object_id >= 0) & (r.object_id < cfg.num_classes))
    assert np.all((r.attr_id >= 0) & (r.attr_id < cfg.num_attributes))
    assert r.class_probs.shape == (r.num_boxes, cfg.num_classes)
    np.testing.assert_allclose(r.class_probs.max(-1), r.object_conf, rtol=1e-3)
  report = json.loads((tmp_path / "regions-00000-of-00001.skipped.json").read_text())
  assert report["count"] == 0


def test_two_jax_processes_split_the_images_and_resume(setup, tmp_path):
  """Two processes of a JAX multi-process run (the coordinator's address, the count and each
  one's id in the environment, as a launcher sets them) split the images, each writing its own
  file; stopped early and run again, they resume; their union is the one-process run's."""
  _, cfg_path, weights, images, _ = setup
  # A list file (relative paths, a comment, a blank line) instead of a folder.
  listing = images / "list.txt"
  listing.write_text("# my images\nsub/d.jpg\na.jpg\n\nb.png\nsub/c.jpeg\ne.JPG\n")
  common = ["--images", str(listing), "--weights", weights, "--config", cfg_path,
            "--no_progress", "--id_from", "relpath"]
  one = tool.run([*common, "--output", str(tmp_path / "one")])
  out = tmp_path / "two"
  for extra in (["--max_images", "1"], []):
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "imagebert_jax.detector.extract_features", *common,
         "--output", str(out), *extra],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
             "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(p)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in (0, 1)]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
  assert "1 already in" in logs[0] and "1 already in" in logs[1]  # the second run resumed
  assert sorted(os.listdir(out)) == ["regions-00000-of-00002.ibrf",
                                     "regions-00000-of-00002.skipped.json",
                                     "regions-00001-of-00002.ibrf",
                                     "regions-00001-of-00002.skipped.json"]
  ids = [[r.image_id for r in read_region_file(out / f"regions-0000{p}-of-00002.ibrf")]
         for p in (0, 1)]
  # Sorted paths: a.jpg b.png e.JPG sub/c.jpeg sub/d.jpg -> image i goes to process i % 2.
  assert ids == [["a", "e", "sub/d"], ["b", "sub/c"]]
  alone = {r.image_id: r for r in read_region_file(one["output"])}
  union = {r.image_id: r for p in (0, 1)
           for r in read_region_file(out / f"regions-0000{p}-of-00002.ibrf")}
  assert sorted(union) == sorted(alone)
  for key, r in union.items():
    np.testing.assert_array_equal(r.boxes, alone[key].boxes)
    np.testing.assert_array_equal(r.features, alone[key].features)
    np.testing.assert_array_equal(r.object_id, alone[key].object_id)


def test_hand_given_shards_are_refused(setup, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    run_tool(setup, tmp_path, "--num_shards", "2", "--shard_index", "1")
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("imagebert-extract: error: --shard_index: the images are split over the "
                        "processes of a JAX multi-process run") and "\n" not in err


def test_resumes_after_interruption(setup, tmp_path):
  first = run_tool(setup, tmp_path, "--max_images", "3")
  assert first["written"] == 3
  # Kill the writer mid-record: cut the last record's tail off.
  path = first["output"]
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  second = run_tool(setup, tmp_path)
  assert second["already_done"] == 2 and second["written"] == 3
  ids = [r.image_id for r in read_region_file(path)]
  assert sorted(ids) == ["a", "b", "c", "d", "e"]  # each exactly once
  third = run_tool(setup, tmp_path)
  assert third["written"] == 0 and third["already_done"] == 5


def test_skips_and_reports_bad_images(setup, tmp_path):
  _, _, _, images, _ = setup
  folder = tmp_path / "mixed"
  folder.mkdir()
  for name in ("a.jpg", "b.png"):
    (folder / name).write_bytes((images / name).read_bytes())
  draw(folder / "tall.jpg", 9, (180, 260))  # portrait: the second canvas
  (folder / "empty.jpg").write_bytes(b"")
  (folder / "text.png").write_text("this is not a png")
  Image.new("RGB", (600, 1), (90, 20, 200)).save(folder / "sliver.png")  # no feature cells
  out = tmp_path / "out"
  summary = tool.run(["--images", str(folder), "--weights", setup[2], "--output", str(out),
                      "--config", setup[1], "--no_progress"])
  assert summary["written"] == 3
  assert sorted(s["id"] for s in summary["skipped"]) == ["empty", "sliver", "text"]
  report = json.loads((out / "regions-00000-of-00001.skipped.json").read_text())
  assert report["count"] == 3
  assert sorted(os.path.basename(s["path"]) for s in report["images"]) == [
      "empty.jpg", "sliver.png", "text.png"]
  assert all(s["error"] for s in report["images"])
  records = {r.image_id: r for r in read_region_file(summary["output"])}
  assert sorted(records) == ["a", "b", "tall"]
  assert (records["tall"].image_w, records["tall"].image_h) == (180, 260)
  assert np.all(records["tall"].boxes[:, [1, 3]] <= 260)


def test_duplicate_ids_and_wrong_weights_fail_clearly(setup, tmp_path):
  folder = tmp_path / "dups"
  (folder / "x").mkdir(parents=True)
  draw(folder / "same.jpg", 1, (100, 80))
  draw(folder / "x" / "same.png", 2, (100, 80))
  with pytest.raises(InputError, match="both have id 'same'.*--id_from relpath"):
    tool.run(["--images", str(folder), "--weights", setup[2], "--output", str(tmp_path / "o"),
              "--config", setup[1]])
  # The tiny weights against the full-size default config: one message naming the problems.
  with pytest.raises(ValueError, match="do not match the detector config: .*missing keys"):
    tool.run(["--images", str(folder), "--weights", setup[2], "--output", str(tmp_path / "o"),
              "--id_from", "relpath"])


def test_extracted_regions_build_a_dataset(setup, tmp_path):
  """The tool's region files go straight into the dataset builder and the input pipeline."""
  from imagebert_jax.data import build as build_lib
  from imagebert_jax.data import pipeline
  from imagebert_jax.data.tokenizer import special_ids, write_vocab
  cfg = setup[0]
  summary = run_tool(setup, tmp_path / "regions", "--class_probs")
  vocab = str(tmp_path / "vocab.txt")
  write_vocab(vocab, ["a", "red", "box"])
  captions = tmp_path / "captions.jsonl"
  captions.write_text("".join(json.dumps({"image_id": i, "caption": "a red box"}) + "\n"
                              for i in "abcde"))
  info = build_lib.build_dataset(build_lib.BuildSpec(
      name="own", out_dir=str(tmp_path / "dataset"), regions=[summary["output"]],
      captions=[str(captions)], vocab_file=vocab, max_text_len=8,
      feature_dim=cfg.feature_dim, min_boxes=cfg.min_boxes, max_boxes=cfg.max_boxes,
      class_probs_dim=cfg.num_classes))
  assert info["splits"]["train"] == {"records": 5, "pairs": 5} and not info["skipped"]
  assert info["options"]["has_object_labels"]
  ids = special_ids(vocab)
  batch = next(pipeline.as_numpy(pipeline.eval_dataset(pipeline.PipelineConfig(
      data_dir=str(tmp_path / "dataset"), split="train", batch_size=5, max_text_len=8,
      max_regions=cfg.max_boxes, pad_id=ids.pad_id, sep_id=ids.sep_id))))
  assert batch["mask"].all()
  assert (batch["num_regions"] >= cfg.min_boxes).all()
  assert batch["region_feat"].shape[-1] == cfg.feature_dim
  assert (batch["region_loc"] >= 0).all() and (batch["region_loc"] <= 1).all()


def test_the_command_fails_in_one_line(setup, tmp_path, capsys):
  """A missing flag and a missing image folder: one line each, naming it, exit status 2."""
  for argv, named in ((["--images", str(tmp_path)], "--weights"),
                      (["--images", str(tmp_path / "none"), "--weights", setup[2],
                        "--output", str(tmp_path / "o")], "no such folder or list file")):
    with pytest.raises(SystemExit) as exit_:
      tool.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imagebert-extract: error: ") and named in err[0]
