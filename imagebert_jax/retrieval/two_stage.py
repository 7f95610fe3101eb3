"""Two-stage retrieval evaluation: contrastive embeddings rank every candidate, the cross-encoder
rescores each query's top K.

Stage one runs the encoder on one modality at a time (`ImageBert.image_embedding` over an image's
regions, `text_embedding` over a caption): N + C passes for N images and C captions, and their dot
products rank every candidate. Stage two scores with the cross-encoder only the pairs some query
keeps: each image's K best captions and each caption's K best images, at most (N + C) x K pairs
instead of N x C. A query's final ranking is its K candidates ordered by the cross-encoder, then
the other candidates in the first stage's order (with `model.retrieval_itc_weight` the rescored
candidates are ordered by the cross-encoder's logit plus that weight times the contrastive logit,
and the cross-encoder's own ranking is reported as `cross_encoder/...`); `eval.rerank_k = 0`
scores every pair instead
(evaluate.score_all, the paper's protocol). Either way the first stage's own Recall@K is reported
(`itc/...` in metrics.json) beside the final one, with the pairs the cross-encoder scored and the
time of each part.

Ranks count ties against the model, as in `evaluate.ranks`. With several protocols (COCO 5K and
1K), each fold selects its own candidates among its own images and captions.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from imagebert_jax.retrieval import evaluate as eval_lib
from imagebert_jax.retrieval import scoring
from imagebert_jax import parallel, paths

RERANK_CHUNKS = "rerank_chunks"


# ------------------------------------------------------------------------------------------------
# Ranks (NumPy).
# ------------------------------------------------------------------------------------------------
def top_k_masks(first: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(i2t, t2i) boolean [N, C]: each image's k best captions, each caption's k best images."""
  n, c = first.shape
  i2t = np.zeros((n, c), bool)
  t2i = np.zeros((n, c), bool)
  kc, kn = min(k, c), min(k, n)
  rows = np.argpartition(-first, kc - 1, axis=1)[:, :kc] if kc < c else np.tile(np.arange(c), (n, 1))
  i2t[np.arange(n)[:, None], rows] = True
  cols = np.argpartition(-first, kn - 1, axis=0)[:kn] if kn < n else np.tile(np.arange(n)[:, None], (1, c))
  t2i[cols, np.arange(c)[None, :]] = True
  return i2t, t2i


def two_stage_ranks(first: np.ndarray, second: np.ndarray, i2t_top: np.ndarray,
                    t2i_top: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(image->text rank per image, text->image rank per caption), 0-based, of the two-stage
  ranking: a query's candidates in its top set (`i2t_top` rows, `t2i_top` columns) come first,
  ordered by `second`; the others follow, ordered by `first`. `second` is read only inside the
  top sets. Ties count against the model."""
  n, c = first.shape
  # Non-finite scores rank last (evaluate.ranks): among the query's top set for `second`.
  first = np.where(np.isfinite(first), first, -np.inf)
  second = np.where(np.isfinite(second), second, -np.inf)
  own = caption_image[None, :] == np.arange(n)[:, None]
  wrong = ~own
  cols = np.arange(c)
  # Text -> image: each caption's rank of its image.
  val = np.where(t2i_top, second, first)
  right_top = t2i_top[caption_image, cols]
  right_val = val[caption_image, cols]
  ahead = (t2i_top & ~right_top[None, :]) | (
      (t2i_top == right_top[None, :]) & (val >= right_val[None, :]))
  t2i = np.sum(ahead & wrong, axis=0)
  # Image -> text: each image's best-placed own caption.
  val = np.where(i2t_top, second, first)
  best_top = np.any(own & i2t_top, axis=1)
  best_val = np.max(np.where(own & (i2t_top == best_top[:, None]), val, -np.inf), axis=1)
  ahead = (i2t_top & ~best_top[:, None]) | (
      (i2t_top == best_top[:, None]) & (val >= best_val[:, None]))
  i2t = np.sum(ahead & wrong, axis=1)
  return i2t, t2i


@dataclasses.dataclass
class Plan:
  """The candidate sets of every fold of every protocol, and the pairs they need scored."""

  protocols: list[str]
  folds: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]
  needed: np.ndarray  # [N, C] bool


def plan(first: np.ndarray, caption_image: np.ndarray, order: np.ndarray, spec: str,
         k: int) -> Plan:
  names = eval_lib.protocol_names(spec)
  needed = np.zeros(first.shape, bool)
  by_protocol = {}
  for p in names:
    entries = []
    for images, captions in eval_lib.fold_sets(first.shape[0], caption_image, order, p):
      i2t, t2i = top_k_masks(first[np.ix_(images, captions)], k)
      needed[np.ix_(images, captions)] |= i2t | t2i
      entries.append((images, captions, i2t, t2i))
    by_protocol[p] = entries
  return Plan(names, by_protocol, needed)


def plan_metrics(pl: Plan, first: np.ndarray, second: np.ndarray,
                 caption_image: np.ndarray) -> tuple[dict[str, float], dict[str, dict]]:
  """(metrics, by protocol) of the two-stage ranking, named as evaluate.all_protocol_metrics."""
  by_protocol = {}
  for p, entries in pl.folds.items():
    results = []
    for images, captions, i2t, t2i in entries:
      sub = np.ix_(images, captions)
      owner = eval_lib.fold_caption_image(images, captions, caption_image, first.shape[0])
      ranked = two_stage_ranks(first[sub], second[sub], i2t, t2i, owner)
      results.append(eval_lib.recall_from_ranks(*ranked))
    by_protocol[p] = {key: float(np.mean([r[key] for r in results])) for key in results[0]}
  metrics = dict(by_protocol[pl.protocols[0]])
  for p in pl.protocols[1:]:
    metrics.update({f"{p}/{key}": v for key, v in by_protocol[p].items()})
  return metrics, by_protocol


# ------------------------------------------------------------------------------------------------
# The split's embeddings and pair scores on the devices.
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _embedders(graphdef: Any, mesh, rules, pad_id: int, cls_sep: tuple[int, int], tile: int):
  """Jitted (images(params, arrays, i0), texts(params, arrays, j0)): embeddings of `tile`
  images or captions from i0 / j0 (indices past the end clamped), formed on the devices."""
  pair_spec = NamedSharding(mesh, parallel.logical_to_spec(("batch",), rules, mesh=mesh))

  def images(params, arrays, i0):
    feat, loc, nreg, _ = arrays
    idx = jax.lax.with_sharding_constraint(
        jnp.minimum(i0 + jnp.arange(tile), feat.shape[0] - 1), pair_spec)
    return scoring.image_embeddings(nnx.merge(graphdef, params), feat[idx], loc[idx], nreg[idx],
                                    cls_sep)

  def texts(params, arrays, j0):
    text = arrays[3]
    idx = jax.lax.with_sharding_constraint(
        jnp.minimum(j0 + jnp.arange(tile), text.shape[0] - 1), pair_spec)
    return scoring.text_embeddings(nnx.merge(graphdef, params), text[idx], pad_id)

  replicated = NamedSharding(mesh, P())
  return (jax.jit(images, out_shardings=replicated), jax.jit(texts, out_shardings=replicated))


def split_embeddings(params: Any, split: eval_lib.Split, graphdef: Any, mesh, rules, *,
                     pad_id: int, cls_sep: tuple[int, int],
                     tile: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """(image embeddings [N, E], caption embeddings [C, E]), float32, normalised."""
  tile = -(-tile // mesh.size) * mesh.size
  arrays = tuple(parallel.replicated_array(x, mesh) for x in (
      split.region_feat, split.region_loc, split.num_regions, split.text_ids))
  fns = _embedders(graphdef, mesh, rules, pad_id, tuple(cls_sep), tile)
  out = []
  for fn, n in zip(fns, (split.num_images, split.num_captions)):
    parts = []
    with jax.set_mesh(mesh), parallel.logical_rules(rules):
      for s in range(0, n, tile):
        parts.append(fn(params, arrays, jnp.int32(s)))
    out.append(np.concatenate([np.asarray(jax.device_get(x)) for x in parts])[:n])
  return out[0], out[1]


@functools.lru_cache(maxsize=8)
def _pair_scorer(graphdef: Any, mesh, rules, pad_id: int):
  """Jitted score(params, arrays, images [B], captions [B]) -> [B] matching logits."""
  pair_spec = NamedSharding(mesh, parallel.logical_to_spec(("batch",), rules, mesh=mesh))

  def score(params, arrays, img, cap):
    feat, loc, nreg, text = arrays
    img = jax.lax.with_sharding_constraint(img, pair_spec)
    cap = jax.lax.with_sharding_constraint(cap, pair_spec)
    return scoring.match_logits(nnx.merge(graphdef, params), text[cap], feat[img], loc[img],
                                nreg[img], pad_id)

  return jax.jit(score, out_shardings=NamedSharding(mesh, P()))


def score_pairs(params: Any, split: eval_lib.Split, pairs: np.ndarray, graphdef: Any, mesh,
                rules, out_dir: str, *, pad_id: int, batch: int, chunk: int,
                progress: bool = True) -> np.ndarray:
  """Cross-encoder logits of `pairs` [P, 2] (image, caption) in batches; finished chunks of
  `chunk` pairs are saved in `out_dir/rerank_chunks/`, so a preempted run resumes (chunks of
  other parameters or pairs are recomputed)."""
  batch = -(-batch // mesh.size) * mesh.size
  chunk = max(batch, chunk // batch * batch)
  arrays = tuple(parallel.replicated_array(x, mesh) for x in (
      split.region_feat, split.region_loc, split.num_regions, split.text_ids))
  jitted = _pair_scorer(graphdef, mesh, rules, pad_id)
  chunks_dir = paths.join(out_dir, RERANK_CHUNKS)
  paths.makedirs(chunks_dir)
  total = len(pairs)
  starts = list(range(0, total, chunk))
  done = eval_lib._finished_chunks(chunks_dir, starts, {
      "pairs": total, "chunk": chunk,
      "pairs_checksum": int(np.sum(pairs[:, 0].astype(np.int64) * 1_000_003 + pairs[:, 1])),
      "text_checksum": int(np.sum(split.text_ids, dtype=np.int64)),
      "params_checksum": eval_lib._checksum(params)})
  if done:
    logging.info("Resuming re-ranking: %d of %d chunks already scored", len(done), len(starts))
  left = sum(min(chunk, total - s) for s in starts if s not in done)
  bar = tqdm(total=total, initial=total - left, unit="pairs", unit_scale=True, desc="re-ranking",
             mininterval=2.0, smoothing=0.1, disable=not progress or jax.process_index() != 0)
  for s in starts:
    if s in done:
      continue
    rows = min(chunk, total - s)
    part = pairs[s:s + rows]
    padded = np.concatenate([part, np.repeat(part[-1:], (-rows) % batch, 0)])
    scores = []
    with jax.set_mesh(mesh), parallel.logical_rules(rules):
      for b in range(0, len(padded), batch):
        img = parallel.replicated_array(padded[b:b + batch, 0].astype(np.int32), mesh)
        cap = parallel.replicated_array(padded[b:b + batch, 1].astype(np.int32), mesh)
        scores.append(jitted(params, arrays, img, cap))
    block = np.concatenate([np.asarray(jax.device_get(x)) for x in scores])[:rows]
    if jax.process_index() == 0:
      paths.save_npy(eval_lib._chunk_path(chunks_dir, s), block.astype(np.float32))
    bar.update(rows)
  bar.close()
  parallel.barrier("rerank_chunks")
  if not starts:
    return np.zeros((0,), np.float32)
  return np.concatenate([paths.load_npy(eval_lib._chunk_path(chunks_dir, s)) for s in starts])


# ------------------------------------------------------------------------------------------------
# The evaluation.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
  scores: np.ndarray        # [N, C] the cross-encoder's logits; NaN where it scored nothing
  itc_scores: np.ndarray    # [N, C] the embeddings' dot products
  image_embeddings: np.ndarray  # [N, E] normalised
  metrics: dict[str, float]  # the final ranking's, then `itc/...`: the first stage's, and
  #                            `cross_encoder/...` (its logit alone) when the ranking adds the
  #                            contrastive logit (ModelConfig.retrieval_itc_weight)
  by_protocol: dict[str, dict[str, float]]
  itc_by_protocol: dict[str, dict[str, float]]
  extra: dict               # pairs scored, timings


def evaluate_split(params: Any, split: eval_lib.Split, graphdef: Any, mesh, rules, out_dir: str,
                   *, ids, ecfg) -> Result:
  """Both stages on a split, as `ecfg` (a stage's `eval` config) says."""
  rerank_k = int(ecfg.get("rerank_k", 0))
  t0 = time.time()
  img_emb, txt_emb = split_embeddings(params, split, graphdef, mesh, rules, pad_id=ids.pad_id,
                                      cls_sep=(ids.cls_id, ids.sep_id),
                                      tile=ecfg.tile_captions)
  first = img_emb @ txt_emb.T
  itc_metrics, itc_by_protocol = eval_lib.all_protocol_metrics(
      first, split.caption_image, split.source_order, ecfg.protocol)
  n_img, n_cap = first.shape
  if rerank_k:
    pl = plan(first, split.caption_image, split.source_order, ecfg.protocol, rerank_k)
    pairs = np.argwhere(pl.needed)
    t1 = time.time()
    values = score_pairs(params, split, pairs, graphdef, mesh, rules, out_dir,
                         pad_id=ids.pad_id, batch=ecfg.tile_images * ecfg.tile_captions,
                         chunk=ecfg.chunk_images * ecfg.tile_captions, progress=ecfg.progress)
    t2 = time.time()
    nonfinite = eval_lib.count_nonfinite(np.asarray(values), "cross-encoder")
    scores = np.full(first.shape, np.nan, np.float32)
    scores[pairs[:, 0], pairs[:, 1]] = values
    metrics_of = lambda s: plan_metrics(pl, first, s, split.caption_image)
    parallel.barrier("rerank_chunks_read")  # every process has read them: now they can go
    if jax.process_index() == 0:
      paths.rmtree(paths.join(out_dir, RERANK_CHUNKS))
    scored = len(pairs)
  else:
    t1 = time.time()
    scores = eval_lib.score_all(params, split, graphdef, mesh, rules, out_dir,
                                pad_id=ids.pad_id, tile_images=ecfg.tile_images,
                                tile_captions=ecfg.tile_captions,
                                chunk_images=ecfg.chunk_images, progress=ecfg.progress)
    t2 = time.time()
    parallel.barrier("chunks_read")  # before process 0's write_results removes them
    nonfinite = eval_lib.count_nonfinite(scores, "cross-encoder")
    metrics_of = lambda s: eval_lib.all_protocol_metrics(s, split.caption_image,
                                                         split.source_order, ecfg.protocol)
    scored = n_img * n_cap
  # The ranking score: the cross-encoder's logit, plus the contrastive logit when the model says
  # so (ModelConfig.retrieval_itc_weight; NaN, not scored, stays NaN), and then the
  # cross-encoder's own ranking beside it.
  cosine_weight = float(jax.device_get(nnx.merge(graphdef, params).retrieval_cosine_weight()))
  metrics, by_protocol = metrics_of(scores + cosine_weight * first if cosine_weight else scores)
  cross_metrics = metrics_of(scores)[0] if cosine_weight else {}
  t3 = time.time()
  metrics = {**metrics, **{f"itc/{key}": v for key, v in itc_metrics.items()},
             **{f"cross_encoder/{key}": v for key, v in cross_metrics.items()}}
  extra = {"rerank_k": rerank_k, "pairs_scored": int(scored), "all_pairs": int(n_img * n_cap),
           "itc_weight_per_cosine": round(cosine_weight, 4),
           "nonfinite_scores": nonfinite,
           "pair_reduction": round(n_img * n_cap / max(scored, 1), 2),
           "seconds_itc": round(t1 - t0, 2), "seconds_cross_encoder": round(t2 - t1, 2),
           "seconds_metrics": round(t3 - t2, 2)}
  logging.info("First stage %.1fs; cross-encoder on %s of %s pairs %.1fs", t1 - t0,
               f"{scored:,}", f"{n_img * n_cap:,}", t2 - t1)
  return Result(scores, first.astype(np.float32), img_emb, metrics, by_protocol, itc_by_protocol,
                extra)


def write_itc_scores(out_dir: str, itc_scores: np.ndarray) -> None:
  if jax.process_index() == 0:
    paths.save_npy(paths.join(out_dir, "itc_scores.npy"), itc_scores.astype(np.float32))
