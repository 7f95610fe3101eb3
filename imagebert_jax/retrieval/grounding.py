"""Word grounding: does the joint encoder read the regions for the words?

Each visual word of an evaluation split's captions (a detector object name, an attribute name, a
spatial word) is masked alone and predicted by the masked-word decoder among the words of its
kind, beside the caption's own image's regions and beside another image's. A model that reads
the regions for a word predicts it better with its own image; one that guesses it from the
caption's other words does as well with any image. Binding a word to a region (the binding
tests) needs the first: this tells which kinds of word the model reads from the regions at all.

metrics.json: grounding/<kind>/own, grounding/<kind>/other (% of the words predicted right),
grounding/<kind>/words (how many), grounding/<kind>/chance (100 / the kind's candidates).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

class Items(NamedTuple):
  """The masked-word predictions of one kind: caption row, position, and the word's index among
  the kind's candidates."""
  rows: np.ndarray
  positions: np.ndarray
  labels: np.ndarray


def items(text_ids: np.ndarray, candidates: Sequence[int]) -> Items:
  """Every position of `text_ids` [C, T] that holds one of `candidates` (token ids)."""
  index = {int(c): i for i, c in enumerate(candidates)}
  rows, positions = np.nonzero(np.isin(text_ids, np.asarray(candidates, text_ids.dtype)))
  labels = np.asarray([index[int(t)] for t in text_ids[rows, positions]], np.int32)
  return Items(rows.astype(np.int32), positions.astype(np.int32), labels)


def other_images(caption_image: np.ndarray, num_images: int) -> np.ndarray:
  """For each caption, an image other than its own (a fixed rule, no randomness): its own
  index plus 1 + (caption index mod (N - 1)), mod N."""
  if num_images < 2:
    raise ValueError("word grounding compares a caption's own image with another: the split "
                     "has one image")
  shift = 1 + np.arange(len(caption_image)) % (num_images - 1)
  return ((caption_image + shift) % num_images).astype(np.int32)


Predict = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def evaluate(text_ids: np.ndarray, caption_image: np.ndarray, num_images: int,
             kinds: Mapping[str, Sequence[int]], predict: Predict, *,
             mask_id: int) -> dict[str, dict[str, float]]:
  """{kind: {own, other, words, chance}} for each kind with candidates and words in the
  captions. `predict(text_ids [N, T], image [N], position [N], candidates [K])` returns the
  index among `candidates` that the decoder ranks first at `position`."""
  other = other_images(caption_image, num_images)
  out = {}
  for kind, candidates in kinds.items():
    if not len(candidates):
      continue
    found = items(text_ids, candidates)
    if not len(found.rows):
      continue
    masked = text_ids[found.rows].copy()
    masked[np.arange(len(found.rows)), found.positions] = mask_id
    cand = np.asarray(candidates, np.int32)
    res = {}
    for name, images in (("own", caption_image[found.rows]), ("other", other[found.rows])):
      guess = predict(masked, images.astype(np.int32), found.positions, cand)
      res[name] = 100.0 * float(np.mean(np.asarray(guess) == found.labels))
    out[kind] = {**res, "words": int(len(found.rows)), "chance": 100.0 / len(candidates)}
  return out


def flat_metrics(by_kind: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  return {f"grounding/{kind}/{k}": v for kind, values in by_kind.items()
          for k, v in values.items()}


def format_table(by_kind: Mapping[str, Mapping[str, float]]) -> str:
  lines = ["word grounding: % of masked words predicted right, beside their own image / another",
           f"{'':<12}{'own':>8}{'other':>8}{'chance':>8}{'words':>8}"]
  for kind, v in by_kind.items():
    lines.append(f"{kind:<12}{v['own']:>8.1f}{v['other']:>8.1f}{v['chance']:>8.1f}"
                 f"{int(v['words']):>8d}")
  return "\n".join(lines)


def split_predictor(params: Any, graphdef: Any, mesh, rules, split, *, pad_id: int,
                    batch: int = 256) -> Predict:
  """`predict` for `evaluate` over a split's regions, on the devices."""
  from imagebert_jax import parallel
  batch = -(-batch // mesh.size) * mesh.size
  regions = tuple(parallel.replicated_array(x, mesh) for x in (
      split.region_feat, split.region_loc, split.num_regions))

  @jax.jit
  def step(params, regions, text, image, position, candidates):
    model = nnx.merge(graphdef, params)
    feat, loc, count = (x[image] for x in regions)
    region_mask = jnp.arange(feat.shape[1])[None, :] < count[:, None]
    text_h, _ = model.encode(text, text != pad_id, feat, loc, region_mask)
    h = jnp.take_along_axis(text_h, position[:, None, None], axis=1)[:, 0]
    return jnp.argmax(model.mlm_logits(h)[:, candidates], axis=-1)

  def predict(text, image, position, candidates):
    n = len(text)
    order = np.arange(-(-n // batch) * batch) % max(n, 1)
    inputs = (text.astype(np.int32), image, position)
    candidates = parallel.replicated_array(candidates, mesh)
    out = []
    with jax.set_mesh(mesh), parallel.logical_rules(rules):
      for b in range(0, len(order), batch):
        rows = order[b:b + batch]
        arrays = [parallel.replicated_array(np.ascontiguousarray(x[rows]), mesh) for x in inputs]
        out.append(step(params, regions, *arrays, candidates))
    return np.concatenate([np.asarray(jax.device_get(x)) for x in out])[:n]

  return predict
