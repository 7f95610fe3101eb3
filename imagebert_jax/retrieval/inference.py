"""Using a trained ImageBERT: load it from its run folder, embed images and texts, score pairs, rank.

    from imagebert_jax.retrieval.inference import TrainedModel, Regions
    model = TrainedModel.load("runs/demo")            # a run, stage, checkpoints or step folder
    gallery = model.image_gallery([Regions(features, boxes, image_w, image_h), ...])
    hits = model.rank_images("a red bicycle next to a bench", gallery, k=10, rerank_k=16)

Two stages (the README's "Search"): the encoder run on one modality at a time gives normalised
image and text embeddings (the contrastive head); every candidate is ranked by their dot product,
then the cross-encoder (the matching head over the joint sequence) rescores each query's top
`rerank_k` and gives the final order. `rerank_k=0` scores every candidate with the cross-encoder.

An image is its detector regions as the record format has them: features [n, D], boxes [n, 4] in
pixels (x1, y1, x2, y2) and the image size; the 5-d box locations are computed as the input
pipeline computes them. Batches are padded to a few sizes (powers of two times the device
count, up to `batch_size`), so each function compiles once per size; the batch is split over all
local devices. Runs on CPU, GPU and TPU; one process. TensorFlow-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Callable, Sequence

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding

from imagebert_jax import parallel
from imagebert_jax.config import defaults as config_defaults
from imagebert_jax.config import runconfig
from imagebert_jax.errors import RunConfigError
from imagebert_jax.model import ModelConfig
from imagebert_jax.retrieval import scoring
from imagebert_jax.model.inputs import region_locations
from imagebert_jax.training import checkpoint as ckpt_lib
from imagebert_jax.training import state as state_lib

__all__ = ["Regions", "Gallery", "Hit", "TrainedModel", "RunConfigError", "locate_checkpoint",
           "pack_regions", "region_locations", "two_stage_rank"]


# ------------------------------------------------------------------------------------------------
# Inputs.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Regions:
  """One image's detector regions (a `RegionRecord` has these fields too)."""

  features: np.ndarray          # [n, D]
  boxes: np.ndarray             # [n, 4] pixels: x1, y1, x2, y2
  image_w: int
  image_h: int
  object_conf: np.ndarray | None = None  # [n] when known: the best are kept beyond max_regions


def pack_regions(images: Sequence[Any], max_regions: int,
                 feature_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(features float16 [B, R, D], locations float32 [B, R, 5], region counts int32 [B]).

  Beyond `max_regions`, the most confident regions are kept (the first ones when the confidence
  is not given: records store their regions best first).
  """
  n = len(images)
  feat = np.zeros((n, max_regions, feature_dim), np.float16)
  loc = np.zeros((n, max_regions, 5), np.float32)
  count = np.zeros((n,), np.int32)
  for i, image in enumerate(images):
    f = np.asarray(image.features)
    if f.ndim != 2 or f.shape[1] != feature_dim:
      raise ValueError(f"image {i}: region features of shape {tuple(f.shape)}; the model takes "
                       f"[n, {feature_dim}] (config.model.region_feature_dim)")
    boxes = np.asarray(image.boxes, np.float32).reshape(-1, 4)
    if len(boxes) != len(f):
      raise ValueError(f"image {i}: {len(boxes)} boxes for {len(f)} region features")
    if len(f) == 0:
      raise ValueError(f"image {i}: no regions")
    keep = np.arange(len(f))
    conf = getattr(image, "object_conf", None)
    if len(f) > max_regions:
      keep = (np.argsort(-np.asarray(conf, np.float32), kind="stable") if conf is not None
              else keep)[:max_regions]
    k = len(keep)
    feat[i, :k] = f[keep].astype(np.float16)
    loc[i, :k] = region_locations(boxes[keep], image.image_w, image.image_h)
    count[i] = k
  return feat, loc, count


# ------------------------------------------------------------------------------------------------
# Finding and restoring a checkpoint.
# ------------------------------------------------------------------------------------------------
def _steps(checkpoints: epath.Path) -> list[int]:
  if not checkpoints.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoints.iterdir()
                if p.name.isdigit() and (p / "state").is_dir())


def locate_checkpoint(path: str, stage: str | None = None,
                      select: str = "best") -> tuple[epath.Path, epath.Path]:
  """(stage folder, saved state folder) for a run folder (its last training stage, or `stage`),
  a stage folder, its `checkpoints/` folder (the newest step), a step folder or a state folder.
  For a run or stage folder, `select` 'best' takes the checkpoint of the best validation (a
  fine-tuning stage's `best_checkpoint/`, what its evaluations score) when there is one, 'last'
  the newest. Raises RunConfigError (one line) when there is no checkpoint there."""
  if select not in ("best", "last"):
    raise RunConfigError(f"select={select!r}: want 'best' or 'last'")
  p = epath.Path(path)
  if not p.exists():
    raise RunConfigError(f"{p}: no such folder")
  if p.name == "state" and p.is_dir():
    return p.parent.parent.parent, p
  if (p / "state").is_dir():
    return p.parent.parent, p / "state"
  if _steps(p) and not (p / runconfig.CONFIG_FILE).exists():
    return p.parent, p / str(_steps(p)[-1]) / "state"
  config_path = p / runconfig.CONFIG_FILE
  if config_path.exists() and not runconfig.is_stage_config(runconfig.read_json(config_path)):
    run = runconfig.read_json(config_path)
    names = [s.strip() for s in str(run.get("run", "")).split(",") if s.strip()]
    with_checkpoints = [n for n in names if _steps(p / n / "checkpoints")]
    if stage is None:
      if not with_checkpoints:
        raise RunConfigError(f"{p}: no stage of this run ({', '.join(names)}) has checkpoints")
      stage = with_checkpoints[-1]
    elif stage not in with_checkpoints:
      raise RunConfigError(f"{p}: stage {stage!r} has no checkpoints here; stages with "
                           f"checkpoints: {with_checkpoints}")
    p = p / stage
  elif stage is not None and (p / stage).is_dir():
    p = p / stage
  steps = _steps(p / "checkpoints")
  if not steps:
    if (p / runconfig.CONFIG_FILE).exists():
      kind = runconfig.read_json(p / runconfig.CONFIG_FILE).get("kind")
      raise RunConfigError(f"{p}: this {kind or ''} stage has no checkpoints (an evaluation stage "
                           "scores the checkpoints of the stage it names in init)")
    raise RunConfigError(f"{p}: not a run, stage, checkpoints or step folder (no checkpoints "
                         f"and no {runconfig.CONFIG_FILE})")
  best = _steps(p / ckpt_lib.BEST_DIR) if select == "best" else []
  if best:
    return p, p / ckpt_lib.BEST_DIR / str(best[-1]) / "state"
  return p, p / "checkpoints" / str(steps[-1]) / "state"


def restore_params(state_dir: epath.Path, abstract_params: Any) -> Any:
  """The checkpoint's parameters placed as `abstract_params` says (ShapeDtypeStructs with
  shardings). A checkpoint whose parameters are not exactly the model's is one-line error."""
  try:
    diff = ckpt_lib.compare_params(str(state_dir), abstract_params)
  except ValueError as e:
    raise RunConfigError(str(e)) from None
  except Exception as e:  # noqa: BLE001 - unreadable: name it in one line
    raise RunConfigError(f"{state_dir}: cannot read the checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
  problems = [f"{'/'.join(k)}: shape {s} in the checkpoint, {t} in config.json"
              for k, s, t in diff.shapes]
  missing, extra = diff.missing, diff.unexpected
  if missing:
    problems.append(f"not in the checkpoint: {', '.join(missing[:4])}"
                    + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
  if extra:
    problems.append(f"not in the model: {', '.join(extra[:4])}"
                    + (f" and {len(extra) - 4} more" if len(extra) > 4 else ""))
  if problems:
    raise RunConfigError(f"{state_dir}: the checkpoint does not match the model its config.json "
                         f"describes: {'; '.join(problems[:3])}"
                         + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
  return ckpt_lib.nest_like(ckpt_lib.restore_leaves(str(state_dir), diff.common),
                            abstract_params)


def weights_digest(params: Any) -> str:
  """SHA-256 over the parameters' bytes, in path order: the same on any device."""
  h = hashlib.sha256()
  flat = ckpt_lib.flatten_paths(jax.device_get(params))
  for key in sorted(flat):
    value = np.ascontiguousarray(flat[key])
    h.update("/".join(key).encode())
    h.update(str(value.dtype).encode() + str(value.shape).encode())
    h.update(value.tobytes())
  return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Ranking.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Hit:
  """One ranked candidate. `score` is the cross-encoder's logit (None when it was not rescored:
  ranked by the first stage only); `itc_score` the embeddings' dot product, `itc_rank` the
  candidate's 0-based place in the first stage. Rescored candidates are ordered by `score`, plus
  `itc_weight` x `itc_score` when the model ranks with both (ModelConfig.retrieval_itc_weight)."""

  index: int
  rank: int
  score: float | None
  itc_score: float
  itc_rank: int


def two_stage_rank(first: np.ndarray, cross: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
                   k: int, rerank_k: int, itc_weight: float = 0.0) -> list[list[Hit]]:
  """Top-`k` hits per query from first-stage scores [Q, N] and a cross-encoder.

  Each query's `rerank_k` best candidates by `first` (all N when `rerank_k` is 0) are scored by
  `cross(query_index [P], candidate_index [P]) -> [P]` in one call for all queries, and ranked by
  that score plus `itc_weight` x their first-stage score (ties keep the first stage's order)
  ahead of the other candidates, which keep the first stage's order.
  """
  first = np.asarray(first, np.float32)
  q, n = first.shape
  depth = n if rerank_k <= 0 else min(rerank_k, n)
  order = np.argsort(-first, axis=1, kind="stable")
  cand = order[:, :depth]
  qi = np.repeat(np.arange(q), depth)
  second = np.asarray(cross(qi, cand.reshape(-1)), np.float32).reshape(q, depth) if depth else \
      np.zeros((q, 0), np.float32)
  out = []
  key = second + np.float32(itc_weight) * np.take_along_axis(first, cand, axis=1) \
      if itc_weight else second
  for a in range(q):
    reranked = np.argsort(-key[a], kind="stable")
    final = np.concatenate([cand[a, reranked], order[a, depth:]])[:k]
    itc_rank = np.empty(n, np.int64)
    itc_rank[order[a]] = np.arange(n)
    scores = dict(zip(cand[a].tolist(), second[a].tolist()))
    out.append([Hit(index=int(j), rank=r, score=scores.get(int(j)),
                    itc_score=float(first[a, j]), itc_rank=int(itc_rank[j]))
                for r, j in enumerate(final)])
  return out


@dataclasses.dataclass
class Gallery:
  """Candidates embedded once: images (with their packed regions, for the cross-encoder) or
  texts (with their token ids)."""

  embeddings: np.ndarray                 # [N, E] float32, normalised
  text_ids: np.ndarray | None = None     # [N, T]
  region_feat: np.ndarray | None = None  # [N, R, D] float16
  region_loc: np.ndarray | None = None   # [N, R, 5]
  num_regions: np.ndarray | None = None  # [N]

  def __len__(self) -> int:
    return len(self.embeddings)


# ------------------------------------------------------------------------------------------------
# The model.
# ------------------------------------------------------------------------------------------------
def batch_sizes(batch_size: int, multiple: int) -> list[int]:
  """The padded batch sizes: `multiple` times powers of two, up to `batch_size` rounded up."""
  top = -(-max(batch_size, 1) // multiple) * multiple
  sizes, s = [], multiple
  while s < top:
    sizes.append(s)
    s *= 2
  return sizes + [top]


class TrainedModel:
  """A trained ImageBERT ready to embed, score and rank (see the module docstring)."""

  def __init__(self, model_cfg: ModelConfig, graphdef: Any, params: Any, mesh, rules, *,
               vocab_file: str, lowercase: bool = True, stage_config: dict | None = None,
               source: str = "", batch_size: int = 64):
    from imagebert_jax.data.tokenizer import special_ids
    self.cfg = model_cfg
    self.graphdef, self.params = graphdef, params
    self.mesh, self.rules = mesh, rules
    self.vocab_file, self.lowercase = vocab_file, lowercase
    self.ids = special_ids(vocab_file)
    self.stage_config = stage_config or {}
    self.source = source
    self.sizes = batch_sizes(batch_size, mesh.size)
    self._tokenizer = None
    self._weights_digest = None
    pad, cls_sep = self.ids.pad_id, (self.ids.cls_id, self.ids.sep_id)

    def merged(params):
      return nnx.merge(graphdef, params)

    def text_emb(params, ids):
      return scoring.text_embeddings(merged(params), ids, pad)

    def image_emb(params, feat, loc, count):
      return scoring.image_embeddings(merged(params), feat, loc, count, cls_sep)

    def cross(params, ids, feat, loc, count):
      return scoring.match_logits(merged(params), ids, feat, loc, count, pad)

    self._text_emb, self._image_emb, self._cross = (jax.jit(f) for f in (text_emb, image_emb,
                                                                          cross))
    # What ranking adds to the matching logit per unit of cosine (0: the logit alone).
    self.itc_weight = float(jax.device_get(merged(params).retrieval_cosine_weight()))

  # ---- Loading ------------------------------------------------------------------------------
  @classmethod
  def load(cls, path: str, *, stage: str | None = None, select: str = "best",
           batch_size: int = 64, dtype: str | None = None,
           devices: Sequence[Any] | None = None) -> "TrainedModel":
    """From a run folder (its last training stage, or `stage`), a stage folder, its checkpoints
    folder, or one step's folder; of a run or stage folder, the best validated checkpoint, or
    the newest with `select='last'` (locate_checkpoint). The stage's config.json describes the
    model; on CPU it computes in float32 (`dtype` overrides). RunConfigError (one line) when the
    config is missing or the checkpoint does not match it."""
    stage_dir, state_dir = locate_checkpoint(path, stage, select)
    stage_config = runconfig.read_stage_config(stage_dir)
    model_cfg = runconfig.model_config(stage_config)
    if dtype:
      model_cfg = dataclasses.replace(model_cfg, dtype=dtype)
    elif jax.default_backend() == "cpu" and model_cfg.dtype != "float32":
      model_cfg = dataclasses.replace(model_cfg, dtype="float32")
    mesh = parallel.make_mesh((-1, 1, 1), devices=devices)
    rules = parallel.rules_from_config(config_defaults.DEFAULT_RULES)
    graphdef, shapes, pspecs = state_lib.params_spec(model_cfg, mesh, rules)
    abstract = jax.tree.map(
        lambda s, spec: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, spec)),
        shapes, pspecs, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    params = restore_params(state_dir, abstract)
    logging.info("Loaded %s (stage %s)", state_dir, stage_config["stage"])
    return cls(model_cfg, graphdef, params, mesh, rules,
               vocab_file=str(stage_dir / stage_config["text"]["vocab_file"]),
               lowercase=stage_config["text"].get("lowercase", True), stage_config=stage_config,
               source=str(state_dir.parent), batch_size=batch_size)

  @property
  def config_digest(self) -> str:
    return runconfig.config_digest(self.stage_config)

  @property
  def weights_digest(self) -> str:
    if self._weights_digest is None:
      self._weights_digest = weights_digest(self.params)
    return self._weights_digest

  # ---- Batching -----------------------------------------------------------------------------
  def _run(self, fn, arrays: Sequence[np.ndarray], pad_rows: Sequence[np.ndarray]) -> np.ndarray:
    """fn(params, *arrays) over the rows, in padded batches; `pad_rows` fill the padding."""
    n = len(arrays[0])
    out = []
    top = self.sizes[-1]
    for start in range(0, n, top):
      chunk = [a[start:start + top] for a in arrays]
      rows = len(chunk[0])
      size = next(s for s in self.sizes if s >= rows)
      if size > rows:
        chunk = [np.concatenate([c, np.repeat(p[None], size - rows, 0)]) for c, p in
                 zip(chunk, pad_rows)]
      placed = [jax.device_put(c, parallel.batch_sharding(self.mesh, self.rules, c.ndim))
                for c in chunk]
      with jax.set_mesh(self.mesh), parallel.logical_rules(self.rules):
        result = fn(self.params, *placed)
      out.append(np.asarray(jax.device_get(result))[:rows])
    if not out:
      return np.zeros((0,), np.float32)
    return np.concatenate(out)

  def _empty_text(self) -> np.ndarray:
    row = np.full((self.cfg.max_text_len,), self.ids.pad_id, np.int32)
    row[:2] = (self.ids.cls_id, self.ids.sep_id)
    return row

  def _region_pads(self):
    return (np.zeros((self.cfg.max_regions, self.cfg.region_feature_dim), np.float16),
            np.zeros((self.cfg.max_regions, 5), np.float32), np.int32(0))

  # ---- Text ---------------------------------------------------------------------------------
  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """[N, max_text_len] WordPiece ids: [CLS] words [SEP], truncated, padded."""
    if self._tokenizer is None:
      from imagebert_jax.data.tokenizer import Tokenizer
      self._tokenizer = Tokenizer(self.vocab_file, self.cfg.max_text_len, self.lowercase)
    return self._tokenizer.encode_padded(list(texts))

  def _ids(self, texts) -> np.ndarray:
    if isinstance(texts, np.ndarray):
      return texts.astype(np.int32)
    if isinstance(texts, str):
      raise TypeError("give a list of texts, not one string")
    return self.tokenize(texts)

  def embed_texts(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
    """[N, itc_dim] normalised text embeddings, from texts or token ids [N, T]."""
    ids = self._ids(texts)
    return self._run(self._text_emb, [ids], [self._empty_text()]).reshape(len(ids), -1)

  # ---- Images -------------------------------------------------------------------------------
  def pack(self, images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return pack_regions(images, self.cfg.max_regions, self.cfg.region_feature_dim)

  def embed_images(self, images: Sequence[Any] | tuple) -> np.ndarray:
    """[N, itc_dim] normalised image embeddings, from `Regions` (or packed arrays)."""
    feat, loc, count = images if isinstance(images, tuple) else self.pack(images)
    return self._run(self._image_emb, [feat, loc, count],
                     self._region_pads()).reshape(len(feat), -1)

  # ---- Pairs --------------------------------------------------------------------------------
  def score_pairs(self, images: Sequence[Any] | tuple,
                  texts: Sequence[str] | np.ndarray) -> np.ndarray:
    """The cross-encoder's matching logit of each (images[i], texts[i]): [N] float32."""
    feat, loc, count = images if isinstance(images, tuple) else self.pack(images)
    ids = self._ids(texts)
    if len(ids) != len(feat):
      raise ValueError(f"{len(feat)} images and {len(ids)} texts: give one text per image")
    pad_feat, pad_loc, pad_count = self._region_pads()
    return self._run(self._cross, [ids, feat, loc, count],
                     [self._empty_text(), pad_feat, pad_loc, pad_count]).reshape(-1)

  # ---- Galleries and ranking ----------------------------------------------------------------
  def image_gallery(self, images: Sequence[Any]) -> Gallery:
    feat, loc, count = self.pack(images)
    return Gallery(self.embed_images((feat, loc, count)), region_feat=feat, region_loc=loc,
                   num_regions=count)

  def text_gallery(self, texts: Sequence[str] | np.ndarray) -> Gallery:
    ids = self._ids(texts)
    return Gallery(self.embed_texts(ids), text_ids=ids)

  def rank_images(self, queries: Sequence[str] | np.ndarray, gallery: Gallery | Sequence[Any], *,
                  k: int = 10, rerank_k: int = 16) -> list[list[Hit]]:
    """For each text query, the top `k` images of the gallery (two stages)."""
    if not isinstance(gallery, Gallery):
      gallery = self.image_gallery(gallery)
    ids = self._ids(queries)
    first = self.embed_texts(ids) @ gallery.embeddings.T

    def cross(q, j):
      return self.score_pairs((gallery.region_feat[j], gallery.region_loc[j],
                               gallery.num_regions[j]), ids[q])

    return two_stage_rank(first, cross, k=k, rerank_k=rerank_k, itc_weight=self.itc_weight)

  def rank_texts(self, images: Sequence[Any] | tuple, gallery: Gallery | Sequence[str], *,
                 k: int = 10, rerank_k: int = 16) -> list[list[Hit]]:
    """For each query image, the top `k` texts of the gallery (two stages)."""
    if not isinstance(gallery, Gallery):
      gallery = self.text_gallery(gallery)
    feat, loc, count = images if isinstance(images, tuple) else self.pack(images)
    first = self.embed_images((feat, loc, count)) @ gallery.embeddings.T

    def cross(q, j):
      return self.score_pairs((feat[q], loc[q], count[q]), gallery.text_ids[j])

    return two_stage_rank(first, cross, k=k, rerank_k=rerank_k, itc_weight=self.itc_weight)
