"""Binding tests: does a ranker tell a caption from the same words recombined?

A binding file holds, per test, an image of the evaluation split, its true caption and a foil made
of the same words with two attributes or two things swapped (in the manner of Winoground and ARO's
VG-Attribution / VG-Relation): "a red car and a white bus" / "a white car and a red bus", "a dog
to the left of a car" / "a car to the left of a dog". A bag of words scores both alike; only a
ranker that binds words to regions (attributes to objects, the boxes' places to the word order)
tells them apart. JSON Lines, one object per test:

    {"image_id": "1000873", "kind": "attribute", "true_caption": "...", "false_caption": "..."}

For each kind, and for each scorer (the cross-encoder's matching logit; the contrastive
embeddings' cosine; the final ranking's score, the logit plus `retrieval_itc_weight` x the
contrastive logit), the share of tests whose true caption scores higher than its foil, in percent
(chance 50), and the share of ties (a bag of words ties on every test). The realistic scene
generator writes such a file for each evaluation split (`binding_<split>.jsonl`, copied into the
built dataset), and the evaluation stage scores the one of its split (`evals.retrieval.binding_file`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagebert_jax import paths

SCORERS = ("cross_encoder", "itc", "final")


@dataclasses.dataclass
class BindingTests:
  image_index: np.ndarray    # [M] the image of each test, an index into the split
  kinds: list[str]           # [M]
  true_captions: list[str]   # [M]
  false_captions: list[str]  # [M]
  skipped: int = 0           # tests naming an image the split does not have

  def __len__(self) -> int:
    return len(self.kinds)


def read_tests(path: str, image_ids: list[str]) -> BindingTests:
  """The tests of a binding file whose image is one of `image_ids` (the split's, in its order).

  A line that is not such a JSON object is a one-line error naming the file and the line; tests
  of images the split does not have are skipped, counted and reported in the log."""
  where = {image_id: i for i, image_id in enumerate(image_ids)}
  index, kinds, trues, falses, skipped = [], [], [], [], 0
  with paths.open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        image_id, kind = str(row["image_id"]), str(row["kind"])
        true, false = str(row["true_caption"]).strip(), str(row["false_caption"]).strip()
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} line {line_no}: not a binding test (a JSON object with "
                         f"image_id, kind, true_caption, false_caption): {e}") from None
      if image_id not in where:
        skipped += 1
        continue
      index.append(where[image_id])
      kinds.append(kind)
      trues.append(true)
      falses.append(false)
  if skipped:
    logging.warning("%s: %d of %d binding tests name images the split does not have: skipped",
                    path, skipped, skipped + len(kinds))
  return BindingTests(np.asarray(index, np.int64), kinds, trues, falses, skipped)


def shares(true_scores: np.ndarray, false_scores: np.ndarray,
           kinds: list[str]) -> dict[str, dict[str, float]]:
  """{kind: {"higher": % of tests whose true caption scores higher, "ties": % tied, "tests": n}},
  with "all" over every test. A score that is not finite counts as lower than any finite one."""
  t = np.where(np.isfinite(true_scores), true_scores, -np.inf)
  f = np.where(np.isfinite(false_scores), false_scores, -np.inf)
  kinds_arr = np.asarray(kinds)
  out = {}
  for kind in sorted(set(kinds)) + ["all"]:
    sel = np.ones(len(kinds), bool) if kind == "all" else kinds_arr == kind
    if not sel.any():
      continue
    out[kind] = {"higher": 100.0 * float(np.mean(t[sel] > f[sel])),
                 "ties": 100.0 * float(np.mean(t[sel] == f[sel])), "tests": int(sel.sum())}
  return out


def flat_metrics(by_scorer: dict[str, dict[str, dict[str, float]]],
                 skipped: int = 0) -> dict[str, float]:
  """metrics.json entries: binding/<kind>/<scorer> (% true higher), binding/<kind>/<scorer>_ties,
  binding/<kind>/tests, binding/skipped."""
  out = {}
  for scorer, kinds in by_scorer.items():
    for kind, v in kinds.items():
      out[f"binding/{kind}/{scorer}"] = v["higher"]
      out[f"binding/{kind}/{scorer}_ties"] = v["ties"]
      out[f"binding/{kind}/tests"] = v["tests"]
  out["binding/skipped"] = skipped
  return out


def format_table(by_scorer: dict[str, dict[str, dict[str, float]]]) -> str:
  """One row per scorer, one column per kind: % true above its foil (% tied)."""
  first = next(iter(by_scorer.values()))
  heads = [f"{kind} ({v['tests']})" for kind, v in first.items()]
  lines = ["binding: % of tests whose true caption scores above its foil (% tied)",
           f"{'':<16}" + "".join(f"{h:>20}" for h in heads)]
  for scorer, kinds in by_scorer.items():
    cells = [f"{v['higher']:.1f} ({v['ties']:.1f})" for v in kinds.values()]
    lines.append(f"{scorer:<16}" + "".join(f"{c:>20}" for c in cells))
  return "\n".join(lines)


def evaluate(tests: BindingTests, *, cross_scores, text_embed, image_embeddings: np.ndarray,
             tokenize, cosine_weight: float) -> dict[str, dict[str, dict[str, float]]]:
  """The shares of every scorer. `tokenize(texts) -> [n, T]` ids; `cross_scores(images [n],
  ids [n, T]) -> [n]` matching logits of (split image, text) pairs; `text_embed(ids) -> [n, E]`
  normalised embeddings; `image_embeddings` [N, E] the split's."""
  n = len(tests)
  ids = tokenize(tests.true_captions + tests.false_captions)
  images = np.concatenate([tests.image_index, tests.image_index])
  cross = np.asarray(cross_scores(images, ids), np.float32)
  text = np.asarray(text_embed(ids), np.float32)
  cosine = np.sum(text * image_embeddings[images], axis=-1)
  final = cross + np.float32(cosine_weight) * cosine
  out = {}
  for name, s in (("cross_encoder", cross), ("itc", cosine), ("final", final)):
    out[name] = shares(s[:n], s[n:], tests.kinds)
  return out


def split_scorers(params: Any, graphdef: Any, mesh, rules, split, *, pad_id: int,
                  cls_sep: tuple[int, int], batch: int = 256):
  """(cross_scores, text_embed) for `evaluate` over a split on the devices (two_stage's jitted
  pair scorer and text embedder, so the figures are the evaluation's own)."""
  from imagebert_jax import parallel
  from imagebert_jax.retrieval import two_stage
  scorer = two_stage._pair_scorer(graphdef, mesh, rules, pad_id)
  batch = -(-batch // mesh.size) * mesh.size
  regions = tuple(parallel.replicated_array(x, mesh) for x in (
      split.region_feat, split.region_loc, split.num_regions))

  def padded(n):
    return np.arange(-(-n // batch) * batch) % max(n, 1)

  def cross_scores(images: np.ndarray, ids: np.ndarray) -> np.ndarray:
    order = padded(len(images))
    arrays = regions + (parallel.replicated_array(ids.astype(np.int32), mesh),)
    out = []
    with jax.set_mesh(mesh), parallel.logical_rules(rules):
      for b in range(0, len(order), batch):
        rows = order[b:b + batch]
        img = parallel.replicated_array(images[rows].astype(np.int32), mesh)
        cap = parallel.replicated_array(rows.astype(np.int32), mesh)
        out.append(scorer(params, arrays, img, cap))
    return np.concatenate([np.asarray(jax.device_get(x)) for x in out])[:len(images)]

  def text_embed(ids: np.ndarray) -> np.ndarray:
    _, texts = two_stage._embedders(graphdef, mesh, rules, pad_id, tuple(cls_sep), batch)
    arrays = regions + (parallel.replicated_array(ids.astype(np.int32), mesh),)
    out = []
    with jax.set_mesh(mesh), parallel.logical_rules(rules):
      for s in range(0, len(ids), batch):
        out.append(texts(params, arrays, jnp.int32(s)))
    return np.concatenate([np.asarray(jax.device_get(x)) for x in out])[:len(ids)]

  return cross_scores, text_embed
