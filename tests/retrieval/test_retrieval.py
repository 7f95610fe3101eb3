"""Retrieval: the fine-tuning losses and mining, Recall@K, and all-pairs scoring with resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import PAD, TINY, random_batch
from imagebert_jax import parallel
from imagebert_jax.config import defaults as config_defaults
from imagebert_jax.data import splits
from imagebert_jax.model import ModelConfig
from imagebert_jax.retrieval import evaluate
from imagebert_jax.training import state as state_lib
from imagebert_jax.objectives import retrieval as R

RULES = parallel.rules_from_config(config_defaults.DEFAULT_RULES)


# ---- Recall@K --------------------------------------------------------------------------------
def test_recall_hand_worked():
  # 3 images, 6 captions (two per image: 0,0,1,1,2,2).
  s = np.array([[0.9, 0.1, 0.8, 0.2, 0.3, 0.0],    # image 0: best own caption (0.9) ranks 1st
                [0.5, 0.4, 0.3, 0.45, 0.2, 0.1],   # image 1: own best 0.45 is beaten by 0.5 -> 2nd
                [0.7, 0.6, 0.9, 0.8, 0.1, 0.5]])   # image 2: own best 0.5 beaten by 4 -> 5th
  owner = np.array([0, 0, 1, 1, 2, 2])
  i2t, t2i = evaluate.ranks(s, owner)
  np.testing.assert_array_equal(i2t, [0, 1, 4])
  # caption 0: image 0 has 0.9, best -> 0; caption 1: 0.1 vs 0.4, 0.6 -> 2; caption 2: 0.3 vs
  # 0.8, 0.9 -> 2; caption 3: 0.45 vs 0.2, 0.8 -> 1; caption 4: 0.1 vs 0.3, 0.2 -> 2;
  # caption 5: 0.5 vs 0.0, 0.1 -> 0.
  np.testing.assert_array_equal(t2i, [0, 2, 2, 1, 2, 0])
  m = evaluate.recall(s, owner)
  assert m["i2t_R@1"] == pytest.approx(100 / 3) and m["i2t_R@5"] == 100.0
  assert m["t2i_R@1"] == pytest.approx(100 * 2 / 6) and m["t2i_R@5"] == 100.0
  assert m["rsum"] == pytest.approx(sum(v for k, v in m.items() if k != "rsum"))


def argsort_ranks(scores, owner):
  """An independent reference: sort every row and column."""
  i2t = []
  for i in range(scores.shape[0]):
    order = np.argsort(-scores[i])
    i2t.append(min(np.nonzero(owner[order] == i)[0]))
  t2i = [int(np.nonzero(np.argsort(-scores[:, j]) == owner[j])[0][0])
         for j in range(scores.shape[1])]
  return np.array(i2t), np.array(t2i)


def test_ranks_match_sorting_on_random_scores():
  rng = np.random.default_rng(0)
  owner = np.repeat(np.arange(40), 5)
  s = rng.normal(size=(40, 200))
  for got, want in zip(evaluate.ranks(s, owner), argsort_ranks(s, owner)):
    np.testing.assert_array_equal(got, want)


def folds_by_hand(s, owner, order, *, count, size, per_image):
  """Recall@K of each fold, built by hand: fold f holds images order[f * size:(f + 1) * size]
  and their captions, each caption's image renumbered by its place in the fold."""
  folds = []
  for f in range(count):
    imgs = order[size * f:size * (f + 1)]
    caps = np.concatenate([np.nonzero(owner == i)[0] for i in imgs])
    folds.append(evaluate.recall(s[np.ix_(imgs, caps)], np.repeat(np.arange(size), per_image)))
  return folds


def test_coco1k_is_the_mean_of_five_folds_in_source_order():
  rng = np.random.default_rng(1)
  n = 5000
  owner = np.repeat(np.arange(n), 2)
  s = rng.normal(size=(n, 2 * n)).astype(np.float32)
  s[owner, np.arange(2 * n)] += 3.0  # make it easy enough that recalls are not all tiny
  order = rng.permutation(n)
  got = evaluate.protocol_metrics(s, owner, order, "coco1k")
  folds = folds_by_hand(s, owner, order, count=5, size=1000, per_image=2)
  for k in got:
    assert got[k] == pytest.approx(np.mean([f[k] for f in folds]))
  with pytest.raises(ValueError, match="needs 5000 images"):
    evaluate.protocol_metrics(s[:100], owner[:200] % 100, order[:100], "coco1k")
  # COCO 5K and COCO 1K from the same scores: 5K under the plain names, 1K prefixed.
  both, by_protocol = evaluate.all_protocol_metrics(s, owner, order, "full, coco1k")
  assert list(by_protocol) == ["full", "coco1k"]
  whole = evaluate.recall(s, owner)
  for k in whole:
    assert both[k] == whole[k]
    assert both[f"coco1k/{k}"] == pytest.approx(np.mean([f[k] for f in folds]))
  assert both["coco1k/i2t_R@1"] > both["i2t_R@1"]  # 1K among fewer candidates: easier


def test_folds_protocol_is_the_mean_over_folds_of_the_given_size_in_source_order():
  rng = np.random.default_rng(11)
  n = 70  # 3 folds of 20 use the first 60 images in source order; the last 10 are left out
  owner = np.repeat(np.arange(n), 3)
  s = rng.normal(size=(n, 3 * n)).astype(np.float32)
  s[owner, np.arange(3 * n)] += 1.5
  order = rng.permutation(n)
  got = evaluate.protocol_metrics(s, owner, order, "3x20")
  folds = folds_by_hand(s, owner, order, count=3, size=20, per_image=3)
  for k in got:
    assert got[k] == pytest.approx(np.mean([f[k] for f in folds]))
  assert evaluate.protocol_folds("coco1k") == (5, 1000) and evaluate.protocol_images("3x20") == 60
  with pytest.raises(ValueError, match="needs 80 images"):
    evaluate.protocol_metrics(s, owner, order, "4x20")
  for bad in ("0x20", "3x", "x20", "3x20x2", "coco2k"):
    with pytest.raises(ValueError, match="unknown protocol"):
      evaluate.protocol_folds(bad)


def test_first1k_is_the_first_thousand_images_in_source_order():
  rng = np.random.default_rng(6)
  n = 1200
  owner = np.repeat(np.arange(n), 2)
  s = rng.normal(size=(n, 2 * n)).astype(np.float32)
  s[owner, np.arange(2 * n)] += 3.0
  order = rng.permutation(n)
  got = evaluate.protocol_metrics(s, owner, order, "first1k")
  imgs = order[:1000]
  caps = np.concatenate([np.nonzero(owner == i)[0] for i in imgs])
  want = evaluate.recall(s[np.ix_(imgs, caps)], np.repeat(np.arange(1000), 2))
  assert got == pytest.approx(want)
  assert got != pytest.approx(evaluate.recall(s[:1000, :2000], owner[:2000]))  # not the first rows
  with pytest.raises(ValueError, match="needs 1000 images"):
    evaluate.protocol_metrics(s[:999], owner[:1998], order[order < 999], "first1k")


def test_fold_order_and_caption_count_come_from_the_built_dataset(tmp_path):
  """A Karpathy file whose order differs from the region file's: the dataset built from them and
  loaded for evaluation puts the 1K folds in the caption file's order; images with more than
  five captions keep their first five (captions_per_image=5)."""
  from imagebert_jax.data import build as build_lib
  from imagebert_jax.data.regionfile import RegionFileWriter, RegionRecord
  from imagebert_jax.data.tokenizer import Tokenizer, special_ids, write_vocab
  rng = np.random.default_rng(7)
  words = ["a", "dog", "cat", "red", "on", "grass", "photo", "of", "the", "big"]
  vocab = str(tmp_path / "vocab.txt")
  write_vocab(vocab, words)
  n = 10
  json_order = [f"im{i}" for i in rng.permutation(n)]   # the caption file's order
  region_order = [f"im{i}" for i in rng.permutation(n)]  # the region file's order
  sentences = {im: [" ".join(rng.choice(words, 4)) for _ in range(7 if k == 3 else 5)]
               for k, im in enumerate(json_order)}
  with RegionFileWriter(str(tmp_path / "r.ibrf")) as w:
    for im in region_order:
      w.write(RegionRecord(image_id=im, image_w=10, image_h=10,
                           boxes=np.tile([[1.0, 1.0, 5.0, 5.0]], (2, 1)).astype(np.float32),
                           features=rng.normal(size=(2, 4)).astype(np.float16),
                           object_id=np.zeros(2, np.int32), object_conf=np.ones(2, np.float32)))
  (tmp_path / "karpathy.json").write_text(json.dumps({"images": [
      {"filename": f"{im}.jpg", "split": "test", "sentences": [{"raw": t} for t in sentences[im]]}
      for im in json_order]}))
  build_lib.build_dataset(build_lib.BuildSpec(
      name="k", out_dir=str(tmp_path / "data"), regions=[str(tmp_path / "r.ibrf")],
      captions=[str(tmp_path / "karpathy.json")], caption_source="karpathy", vocab_file=vocab,
      max_text_len=8, feature_dim=4, min_boxes=1, max_boxes=2))
  ids = special_ids(vocab)
  kw = dict(max_text_len=8, max_regions=2, pad_id=ids.pad_id, sep_id=ids.sep_id)
  split = splits.load_split(str(tmp_path / "data"), "test", captions_per_image=5, **kw)
  assert split.image_ids == region_order  # stored in the order the regions came
  assert [split.image_ids[i] for i in split.source_order] == json_order
  tok = Tokenizer(vocab, max_len=8)
  for i, im in enumerate(split.image_ids):
    got = split.text_ids[split.caption_image == i]
    assert len(got) == 5
    for row, sentence in zip(got, sentences[im][:5]):
      want = tok.encode(sentence)
      np.testing.assert_array_equal(row[:len(want)], want)
  assert splits.load_split(str(tmp_path / "data"), "test", **kw).num_captions == 52
  # Five folds of two images (COCO 1K's layout, smaller): the caption file's images 0-1, 2-3, ...
  scores = rng.normal(size=(n, split.num_captions))
  got = evaluate.protocol_metrics(scores, split.caption_image, split.source_order, "5x2")
  folds = []
  for f in range(5):
    imgs = [split.image_ids.index(im) for im in json_order[2 * f:2 * f + 2]]
    caps = np.concatenate([np.nonzero(split.caption_image == i)[0] for i in imgs])
    folds.append(evaluate.recall(scores[np.ix_(imgs, caps)], np.repeat([0, 1], 5)))
  for k in got:
    assert got[k] == pytest.approx(np.mean([m[k] for m in folds]))


# ---- Fine-tuning losses ----------------------------------------------------------------------
def test_group_losses_match_numpy():
  obj = R.RetrievalObjective(margin=0.2, num_candidates=3, num_hard=3)
  pos = np.array([2.0, 0.5])
  neg = np.array([[1.0, 1.5, -1.0], [0.7, 0.0, 3.0]])
  valid = np.array([[True, True, True], [True, True, False]])  # the 3.0 is not a negative
  got = R.group_losses(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(valid), obj)
  sig = lambda x: 1 / (1 + np.exp(-x))
  bce = -(np.log(sig(pos)).sum() + np.log(1 - sig(neg[valid])).sum()) / (2 + valid.sum())
  soft = np.mean([-pos[0] + np.log(np.exp([2.0, 1.0, 1.5, -1.0]).sum()),
                  -pos[1] + np.log(np.exp([0.5, 0.7, 0.0]).sum())])
  trip = np.mean([max(0, 0.2 - 2.0 + 1.5), max(0, 0.2 - 0.5 + 0.7)])
  np.testing.assert_allclose(got["bce"], bce, rtol=1e-5)
  np.testing.assert_allclose(got["softmax"], soft, rtol=1e-5)
  np.testing.assert_allclose(got["triplet"], trip, rtol=1e-5)
  np.testing.assert_allclose(got["rank1_accuracy"], 0.5)


def test_candidates_are_never_of_the_same_image():
  keys = jnp.asarray([5, 5, 7, 8, 8, 8, 9])
  idx, valid = R.candidates(jax.random.key(0), keys, 6)
  idx, valid = np.asarray(idx), np.asarray(valid)
  for i in range(7):
    chosen = idx[i][valid[i]]
    assert (np.asarray(keys)[chosen] != int(keys[i])).all()
    assert len(set(chosen)) == len(chosen)
  assert valid[0].sum() == 5 and valid[3].sum() == 4  # all the other images there are


class TableModel:
  """A stand-in cross-encoder: score = table[caption id, image id] (ids carried in the inputs)."""

  def __init__(self, table):
    self.table = jnp.asarray(table)

  def project_regions(self, feat, loc):  # an image's "embedding" is its id, carried along
    return feat

  def encode(self, text_ids, text_mask, feat, loc, region_mask, dropout_key=None, regions=None):
    return text_ids, (feat if regions is None else regions)

  def itm_logit(self, text_h, region_h, region_mask, text_mask=None):
    return self.table[text_h[:, 1], region_h[:, 0, 0].astype(jnp.int32)]


def test_mining_trains_on_the_hardest_candidates():
  b = 6
  rng = np.random.default_rng(2)
  table = rng.normal(size=(b, b)).astype(np.float32)
  batch = {"text_ids": jnp.asarray(np.stack([[2, i, 3] for i in range(b)]).astype(np.int32)),
           "region_feat": jnp.asarray(np.arange(b, dtype=np.float32)[:, None, None]
                                      * np.ones((1, 2, 1), np.float32)),
           "region_loc": jnp.zeros((b, 2, 5)), "num_regions": jnp.full((b,), 2, jnp.int32),
           "image_key": jnp.arange(b, dtype=jnp.int32)}
  obj = R.RetrievalObjective(pad_id=PAD, num_candidates=b - 1, num_hard=2, margin=0.2,
                             bce_weight=0.0, softmax_weight=0.0, triplet_weight=1.0)
  loss, _ = R.retrieval_loss(TableModel(table), batch, jax.random.key(0), obj)
  # With every other entry a candidate, the kept negatives are the 2 highest-scoring ones, so
  # the triplet term uses the hardest: caption j for image i is table[j, i].
  pos = np.diag(table)
  hardest_caption = np.array([max(table[j, i] for j in range(b) if j != i) for i in range(b)])
  hardest_image = np.array([max(table[i, j] for j in range(b) if j != i) for i in range(b)])
  want = 0.5 * (np.mean(np.maximum(0, 0.2 - pos + hardest_caption))
                + np.mean(np.maximum(0, 0.2 - pos + hardest_image)))
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_spatial_flips_are_scored_against_their_own_image():
  """Captions 0 and 1 are each other's spatial flip (their tokens an opposite pair): each is its
  image's foil for the other, scored table[flip, image]; the other captions have no foil."""
  b = 6
  table = np.random.default_rng(3).normal(size=(b, b)).astype(np.float32)
  model = TableModel(table)
  model.cfg = ModelConfig(vocab_size=b)
  batch = {"text_ids": jnp.asarray(np.stack([[2, i, 3] for i in range(b)]).astype(np.int32)),
           "region_feat": jnp.asarray(np.arange(b, dtype=np.float32)[:, None, None]
                                      * np.ones((1, 2, 1), np.float32)),
           "region_loc": jnp.zeros((b, 2, 5)), "num_regions": jnp.full((b,), 2, jnp.int32),
           "image_key": jnp.arange(b, dtype=jnp.int32)}
  obj = R.RetrievalObjective(pad_id=PAD, num_candidates=b - 1, num_hard=2, foil_share=1.0,
                             object_token_ids=(5,), spatial_opposite_ids=((0, 1),),
                             foil_spatial=True)
  obj.validate()
  _, m = R.retrieval_loss(model, batch, jax.random.key(0), obj)
  want = np.mean([table[0, 0] > table[1, 0], table[1, 1] > table[0, 1]])
  assert float(m["flip_accuracy"]) == want
  assert float(m["foil_accuracy"]) == want  # the flips are the only foils


# ---- All-pairs scoring -----------------------------------------------------------------------
def _split(rng, n_img=7, caps=3):
  b = random_batch(rng, n_img, TINY)
  text = np.concatenate([random_batch(rng, n_img, TINY)["text_ids"] for _ in range(caps)])
  owner = np.tile(np.arange(n_img), caps).astype(np.int32)
  return evaluate.Split(b["region_feat"].astype(np.float16), b["region_loc"], b["num_regions"],
                        text, owner, [str(i) for i in range(n_img)], np.arange(n_img))


def test_score_all_matches_pair_by_pair_and_resumes(tmp_path):
  rng = np.random.default_rng(3)
  split = _split(rng)
  mesh = parallel.make_mesh((-1, 1, 1))
  graphdef, params = state_lib.create_params(TINY, mesh, RULES, seed=0)
  out = str(tmp_path)
  scores = evaluate.score_all(params, split, graphdef, mesh, RULES, out, pad_id=PAD,
                              tile_images=2, tile_captions=8, chunk_images=4, progress=False)
  model = nnx.merge(graphdef, jax.device_get(params))
  n_cap = split.num_captions
  want = np.zeros((split.num_images, n_cap), np.float32)
  for i in range(split.num_images):
    mask = np.arange(TINY.max_regions)[None] < split.num_regions[i]
    feat = np.repeat(split.region_feat[i:i + 1].astype(np.float32), n_cap, 0)
    loc = np.repeat(split.region_loc[i:i + 1], n_cap, 0)
    want[i] = model(jnp.asarray(split.text_ids), jnp.asarray(split.text_ids != PAD),
                    jnp.asarray(feat), jnp.asarray(loc), jnp.asarray(np.repeat(mask, n_cap, 0)))
  np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)
  # A preempted run: chunk 0 (rows 0-3) is on disk, chunk 4 is not. Mark chunk 0 so we can tell
  # it was reused rather than recomputed.
  chunk0 = os.path.join(out, "chunks", "rows-0000000.npy")
  chunk4 = os.path.join(out, "chunks", "rows-0000004.npy")
  np.save(chunk0, np.full((4, n_cap), 7.0, np.float32))
  os.remove(chunk4)
  again = evaluate.score_all(params, split, graphdef, mesh, RULES, out, pad_id=PAD,
                             tile_images=2, tile_captions=8, chunk_images=4, progress=False)
  assert (again[:4] == 7.0).all()
  np.testing.assert_allclose(again[4:], want[4:], rtol=1e-4, atol=1e-5)


def test_write_results_files(tmp_path):
  rng = np.random.default_rng(4)
  split = _split(rng, n_img=3, caps=2)
  scores = rng.normal(size=(3, 6)).astype(np.float32)
  m = evaluate.recall(scores, split.caption_image)
  (tmp_path / "chunks").mkdir()
  np.save(tmp_path / "chunks" / "rows-0000000.npy", scores[:2])
  evaluate.write_results(str(tmp_path), scores, split, m, {"protocol": "full"})
  assert not (tmp_path / "chunks").exists()  # the finished evaluation leaves no partial state
  np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), scores)
  np.testing.assert_array_equal(np.load(tmp_path / "caption_image.npy"), split.caption_image)
  saved = json.loads((tmp_path / "metrics.json").read_text())
  assert saved["i2t_R@1"] == m["i2t_R@1"] and saved["protocol"] == "full"


def test_ties_count_against_the_model():
  owner = np.repeat(np.arange(20), 2)
  m = evaluate.recall(np.zeros((20, 40)), owner)
  assert m["rsum"] == 0.0  # a constant scorer retrieves nothing
  s = np.zeros((20, 40))
  s[owner, np.arange(40)] = 1.0  # the right pairs strictly best
  assert evaluate.recall(s, owner)["rsum"] == 600.0


def test_nonfinite_scores_rank_last():
  nan, inf = np.nan, np.inf
  s = np.array([[0.9, nan, 0.8, inf, 0.3, 0.0],
                [0.5, 0.4, nan, nan, 0.2, -inf],
                [inf, 0.6, 0.9, 0.8, nan, 0.5]])
  owner = np.array([0, 0, 1, 1, 2, 2])
  i2t, t2i = evaluate.ranks(s, owner)
  # image 0: its best is 0.9; the +inf of caption 3 ranks last, so nothing passes it -> 0.
  # image 1: both its captions are NaN, so all 4 wrong ones (even the -inf) tie or pass -> 4.
  # image 2: caption 4 is NaN, caption 5 is 0.5; 0.6, 0.9 and 0.8 pass it, the +inf does not.
  np.testing.assert_array_equal(i2t, [0, 4, 3])
  # caption 0: 0.9 vs 0.5 and +inf -> 0; captions 1-4 are NaN for their own image, so both other
  # images (whatever they score, -inf and +inf included) tie or pass -> 2; caption 5: 0.5 vs 0.0
  # and -inf -> 0.
  np.testing.assert_array_equal(t2i, [0, 2, 2, 2, 2, 0])
  assert evaluate.count_nonfinite(s) == 7


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nonfinite_score_matrix_retrieves_nothing(bad, caplog):
  owner = np.repeat(np.arange(20), 5)
  s = np.full((20, 100), bad)
  assert evaluate.recall(s, owner)["rsum"] == 0.0
  # One right pair finite, the rest of the matrix bad: that image and caption are found.
  s[3, 15] = 0.5
  m = evaluate.recall(s, owner)
  assert m["i2t_R@1"] == 100 / 20 and m["t2i_R@1"] == 100 / 100
  with caplog.at_level("WARNING"):
    assert evaluate.count_nonfinite(s, "[test]") == 20 * 100 - 1
  assert "[test]: 1,999 of 2,000 scores are not finite" in caplog.text
  caplog.clear()
  assert evaluate.count_nonfinite(np.zeros((3, 3))) == 0
  assert not caplog.records


def test_chunks_of_another_evaluation_are_not_reused(tmp_path):
  rng = np.random.default_rng(5)
  split = _split(rng)
  mesh = parallel.make_mesh((-1, 1, 1))
  graphdef, params = state_lib.create_params(TINY, mesh, RULES, seed=0)
  kw = dict(pad_id=PAD, tile_images=2, tile_captions=8, chunk_images=4, progress=False)
  first = evaluate.score_all(params, split, graphdef, mesh, RULES, str(tmp_path), **kw)
  # Other parameters: the saved chunks must not be taken for theirs.
  _, other = state_lib.create_params(TINY, mesh, RULES, seed=1)
  second = evaluate.score_all(other, split, graphdef, mesh, RULES, str(tmp_path), **kw)
  assert not np.allclose(first, second)
  # They are what a fresh scoring of those parameters, in an empty folder, gives.
  fresh = evaluate.score_all(other, split, graphdef, mesh, RULES, str(tmp_path / "fresh"), **kw)
  np.testing.assert_array_equal(second, fresh)
