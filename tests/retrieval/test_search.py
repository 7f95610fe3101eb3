"""`python -m imagebert_jax.retrieval.search` end to end: real photographs (scikit-image's samples) through a
randomly initialised detector, the same photos as region files, and a dataset split; the results
against the model's own scores and the all-pairs evaluation; the HTML report in headless Chromium
(no console errors, the expected results with their images)."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from browser import Browser, find_chromium
from imagebert_jax.retrieval import search
from imagebert_jax.detector import export_state_dict, init_params, tiny_config
from imagebert_jax.retrieval.inference import TrainedModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")


@pytest.fixture(scope="module")
def demo(demo_smoke_run):
  return demo_smoke_run[1]


@pytest.fixture(scope="module")
def model(demo):
  return TrainedModel.load(os.path.join(demo, "finetune"), batch_size=16)


@pytest.fixture(scope="module")
def detector(tmp_path_factory, model):
  """A tiny detector of the real architecture with random weights, whose region features have
  the model's dimension: (config file, weights file)."""
  dim = model.cfg.region_feature_dim
  assert dim % 8 == 0, "the tiny detector's features are 8 x res2_channels wide"
  cfg = tiny_config(res2_channels=dim // 8)
  assert cfg.feature_dim == dim
  base = tmp_path_factory.mktemp("detector")
  with open(base / "weights.pkl", "wb") as f:
    pickle.dump({"model": export_state_dict(init_params(cfg, seed=0), cfg)}, f)
  (base / "config.json").write_text(json.dumps(cfg.to_dict()))
  return str(base / "config.json"), str(base / "weights.pkl")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """scikit-image's sample photographs (shipped in its package), one of them in a subfolder and
  one turned to portrait."""
  import skimage
  source = os.path.join(os.path.dirname(skimage.__file__), "data")
  folder = tmp_path_factory.mktemp("photos")
  (folder / "more").mkdir()
  for name in PHOTOS[:-1]:
    shutil.copy(os.path.join(source, name), folder / name)
  shutil.copy(os.path.join(source, PHOTOS[-1]), folder / "more" / PHOTOS[-1])
  with Image.open(os.path.join(source, "coffee.png")) as im:
    im.transpose(Image.Transpose.ROTATE_90).save(folder / "more" / "coffee_portrait.jpg")
  return folder


@pytest.fixture(scope="module")
def browser():
  if find_chromium() is None:
    pytest.skip("chromium is not installed (.ci/run installs it)")
  with Browser() as b:
    yield b


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory, demo, detector, photos):
  """An index of the photos built in two runs (the first stopped after 2 images)."""
  index = str(tmp_path_factory.mktemp("photo_index") / "index")
  args = ["index", "--model", os.path.join(demo, "finetune"), "--index", index, "--images",
          str(photos), "--detector_config", detector[0], "--detector_weights", detector[1],
          "--part_size", "2", "--batch_size", "8", "--detector_batch_size", "2",
          "--no_progress"]
  first = search.main(args + ["--max_images", "2"])
  second = search.main(args)
  return index, first, second


def _ids(photos):
  return sorted(os.path.relpath(os.path.join(d, f), photos).replace(os.sep, "/")
                for d, _, files in os.walk(photos) for f in files)


def test_photo_index_builds_and_resumes(photo_index, photos, model):
  index, first, second = photo_index
  assert first["written"] == 2 and first["already"] == 0
  assert second["written"] == 4 and second["already"] == 2 and not second["skipped"]
  data = search.Index(index).load()
  assert sorted(data.image_ids) == _ids(photos) and len(set(data.image_ids)) == 6
  manifest = json.loads((search.Index(index).manifest_path).read_text())
  assert manifest["model"]["config_digest"] == model.config_digest
  assert manifest["model"]["weights_digest"] == model.weights_digest
  assert manifest["images"] == 6 and manifest["source"]["kind"] == "images"
  for i, ident in enumerate(data.image_ids):
    with Image.open(photos / ident) as im:
      assert (data.image_w[i], data.image_h[i]) == im.size
    n = data.num_regions[i]
    assert 1 <= n <= model.cfg.max_regions
    boxes = data.boxes[i, :n]
    assert (boxes[:, 2] <= data.image_w[i] + 1e-3).all() and (boxes[:, 3] <= data.image_h[i]
                                                              + 1e-3).all()
  np.testing.assert_allclose(np.linalg.norm(data.embeddings, axis=1), 1.0, rtol=1e-5)


def test_region_files_of_the_same_photos_index_the_same(photo_index, photos, detector, demo,
                                                         tmp_path):
  """The extractor's region files (imagebert-extract) give the same regions and embeddings as
  the search command's own pass through the detector."""
  from imagebert_jax.detector import extract_features as tool
  out = tool.run(["--images", str(photos), "--weights", detector[1], "--config", detector[0],
                  "--output", str(tmp_path / "regions"), "--id_from", "relpath",
                  "--no_progress"])
  index = str(tmp_path / "index")
  search.main(["index", "--model", os.path.join(demo, "finetune"), "--index", index,
               "--regions", out["output"], "--image_root", str(photos), "--no_progress"])
  from_regions = search.Index(index).load()
  from_photos = search.Index(photo_index[0]).load()
  by_id = {os.path.splitext(i)[0]: n for n, i in enumerate(from_photos.image_ids)}
  assert sorted(from_regions.image_ids) == sorted(by_id)
  for a, ident in enumerate(from_regions.image_ids):
    b = by_id[ident]
    assert from_regions.paths[a] == str(photos / from_photos.image_ids[b])
    assert from_regions.num_regions[a] == from_photos.num_regions[b]
    np.testing.assert_allclose(from_regions.boxes[a], from_photos.boxes[b], atol=1e-3)
    np.testing.assert_allclose(from_regions.embeddings[a], from_photos.embeddings[b], atol=1e-5)


def _page_summary(page):
  return page.evaluate("""JSON.stringify([...document.querySelectorAll('section.query')].map(s => ({
    kind: s.dataset.kind,
    query: s.querySelector('h2').textContent,
    results: [...s.querySelectorAll('.result')].map(r => ({
      id: r.dataset.id,
      images: [...r.querySelectorAll('img')].map(i => i.complete && i.naturalWidth > 0),
      placeholders: r.querySelectorAll('.placeholder').length,
      boxes: r.querySelectorAll('svg rect').length})),
    queryImages: [...s.querySelectorAll('.query-image img')].map(
        i => i.complete && i.naturalWidth > 0)})))""")


def test_text_queries_json_and_report(photo_index, model, tmp_path, browser):
  index = photo_index[0]
  queries = ["a red motorcycle in a garage", "a cat with green eyes"]
  out = search.main(["query", "--index", index, "--query", queries[0], "--query", queries[1],
                     "--top_k", "4", "--rerank_k", "2", "--json", str(tmp_path / "r.json"),
                     "--html", str(tmp_path / "r.html"), "--boxes"])
  assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(out))
  data = search.Index(index).load()
  loc = data.locations()
  itc = model.embed_texts(queries) @ data.embeddings.T
  assert [q["query"] for q in out["queries"]] == queries
  for q, result in enumerate(out["queries"]):
    order = list(np.argsort(-itc[q], kind="stable"))
    assert [r["id"] for r in result["first_stage"]] == [data.image_ids[j] for j in order[:4]]
    top = order[:2]
    cross = model.score_pairs((data.region_feat[top], loc[top], data.num_regions[top]),
                              model.tokenize([queries[q]] * 2))
    want = [top[j] for j in np.argsort(-cross, kind="stable")] + order[2:4]
    assert [r["id"] for r in result["results"]] == [data.image_ids[j] for j in want]
    assert [r["rank"] for r in result["results"]] == [1, 2, 3, 4]
    for r, j in zip(result["results"], want):
      assert r["itc_score"] == pytest.approx(itc[q, j], abs=1e-5)
      assert r["itc_rank"] == order.index(j) + 1
      assert r["path"] == data.paths[j]
    assert sorted(r["score"] for r in result["results"][:2]) == pytest.approx(sorted(cross),
                                                                             abs=1e-5)
    assert [r["score"] for r in result["results"][2:]] == [None, None]
  assert out["timing"]["pairs_scored"] == 4
  # The report as a browser shows it.
  page = browser.load((tmp_path / "r.html").as_uri())
  assert page.console_errors() == []
  shown = json.loads(_page_summary(page))
  assert [s["query"] for s in shown] == queries
  regions = dict(zip(data.image_ids, data.num_regions))
  for s, result in zip(shown, out["queries"]):
    assert [r["id"] for r in s["results"]] == [r["id"] for r in result["results"]]
    for r in s["results"]:
      assert r["images"] == [True]  # the thumbnail, decoded
      assert r["boxes"] == regions[r["id"]]
  # The checkbox hides the boxes (the page's one script runs without errors).
  hidden = page.evaluate("document.getElementById('show-boxes').click(), "
                         "getComputedStyle(document.querySelector('.frame svg')).display")
  assert hidden == "none" and page.console_errors() == []
  page.close()


def test_image_queries_rank_the_texts_of_a_file(photo_index, photos, model, tmp_path, browser):
  index = photo_index[0]
  texts = ["a person in a space suit", "a cup of coffee", "# a comment line", "",
           "a cat lying down", "a rocket on a launch pad", "a red motorcycle"]
  (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
  kept = [t for t in texts if t and not t.startswith("#")]
  outside = tmp_path / "new_photo.png"
  shutil.copy(photos / "chelsea.png", outside)
  out = search.main(["query", "--index", index, "--image", "astronaut.png", "--image",
                     str(outside), "--texts", str(tmp_path / "texts.txt"), "--top_k", "3",
                     "--rerank_k", "5", "--html", str(tmp_path / "images.html")])
  assert len(out["queries"]) == 2
  data = search.Index(index).load()
  for result in out["queries"]:
    assert result["kind"] == "image" and len(result["results"]) == 3
    assert all(r["id"] in kept and r["score"] is not None for r in result["results"])
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True)
  # A new image file goes through the detector the index was built with: the same photo as
  # one already indexed ranks the texts the same way.
  chelsea = search.main(["query", "--index", index, "--image", "chelsea.png", "--texts",
                         str(tmp_path / "texts.txt"), "--top_k", "3", "--rerank_k", "5"])
  assert [r["id"] for r in chelsea["queries"][0]["results"]] == [
      r["id"] for r in out["queries"][1]["results"]]
  # The cross-encoder scores of the indexed image, from the API.
  i = data.image_ids.index("astronaut.png")
  want = model.score_pairs((data.region_feat[[i] * 5], data.locations()[[i] * 5],
                            data.num_regions[[i] * 5]), kept)
  for r in out["queries"][0]["results"]:
    assert r["score"] == pytest.approx(want[kept.index(r["id"])], abs=1e-5)
  page = browser.load((tmp_path / "images.html").as_uri())
  assert page.console_errors() == []
  shown = json.loads(_page_summary(page))
  assert [len(s["results"]) for s in shown] == [3, 3]
  assert [s["queryImages"] for s in shown] == [[True], [True]]
  page.close()


def _refused(argv, capsys) -> str:
  """search.main's one line on stderr for a refused command line (exit status 2)."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    search.main(argv)
  assert exit_.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines and lines[-1].startswith("imagebert-search: error: ")
  return lines[-1]


def test_another_model_is_refused(photo_index, demo, tmp_path, capsys):
  index = photo_index[0]
  assert "built with other weights of this model" in _refused(
      ["query", "--index", index, "--model", os.path.join(demo, "pretrain"), "--query", "a cat"],
      capsys)
  other = tmp_path / "finetune"
  shutil.copytree(os.path.join(demo, "finetune"), other)
  config = json.loads((other / "config.json").read_text())
  config["model"]["layer_norm_eps"] = 1e-6  # another model of the same shapes
  (other / "config.json").write_text(json.dumps(config))
  assert "was built with another model" in _refused(
      ["query", "--index", index, "--model", str(other), "--query", "a cat"], capsys)
  # Through the command itself: a non-zero exit and one line saying why, nothing else (the
  # libraries' INFO logs only with -v 1).
  def refused(*extra):
    return subprocess.run(
        [sys.executable, "-m", "imagebert_jax.retrieval.search", "query", "--index", index,
         "--model", os.path.join(demo, "pretrain"), "--query", "a cat", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  run = refused()
  assert run.returncode == 2
  lines = run.stderr.strip().splitlines()
  assert len(lines) <= 2, run.stderr  # at most the package's own "Loaded ..." before it
  assert lines[-1].startswith("imagebert-search: error: ")
  assert "built with other weights" in lines[-1]
  loud = refused("-v", "1")
  assert loud.stderr.strip().splitlines()[-1] == lines[-1]
  assert len(loud.stderr.strip().splitlines()) > len(lines)
  assert " INFO " in loud.stderr  # the libraries' logs, asked for


def test_dataset_split_end_to_end(demo, model, tmp_path, browser):
  from imagebert_jax.data import splits
  data_dir = os.path.join(demo, "synthetic_data")
  index = str(tmp_path / "index")
  summary = search.main(["index", "--model", os.path.join(demo, "finetune"), "--index", index,
                         "--dataset", data_dir, "--split", "test", "--no_progress"])
  split = splits.load_split(data_dir, "test", max_text_len=model.cfg.max_text_len,
                            max_regions=model.cfg.max_regions, pad_id=model.ids.pad_id,
                            sep_id=model.ids.sep_id)
  assert summary["images"] == split.num_images
  data = search.Index(index).load()
  assert data.image_ids == split.image_ids
  with open(os.path.join(data_dir, "source", "captions.jsonl")) as f:
    captions = [json.loads(line) for line in f]
  query = next(c["caption"] for c in captions if c["image_id"] == split.image_ids[7])
  out = search.main(["query", "--index", index, "--query", query, "--rerank_k", "0",
                     "--top_k", "5", "--html", str(tmp_path / "dataset.html")])
  # Every image scored by the cross-encoder: the order and scores of the all-pairs evaluation.
  column = int(np.nonzero((split.text_ids == model.tokenize([query])[0]).all(1))[0][0])
  scores = np.load(os.path.join(demo, "finetuned", "scores.npy"))[:, column]
  best = np.argsort(-scores, kind="stable")[:5]
  results = out["queries"][0]["results"]
  assert [r["id"] for r in results] == [split.image_ids[i] for i in best]
  np.testing.assert_allclose([r["score"] for r in results], scores[best], atol=1e-4)
  assert out["timing"]["pairs_scored"] == split.num_images
  page = browser.load((tmp_path / "dataset.html").as_uri())
  assert page.console_errors() == []
  shown = json.loads(_page_summary(page))
  assert [len(s["results"]) for s in shown] == [5]
  assert all(r["placeholders"] == 1 and r["images"] == [] for r in shown[0]["results"])
  page.close()


def test_the_checker_sees_console_errors_and_broken_images(tmp_path, browser):
  """The browser check is real: a page with an error, an exception and a broken image."""
  bad = tmp_path / "bad.html"
  bad.write_text('<!DOCTYPE html><html><body><section class="query"><h2>q</h2>'
                 '<div class="result" data-id="x"><img src="missing.png"></div></section>'
                 '<script>console.error("deliberate"); null.boom;</script></body></html>')
  page = browser.load(bad.as_uri())
  errors = page.console_errors()
  assert any("deliberate" in e for e in errors)
  assert any(e.startswith("exception:") for e in errors)
  assert any("missing.png" in e for e in errors)  # the failed load, from the log domain
  shown = json.loads(_page_summary(page))
  assert shown[0]["results"][0]["images"] == [False]
  page.close()


def test_command_lines_are_checked_before_anything_runs(capsys, tmp_path):
  """The command (index or query) and the flags of the other one, in one line each."""
  index = str(tmp_path / "index")
  assert "want one command, index or query" in _refused(["--index", index], capsys)
  assert "want one command, index or query" in _refused(["search", "--index", index], capsys)
  assert "query does not take --images, --part_size" in _refused(
      ["query", "--index", index, "--images", "x", "--part_size", "3"], capsys)
  assert "index does not take --top_k" in _refused(
      ["index", "--index", index, "--top_k", "3"], capsys)
  assert "--top_k" in _refused(["query", "--index", index, "--top_k", "0"], capsys)
  assert "--index" in _refused(["query", "--query", "a cat"], capsys)  # required
  assert not os.path.exists(index)
