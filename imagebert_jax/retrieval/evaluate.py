"""All-pairs retrieval evaluation with the cross-encoder, and Recall@K.

Every (image, caption) pair of the split is scored by the matching head. The split's regions and
captions are put on the devices once; each step scores a tile of images x captions whose pairs are
formed by indexing on the device (pairs never exist on the host), with the pair dimension sharded
over all devices of all hosts. Rows of the score matrix are computed in chunks of images; each
finished chunk is saved, so a preempted evaluation resumes where it stopped.

Outputs in the evaluation's folder: `scores.npy` (images x captions, float32), `caption_image.npy`
(each caption's image index: the ground truth), `image_ids.json`, and `metrics.json` with R@1/5/10
both ways and RSUM for the chosen protocol, and the number of scores that were not finite
(`nonfinite_scores`; they rank last):
  image->text: an image's rank is the best rank among its captions;
  text->image: a caption's rank is the rank of its image.
Protocols: 'full' (the whole split), 'coco1k' (the mean over five folds of 1000 images in the
order of the caption source, each with its captions; COCO 1K), 'first1k' (the first 1000
images: the Flickr30k 1K test is its whole test split, so 'full' is that protocol too), and
'<N>x<M>' (the mean over N folds of M images in that order, as COCO 1K is 5x1000).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from imagebert_jax import parallel, paths
from imagebert_jax.data.splits import Split  # noqa: F401  (the evaluations' input)
from imagebert_jax.retrieval import scoring

KS = (1, 5, 10)


# ------------------------------------------------------------------------------------------------
# Metrics (NumPy).
# ------------------------------------------------------------------------------------------------
def ranks(scores: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(image->text rank per image, text->image rank per caption), 0-based.

  A rank counts the wrong candidates scoring at least as high as the right one (for image->text
  the right one is the image's best-scoring caption), without sorting. Ties count against the
  model, so a scorer that gives everything the same score gets nothing. A score that is not
  finite (NaN, +inf or -inf) ranks last: a right candidate scored so is a miss, a wrong one
  scored so is passed by every finite score, and among non-finite scores the tie rule holds, so
  an all-NaN matrix retrieves nothing.
  """
  scores = np.where(np.isfinite(scores), scores, -np.inf)
  n_img, n_cap = scores.shape
  own = caption_image[None, :] == np.arange(n_img)[:, None]
  wrong = ~own
  best = np.max(np.where(own, scores, -np.inf), axis=1)
  i2t = np.sum((scores >= best[:, None]) & wrong, axis=1)
  right = scores[caption_image, np.arange(n_cap)]
  t2i = np.sum((scores >= right[None, :]) & wrong, axis=0)
  return i2t, t2i


def count_nonfinite(scores: np.ndarray, what: str = "") -> int:
  """How many scores are NaN or infinite; logs a warning naming `what` when there are any (such
  scores rank last, see `ranks`)."""
  n = int(scores.size - np.count_nonzero(np.isfinite(scores)))
  if n:
    logging.warning("%s%s of %s scores are not finite (NaN or inf): they rank last, so a right "
                    "pair scored so counts as a miss", f"{what}: " if what else "", f"{n:,}",
                    f"{scores.size:,}")
  return n


def recall(scores: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
  """Recall@K in both directions and their sum, from a score matrix [N images, C captions]."""
  return recall_from_ranks(*ranks(scores, caption_image))


def recall_from_ranks(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
  """Recall@K (percent) in both directions and their sum (rsum), from the 0-based rank of the
  first right answer per image (i2t) and per caption (t2i)."""
  out = {}
  for k in KS:
    out[f"i2t_R@{k}"] = 100.0 * float(np.mean(i2t < k))
  for k in KS:
    out[f"t2i_R@{k}"] = 100.0 * float(np.mean(t2i < k))
  out["rsum"] = sum(out.values())
  return out


# A score matrix whose finite values spread less than this is (near-)constant: a collapsed scorer.
NEAR_CONSTANT_STD = 1e-3


def score_spread(scores: np.ndarray) -> dict:
  """{"score_std": std of the finite scores, "scores_near_constant": whether it is below
  NEAR_CONSTANT_STD}."""
  finite = scores[np.isfinite(scores)]
  std = float(np.std(finite)) if finite.size else 0.0
  return {"score_std": std, "scores_near_constant": bool(std < NEAR_CONSTANT_STD)}


NAMED_PROTOCOLS = {"coco1k": (5, 1000), "first1k": (1, 1000)}  # name: (folds, images per fold)
PROTOCOL_HELP = "want full, coco1k, first1k or <folds>x<images> (e.g. 5x100)"


def protocol_names(spec: str) -> list[str]:
  """The protocols of `eval.protocol`: one name, or several separated by commas (one scoring
  pass serves them all, e.g. 'full,coco1k' for COCO 5K and COCO 1K)."""
  return [p.strip() for p in str(spec).split(",") if p.strip()]


def protocol_folds(protocol: str) -> tuple[int, int] | None:
  """(folds, images per fold) of a protocol; None for 'full'. 'NxM' is N folds of M images."""
  if protocol == "full":
    return None
  if protocol in NAMED_PROTOCOLS:
    return NAMED_PROTOCOLS[protocol]
  m = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", protocol)
  if not m:
    raise ValueError(f"unknown protocol {protocol!r}: {PROTOCOL_HELP}")
  return int(m[1]), int(m[2])


def protocol_images(protocol: str) -> int:
  """Images a protocol needs (0: any number)."""
  folds = protocol_folds(protocol)
  return folds[0] * folds[1] if folds else 0


def fold_sets(num_images: int, caption_image: np.ndarray, order: np.ndarray,
              protocol: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """(images, captions) index sets that a protocol averages over: fold f holds the images
  order[f * size:(f + 1) * size] (`order` sorts the images as the caption source lists them),
  each with all its captions."""
  folds = protocol_folds(protocol)
  if folds is None:
    return [(np.arange(num_images), np.arange(len(caption_image)))]
  count, size = folds
  if len(order) < count * size:
    raise ValueError(f"protocol {protocol} needs {count * size} images, the split has "
                     f"{len(order)}")
  out = []
  for f in range(count):
    images = order[size * f:size * (f + 1)]
    keep = np.zeros(num_images, bool)
    keep[images] = True
    out.append((images, np.nonzero(keep[caption_image])[0]))
  return out


def fold_caption_image(images: np.ndarray, captions: np.ndarray, caption_image: np.ndarray,
                       num_images: int) -> np.ndarray:
  """Each of a fold's captions' image, as an index into the fold's images."""
  remap = -np.ones(num_images, np.int64)
  remap[images] = np.arange(len(images))
  return remap[caption_image[captions]]


def protocol_metrics(scores: np.ndarray, caption_image: np.ndarray, order: np.ndarray,
                     protocol: str) -> dict[str, float]:
  """Metrics by protocol, the mean over its folds."""
  if protocol_folds(protocol) is None:
    return recall(scores, caption_image)  # the whole matrix, not a copy of it
  results = [recall(scores[np.ix_(images, caps)],
                    fold_caption_image(images, caps, caption_image, scores.shape[0]))
             for images, caps in fold_sets(scores.shape[0], caption_image, order, protocol)]
  return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


# ------------------------------------------------------------------------------------------------
# Scoring.
# ------------------------------------------------------------------------------------------------
def make_scorer(graphdef: Any, mesh, rules, *, tile_images: int, tile_captions: int,
                pad_id: int) -> Callable:
  """Jitted `score(params, split arrays, i0, j0) -> [tile_images, tile_captions]` logits.

  Pairs (i0 + a, j0 + b) are formed on the device and sharded over the batch axes; indices
  beyond the split are clamped (the caller drops those rows and columns).
  """
  pair_spec = parallel.logical_to_spec(("batch",), rules, mesh=mesh)

  def score(params, arrays, i0, j0):
    feat, loc, nreg, text = arrays
    a = jnp.arange(tile_images)
    b = jnp.arange(tile_captions)
    img = jnp.minimum(i0 + a, feat.shape[0] - 1)
    cap = jnp.minimum(j0 + b, text.shape[0] - 1)
    img_idx = jnp.repeat(img, tile_captions)
    cap_idx = jnp.tile(cap, tile_images)
    img_idx = jax.lax.with_sharding_constraint(img_idx, NamedSharding(mesh, pair_spec))
    cap_idx = jax.lax.with_sharding_constraint(cap_idx, NamedSharding(mesh, pair_spec))
    ids = text[cap_idx]
    model = nnx.merge(graphdef, params)
    # Each image's regions projected once for the tile, then given to each of its captions'
    # pairs (the projection is a function of the image alone).
    projected = model.project_regions(feat[img], loc[img])  # [tile_images, R, H]
    regions = projected[jnp.repeat(a, tile_captions)]
    regions = jax.lax.with_sharding_constraint(
        regions, NamedSharding(mesh, parallel.logical_to_spec(("batch", None, None), rules,
                                                              mesh=mesh)))
    logits = scoring.match_logits(model, ids, None, None, nreg[img_idx], pad_id, regions=regions)
    return logits.reshape(tile_images, tile_captions)

  # The tile comes back replicated: every process can read it (multi-host evaluation).
  jitted = jax.jit(score, out_shardings=NamedSharding(mesh, P()))

  def run(params, arrays, i0, j0):
    with jax.set_mesh(mesh), parallel.logical_rules(rules):
      return jitted(params, arrays, jnp.int32(i0), jnp.int32(j0))

  return run


class SplitScorer:
  """A split put on the devices once, and one jitted tile scorer over it; `rows(params, a, b)`
  scores images a..b-1 against every caption. Fine-tuning keeps one to validate with."""

  def __init__(self, split: Split, graphdef: Any, mesh, rules, *, pad_id: int,
               tile_images: int = 8, tile_captions: int = 128):
    self.split = split
    self.tile_images, self.tile_captions = tile_images, tile_captions
    self.arrays = tuple(parallel.replicated_array(x, mesh) for x in (
        split.region_feat, split.region_loc, split.num_regions, split.text_ids))
    self._score = make_scorer(graphdef, mesh, rules, tile_images=tile_images,
                              tile_captions=tile_captions, pad_id=pad_id)

  def rows(self, params: Any, start: int, stop: int) -> np.ndarray:
    """Scores [stop - start, captions], float32 on the host (the same on every process)."""
    n_cap = self.split.num_captions
    tiles = []
    for i0 in range(start, stop, self.tile_images):
      row_tiles = [self._score(params, self.arrays, i0, j0)
                   for j0 in range(0, n_cap, self.tile_captions)]
      tiles.append(jnp.concatenate(row_tiles, axis=1))
    block = jax.device_get(jnp.concatenate(tiles, axis=0))
    return np.asarray(block, np.float32)[:stop - start, :n_cap]


def score_all(params: Any, split: Split, graphdef: Any, mesh, rules, out_dir: str, *,
              pad_id: int, tile_images: int = 8, tile_captions: int = 128,
              chunk_images: int = 64, progress: bool = True) -> np.ndarray:
  """The [images, captions] score matrix, chunk by chunk, resuming from saved chunks."""
  chunk_images = max(tile_images, (chunk_images // tile_images) * tile_images)
  chunks_dir = paths.join(out_dir, "chunks")
  paths.makedirs(chunks_dir)
  n_img, n_cap = split.num_images, split.num_captions
  scorer = SplitScorer(split, graphdef, mesh, rules, pad_id=pad_id, tile_images=tile_images,
                       tile_captions=tile_captions)
  starts = list(range(0, n_img, chunk_images))
  done = _finished_chunks(chunks_dir, starts, {
      "images": n_img, "captions": n_cap, "chunk_images": chunk_images,
      "text_checksum": int(np.sum(split.text_ids, dtype=np.int64)),
      "params_checksum": _checksum(params)})
  if done:
    logging.info("Resuming evaluation: %d of %d chunks already scored", len(done), len(starts))
  total_pairs = n_img * n_cap
  pairs_left = sum(min(chunk_images, n_img - s) for s in starts if s not in done) * n_cap
  bar = tqdm(total=total_pairs, initial=total_pairs - pairs_left, unit="pairs", unit_scale=True,
             desc="scoring", mininterval=2.0, smoothing=0.1,
             disable=not progress or jax.process_index() != 0)
  t0 = time.time()
  for s in starts:
    if s in done:
      continue
    rows = min(chunk_images, n_img - s)
    block = scorer.rows(params, s, s + rows)
    if jax.process_index() == 0:
      paths.save_npy(_chunk_path(chunks_dir, s), block.astype(np.float32))  # whole or not at all
    bar.update(rows * n_cap)
  bar.close()
  parallel.barrier("eval_chunks")
  elapsed = time.time() - t0
  if pairs_left:
    logging.info("Scored %s pairs in %.1fs: %.0f pairs/s", f"{pairs_left:,}", elapsed,
                 pairs_left / max(elapsed, 1e-9))
  return np.concatenate([paths.load_npy(_chunk_path(chunks_dir, s)) for s in starts], axis=0)


@jax.jit
def _abs_sum(params: Any) -> jax.Array:
  return sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(params))


def _checksum(params: Any) -> str:
  """A fingerprint of the parameters (computed on the devices, the same on every process)."""
  return f"{float(_abs_sum(params)):.9e}"


def _finished_chunks(chunks_dir: str, starts: list[int], manifest: dict) -> set[int]:
  """The chunks already scored for this very evaluation (same split, chunking and parameters).

  Chunks left by another evaluation in the folder are removed. Process 0 decides and every
  process follows its decision.
  """
  path = paths.join(chunks_dir, "manifest.json")
  done = np.zeros(len(starts), bool)
  if jax.process_index() == 0:
    previous = None
    if paths.exists(path):
      previous = paths.read_json(path)
    if previous != manifest:
      stale = paths.glob(paths.join(chunks_dir, "rows-*.npy"))
      if stale:
        logging.warning("Removing %d score chunks of another evaluation from %s", len(stale),
                        chunks_dir)
      for p in stale:
        paths.remove(p)
      paths.write_json(path, manifest, indent=None)
    done = np.array([paths.exists(_chunk_path(chunks_dir, s)) for s in starts], bool)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  return {s for s, d in zip(starts, done) if d}


def _chunk_path(chunks_dir: str, start: int) -> str:
  return paths.join(chunks_dir, f"rows-{start:07d}.npy")


def all_protocol_metrics(scores: np.ndarray, caption_image: np.ndarray, order: np.ndarray,
                         spec: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """(metrics, {protocol: its metrics}) for every protocol of `spec`, from one score matrix:
  the first protocol's metrics under their plain names, the others' prefixed `<protocol>/`."""
  names = protocol_names(spec)
  by_protocol = {p: protocol_metrics(scores, caption_image, order, p) for p in names}
  metrics = dict(by_protocol[names[0]])
  for p in names[1:]:
    metrics.update({f"{p}/{k}": v for k, v in by_protocol[p].items()})
  return metrics, by_protocol


def write_results(out_dir: str, scores: np.ndarray, split: Split, metrics: dict,
                  extra: dict) -> None:
  """scores.npy, caption_image.npy, image_ids.json and metrics.json (process 0)."""
  if jax.process_index() != 0:
    return
  paths.save_npy(paths.join(out_dir, "scores.npy"), scores.astype(np.float32))
  paths.save_npy(paths.join(out_dir, "caption_image.npy"), split.caption_image.astype(np.int32))
  paths.write_json(paths.join(out_dir, "image_ids.json"), split.image_ids, indent=None)
  paths.write_json(paths.join(out_dir, "metrics.json"), {**metrics, **extra})
  paths.rmtree(paths.join(out_dir, "chunks"))


def format_metrics(rows: dict[str, dict[str, float]]) -> str:
  keys = [f"i2t_R@{k}" for k in KS] + [f"t2i_R@{k}" for k in KS] + ["rsum"]
  width = max(len(n) for n in rows) + 2
  lines = [" " * width + "".join(f"{k:>10}" for k in keys)]
  for name, m in rows.items():
    lines.append(f"{name:<{width}}" + "".join(f"{m[k]:>10.2f}" for k in keys))
  return "\n".join(lines)

