"""Two-stage retrieval evaluation: ranks against sorting and a hand-worked case, protocol folds,
resumable pair scoring, and the evaluation stage on the demo's smoke run against the all-pairs
scores and embeddings computed through the Python API."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import PAD, TINY, random_batch
from imagebert_jax import parallel
from imagebert_jax.config import defaults as config_defaults
from imagebert_jax.data import splits
from imagebert_jax.retrieval import evaluate
from imagebert_jax.training import train
from imagebert_jax.retrieval import two_stage
from imagebert_jax.training import state as state_lib

RULES = parallel.rules_from_config(config_defaults.DEFAULT_RULES)


def sorted_ranks(first, second, k, owner):
  """Reference: every query sorts its candidates by (in its k best by `first`, score), where the
  score is `second` inside the k best and `first` outside; the rank is the place of the first
  right candidate."""
  n, c = first.shape
  t2i = []
  for j in range(c):
    top = set(np.argsort(-first[:, j])[:k].tolist())
    order = sorted(range(n), reverse=True,
                   key=lambda i: (i in top, second[i, j] if i in top else first[i, j]))
    t2i.append(order.index(owner[j]))
  i2t = []
  for i in range(n):
    top = set(np.argsort(-first[i])[:k].tolist())
    order = sorted(range(c), reverse=True,
                   key=lambda j: (j in top, second[i, j] if j in top else first[i, j]))
    i2t.append(min(order.index(j) for j in range(c) if owner[j] == i))
  return np.array(i2t), np.array(t2i)


def test_hand_worked_three_by_three():
  # Caption j belongs to image j. Pairs no query keeps hold 99: they must never be read.
  first = np.array([[0.9, 0.2, 0.5],
                    [0.8, 0.7, 0.1],
                    [0.1, 0.6, 0.3]])
  second = np.array([[1.0, 99., 2.0],
                     [3.0, 0.5, 99.],
                     [99., 1.0, 1.5]])
  owner = np.arange(3)
  # K = 2: captions' candidates {0,1}, {1,2}, {0,2}; images' {0,2}, {0,1}, {1,2}: 6 pairs.
  i2t_top, t2i_top = two_stage.top_k_masks(first, 2)
  assert (i2t_top | t2i_top).sum() == 6 and not (i2t_top | t2i_top)[[0, 1, 2], [1, 2, 0]].any()
  i2t, t2i = two_stage.two_stage_ranks(first, second, i2t_top, t2i_top, owner)
  # Caption 0: image 1 (3.0) beats image 0 (1.0); caption 1: image 2 (1.0) beats 1 (0.5);
  # caption 2: image 0 (2.0) beats 2 (1.5). Image 0: caption 2 (2.0) beats 0 (1.0); image 1:
  # caption 0 (3.0) beats 1 (0.5); image 2: caption 2 (1.5) beats 1 (1.0).
  np.testing.assert_array_equal(t2i, [1, 1, 1])
  np.testing.assert_array_equal(i2t, [1, 1, 0])
  # K = 1: a right candidate outside the top one comes after it, then by the first stage.
  i2t, t2i = two_stage.two_stage_ranks(first, second, *two_stage.top_k_masks(first, 1), owner)
  np.testing.assert_array_equal(t2i, [0, 0, 1])
  np.testing.assert_array_equal(i2t, [0, 1, 1])


def test_ranks_match_sorting_and_both_limits():
  rng = np.random.default_rng(0)
  owner = np.repeat(np.arange(9), 3)
  first, second = rng.normal(size=(2, 9, 27))
  for k in (1, 2, 5, 9):
    i2t_top, t2i_top = two_stage.top_k_masks(first, k)
    assert (i2t_top.sum(1) == k).all() and (t2i_top.sum(0) == min(k, 9)).all()
    got = two_stage.two_stage_ranks(first, second, i2t_top, t2i_top, owner)
    for g, w in zip(got, sorted_ranks(first, second, k, owner)):
      np.testing.assert_array_equal(g, w)
  # Every candidate rescored: the cross-encoder's own ranks; none: the first stage's.
  everything = np.ones((9, 27), bool)
  for g, w in zip(two_stage.two_stage_ranks(first, second, everything, everything, owner),
                  evaluate.ranks(second, owner)):
    np.testing.assert_array_equal(g, w)
  for g, w in zip(two_stage.two_stage_ranks(first, second, ~everything, ~everything, owner),
                  evaluate.ranks(first, owner)):
    np.testing.assert_array_equal(g, w)


def test_folds_choose_candidates_among_their_own_images():
  rng = np.random.default_rng(1)
  n = 1100
  owner = np.arange(n)
  first, second = rng.normal(size=(2, n, n)).astype(np.float32)
  order = rng.permutation(n)
  plan = two_stage.plan(first, owner, order, "first1k", 1000)
  fold = order[:1000]
  inside = np.zeros((n, n), bool)
  inside[np.ix_(fold, fold)] = True
  assert plan.needed[inside].all() and not plan.needed[~inside].any()
  got, _ = two_stage.plan_metrics(plan, first, second, owner)
  assert got == pytest.approx(evaluate.protocol_metrics(second, owner, order, "first1k"))
  plan = two_stage.plan(first, owner, order, "full,first1k", 3)
  assert plan.needed.sum() <= (n + n) * 3 + (1000 + 1000) * 3
  metrics, by_protocol = two_stage.plan_metrics(plan, first, second, owner)
  assert list(by_protocol) == ["full", "first1k"] and "first1k/rsum" in metrics


def test_pair_scores_match_the_model_and_resume(tmp_path):
  rng = np.random.default_rng(3)
  b = random_batch(rng, 5, TINY)
  texts = random_batch(rng, 10, TINY)["text_ids"]
  split = evaluate.Split(b["region_feat"].astype(np.float16), b["region_loc"], b["num_regions"],
                         texts, np.repeat(np.arange(5), 2).astype(np.int32),
                         [str(i) for i in range(5)], np.arange(5))
  mesh = parallel.make_mesh((-1, 1, 1))
  graphdef, params = state_lib.create_params(TINY, mesh, RULES, seed=0)
  pairs = np.array([[0, 3], [4, 9], [2, 2], [1, 0], [3, 7], [0, 0], [4, 1]])
  kw = dict(pad_id=PAD, batch=8, chunk=8, progress=False)
  got = two_stage.score_pairs(params, split, pairs, graphdef, mesh, RULES, str(tmp_path), **kw)
  model = nnx.merge(graphdef, jax.device_get(params))
  for (i, j), value in list(zip(pairs, got))[:4]:
    mask = np.arange(TINY.max_regions)[None] < split.num_regions[i]
    want = model(jnp.asarray(texts[j:j + 1]), jnp.asarray(texts[j:j + 1] != PAD),
                 jnp.asarray(split.region_feat[i:i + 1].astype(np.float32)),
                 jnp.asarray(split.region_loc[i:i + 1]), jnp.asarray(mask))
    assert value == pytest.approx(float(want[0]), abs=1e-5)
  # Chunks of 8 pairs: 16 pairs make two. A preempted run kept chunk 0 (marked) and lost 1.
  more = np.concatenate([pairs, pairs + [[0, 1]], pairs[:2]])
  chunks = tmp_path / "more"
  first = two_stage.score_pairs(params, split, more, graphdef, mesh, RULES, str(chunks), **kw)
  np.save(chunks / two_stage.RERANK_CHUNKS / "rows-0000000.npy", np.full(8, 7.0, np.float32))
  os.remove(chunks / two_stage.RERANK_CHUNKS / "rows-0000008.npy")
  again = two_stage.score_pairs(params, split, more, graphdef, mesh, RULES, str(chunks), **kw)
  assert (again[:8] == 7.0).all()
  np.testing.assert_allclose(again[8:], first[8:], atol=1e-6)


def test_negative_rerank_k_is_refused(demo_smoke_run, tmp_path):
  config = _evaluation_config(demo_smoke_run, rerank_k=-1)
  with pytest.raises(ValueError, match=r"config.stages.two_stage.evals.retrieval.rerank_k=-1"):
    train.train_and_evaluate(config, str(tmp_path))


def _evaluation_config(demo_smoke_run, rerank_k):
  config, workdir, _ = demo_smoke_run
  config = config.copy_and_resolve_references()
  config.unlock()
  data = config_defaults.data_default(directory=os.path.join(workdir, "synthetic_data"),
                                      eval_split="test")
  # The fine-tuning's best validated checkpoint: what its own evaluation and the API load.
  stage = config_defaults.evaluate_stage(
      data, checkpoint=os.path.join(workdir, "finetune", "best_checkpoint"))
  stage.evals.retrieval.update(dict(tile_images=4, tile_captions=32, chunk_images=4,
                                    progress=False, rerank_k=rerank_k))
  config.stages = ml_collections.ConfigDict({"two_stage": stage})
  config.run = "two_stage"
  return config


def test_evaluation_stage_in_two_stages(demo_smoke_run, tmp_path):
  from imagebert_jax.retrieval.inference import TrainedModel
  from imagebert_jax.data.pipeline import split_records
  _, demo, _ = demo_smoke_run
  k = 3
  result = train.train_and_evaluate(_evaluation_config(demo_smoke_run, k), str(tmp_path))
  out = tmp_path / "two_stage"
  with open(out / "metrics.json") as f:
    m = json.load(f)
  # Independent references: the embeddings through the Python API, and the cross-encoder on
  # every pair from the demo's own all-pairs evaluation of the same checkpoint.
  model = TrainedModel.load(os.path.join(demo, "finetune"), batch_size=64)
  records = list(split_records(os.path.join(demo, "synthetic_data"), "test"))
  owner = np.load(os.path.join(demo, "finetuned", "caption_image.npy"))
  split = splits.load_split(os.path.join(demo, "synthetic_data"), "test",
                            max_text_len=model.cfg.max_text_len,
                            max_regions=model.cfg.max_regions, pad_id=model.ids.pad_id,
                            sep_id=model.ids.sep_id)
  itc = model.embed_images(records) @ model.embed_texts(split.text_ids).T
  cross = np.load(os.path.join(demo, "finetuned", "scores.npy"))
  n, c = itc.shape
  np.testing.assert_allclose(np.load(out / "itc_scores.npy"), itc, atol=1e-5)
  # The pairs scored: each caption's k best images and each image's k best captions.
  keep = np.zeros((n, c), bool)
  keep[np.argsort(-itc, axis=0)[:k], np.arange(c)[None, :]] = True
  keep[np.arange(n)[:, None], np.argsort(-itc, axis=1)[:, :k]] = True
  assert m["pairs_scored"] == keep.sum() <= (n + c) * k
  assert m["all_pairs"] == n * c and m["rerank_k"] == k
  scores = np.load(out / "scores.npy")
  np.testing.assert_array_equal(np.isfinite(scores), keep)
  np.testing.assert_allclose(scores[keep], cross[keep], atol=1e-4)
  # Recall of the two-stage ranking and of the first stage alone.
  i2t, t2i = sorted_ranks(itc, cross, k, owner)
  for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10"):
    assert m[key] == pytest.approx(100 * np.mean(i2t < int(key.split("@")[1])))
  for key in ("t2i_R@1", "t2i_R@5", "t2i_R@10"):
    assert m[key] == pytest.approx(100 * np.mean(t2i < int(key.split("@")[1])))
  for key, value in evaluate.recall(itc, owner).items():
    assert m[f"itc/{key}"] == pytest.approx(value)
  for key in ("seconds_itc", "seconds_cross_encoder", "seconds"):
    assert m[key] >= 0
  assert result["two_stage"]["metrics"]["rsum"] == m["rsum"]
  assert not (out / two_stage.RERANK_CHUNKS).exists()
  # The zero-shot evaluation of the pretraining checkpoint: every pair, as before, with the
  # first stage reported beside it.
  with open(os.path.join(demo, "zero_shot", "metrics.json")) as f:
    zero = json.load(f)
  zero_scores = np.load(os.path.join(demo, "zero_shot", "scores.npy"))
  assert zero["pairs_scored"] == zero["all_pairs"] == zero_scores.size
  for key, value in evaluate.recall(zero_scores, owner).items():
    assert zero[key] == pytest.approx(value)
  zero_itc = np.load(os.path.join(demo, "zero_shot", "itc_scores.npy"))
  for key, value in evaluate.recall(zero_itc, owner).items():
    assert zero[f"itc/{key}"] == pytest.approx(value)


def test_ranking_adds_the_contrastive_logit_when_the_model_says_so(demo_smoke_run, tmp_path):
  """model.retrieval_itc_weight = 0.5: the rescored candidates are ordered by the cross-encoder's
  logit + 0.5 x scale x cosine; the cross-encoder's own ranking is still reported."""
  from imagebert_jax.retrieval.inference import TrainedModel
  _, demo, _ = demo_smoke_run
  k, weight = 4, 0.5
  config = _evaluation_config(demo_smoke_run, k)
  config.model.retrieval_itc_weight = weight
  train.train_and_evaluate(config, str(tmp_path))
  out = tmp_path / "two_stage"
  with open(out / "metrics.json") as f:
    m = json.load(f)
  model = TrainedModel.load(os.path.join(demo, "finetune"), batch_size=64)
  scale = float(nnx.merge(model.graphdef, model.params).itc_scale())
  owner = np.load(os.path.join(demo, "finetuned", "caption_image.npy"))
  cross = np.load(os.path.join(demo, "finetuned", "scores.npy"))  # every pair, weight 0
  itc = np.load(out / "itc_scores.npy")
  assert m["itc_weight_per_cosine"] == pytest.approx(weight * scale, rel=1e-3)
  for name, second in (("", cross + weight * scale * itc), ("cross_encoder/", cross)):
    i2t, t2i = sorted_ranks(itc, second, k, owner)
    for d, ranks in (("i2t", i2t), ("t2i", t2i)):
      for r in (1, 5, 10):
        assert m[f"{name}{d}_R@{r}"] == pytest.approx(100 * np.mean(ranks < r))
  # The API ranks the same way when its model carries the weight.
  model.itc_weight = weight * scale
  split = splits.load_split(os.path.join(demo, "synthetic_data"), "test",
                            max_text_len=model.cfg.max_text_len,
                            max_regions=model.cfg.max_regions, pad_id=model.ids.pad_id,
                            sep_id=model.ids.sep_id)
  from imagebert_jax.data.pipeline import split_records
  gallery = model.image_gallery(list(split_records(os.path.join(demo, "synthetic_data"), "test")))
  hits = model.rank_images(split.text_ids[:5], gallery, k=k, rerank_k=k)
  for q in range(5):
    top = np.argsort(-itc[:, q])[:k]
    want = sorted(top.tolist(), key=lambda i: -(cross[i, q] + weight * scale * itc[i, q]))
    assert [h.index for h in hits[q]] == want


def test_api_ranking_with_a_contrastive_weight_by_hand():
  from imagebert_jax.retrieval.inference import two_stage_rank
  first = np.array([[0.9, 0.5, 0.1, 0.0]], np.float32)  # candidates 0, 1, 2 rescored
  cross = lambda q, j: np.array([0.0, 0.3, 0.2], np.float32)[j]
  plain = two_stage_rank(first, cross, k=4, rerank_k=3)[0]
  assert [h.index for h in plain] == [1, 2, 0, 3]  # by the logit: 0.3, 0.2, 0.0
  fused = two_stage_rank(first, cross, k=4, rerank_k=3, itc_weight=1.0)[0]
  assert [h.index for h in fused] == [0, 1, 2, 3]  # 0.9, 0.8, 0.3; then the first stage
  assert [h.score for h in fused[:3]] == pytest.approx([0.0, 0.3, 0.2])
