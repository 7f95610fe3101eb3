"""The path layer (imagebert_jax/paths.py): bucket URLs are never made local folders, local files
keep plain Python's behaviour and are written whole. (tests/test_gcs.py runs it on a bucket.)"""

import os

import numpy as np
import pytest

from imagebert_jax import paths


def test_urls_stay_urls():
  assert paths.absolute("gs://b/runs/x/") == "gs://b/runs/x"
  assert paths.join("gs://b/runs", "x", "DONE.json") == "gs://b/runs/x/DONE.json"
  assert paths.dirname("gs://b/runs/x") == "gs://b/runs"
  assert paths.basename("gs://b/runs/x/") == "x"
  assert paths.relative_to("gs://b/photos/a/c.jpg", "gs://b/photos/") == "a/c.jpg"
  assert paths.is_url("s3://b/x") and not paths.is_url("/tmp/gs:x")
  with pytest.raises(ValueError):
    paths.relative_to("gs://b/other/c.jpg", "gs://b/photos")


def test_local_paths_as_python_has_them(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.absolute("runs/x") == os.path.join(str(tmp_path), "runs", "x")
  assert paths.join("runs", "x") == os.path.join("runs", "x")
  paths.makedirs("a/b/.hidden")
  for name in ("a/1.txt", "a/b/2.txt", "a/b/.hidden/3.txt", "a/.4.txt"):
    paths.write_text(name, name)
  assert paths.walk_files("a") == [os.path.join("a", "1.txt"), os.path.join("a", "b", "2.txt")]
  assert paths.glob("a/*.txt") == [os.path.join("a", "1.txt")]
  assert paths.listdir("a") == [".4.txt", "1.txt", "b"]
  assert paths.isdir("a/b") and paths.isfile("a/1.txt") and not paths.exists("a/5.txt")
  assert paths.getsize("a/1.txt") == len("a/1.txt")


def test_local_writes_are_whole_and_leave_nothing_beside(tmp_path):
  target = tmp_path / "DONE.json"
  paths.write_json(str(target), {"step": 1})
  paths.write_json(str(target), {"step": 2})
  assert paths.read_json(str(target)) == {"step": 2}
  paths.save_npy(str(tmp_path / "scores.npy"), np.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), np.arange(6.0).reshape(2, 3))
  assert sorted(os.listdir(tmp_path)) == ["DONE.json", "scores.npy"]


def test_text_reads_replace_bad_bytes_and_missing_files_are_named(tmp_path):
  (tmp_path / "captions.txt").write_bytes(b"a caf\xe9\nok\n")
  with paths.open(str(tmp_path / "captions.txt"), errors="replace") as f:
    assert list(f) == ["a caf\ufffd\n", "ok\n"]
  with pytest.raises(FileNotFoundError):
    paths.open(str(tmp_path / "missing.txt"))
  paths.rmtree(str(tmp_path / "nothing_here"))  # nothing to remove is not an error
  paths.remove(str(tmp_path / "missing.txt"))
