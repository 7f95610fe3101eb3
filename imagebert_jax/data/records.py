"""The dataset record: one per image, its regions and its tokenized captions (TFDS features).

Fields of a record (N regions after selection, D feature dims, K captions):

  image_id         text
  image_w, image_h int32
  boxes            float32 [N, 4]   pixels, x1 y1 x2 y2
  features         float16 [N, D]   stored as raw bytes
  object_id        int32   [N]      detector's top class (0-based); -1 where the source has none
  object_conf      float32 [N]      its confidence; 1.0 where the source has none
  attr_id          int32   [N]      only when the source has attributes
  class_probs      float16 [N, C]   only when the source has class distributions (raw bytes)
  source_order     int64            the position of the image's first caption in the caption
                                    source (evaluation folds follow it)
  captions         sequence of text, the raw captions
  caption_tokens   int32 [sum of lengths]  WordPiece ids of all captions, concatenated,
                                           each [CLS] ... [SEP] and truncated to the text budget
  caption_lengths  int32 [K]

Regions are selected when the record is built: boxes with confidence >= threshold, best first, at
least `min_boxes` (taking the best below the threshold if needed) and at most `max_boxes`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from imagebert_jax import paths
from imagebert_jax.data.regionfile import RegionRecord

INFO_FILE = "imagebert_dataset.json"


@dataclasses.dataclass(frozen=True)
class RecordOptions:
  feature_dim: int = 2048
  min_boxes: int = 10
  max_boxes: int = 100
  conf_threshold: float = 0.2
  has_object_labels: bool = True
  has_attributes: bool = False
  class_probs_dim: int = 0  # 0: no class distributions stored

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def features_dict(opts: RecordOptions):
  import tensorflow_datasets as tfds  # local: the TF side of the data code

  Tensor = tfds.features.Tensor
  raw = tfds.features.Encoding.BYTES
  spec = {
      "image_id": tfds.features.Text(),
      "image_w": tfds.features.Scalar(np.int32),
      "image_h": tfds.features.Scalar(np.int32),
      "source_order": tfds.features.Scalar(np.int64),
      "boxes": Tensor(shape=(None, 4), dtype=np.float32),
      "features": Tensor(shape=(None, opts.feature_dim), dtype=np.float16, encoding=raw),
      "object_id": Tensor(shape=(None,), dtype=np.int32),
      "object_conf": Tensor(shape=(None,), dtype=np.float32),
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "caption_tokens": Tensor(shape=(None,), dtype=np.int32),
      "caption_lengths": Tensor(shape=(None,), dtype=np.int32),
  }
  if opts.has_attributes:
    spec["attr_id"] = Tensor(shape=(None,), dtype=np.int32)
  if opts.class_probs_dim:
    spec["class_probs"] = Tensor(shape=(None, opts.class_probs_dim), dtype=np.float16,
                                 encoding=raw)
  return tfds.features.FeaturesDict(spec)


def select_regions(record: RegionRecord, opts: RecordOptions) -> RegionRecord:
  """Keeps the best boxes: confidence >= threshold, at least min_boxes, at most max_boxes."""
  conf = np.asarray(record.object_conf, np.float32)
  order = np.argsort(-conf, kind="stable")
  n_above = int(np.sum(conf >= opts.conf_threshold))
  n = min(max(n_above, opts.min_boxes), opts.max_boxes, record.num_boxes)
  keep = order[:n]

  def take(x):
    return None if x is None else np.asarray(x)[keep]

  return dataclasses.replace(
      record, boxes=take(record.boxes), features=take(record.features),
      object_id=take(record.object_id), object_conf=take(record.object_conf),
      attr_id=take(record.attr_id), attr_conf=take(record.attr_conf),
      class_probs=take(record.class_probs))


def make_example(record: RegionRecord, captions: Sequence[str],
                 tokens: Sequence[np.ndarray], opts: RecordOptions,
                 source_order: int = -1) -> dict:
  """The TFDS example dict of one image (regions already selected)."""
  n = record.num_boxes
  ex = {
      "image_id": str(record.image_id),
      "image_w": np.int32(record.image_w),
      "image_h": np.int32(record.image_h),
      "source_order": np.int64(source_order),
      "boxes": np.asarray(record.boxes, np.float32).reshape(n, 4),
      "features": np.asarray(record.features, np.float16).reshape(n, opts.feature_dim),
      "object_id": (np.asarray(record.object_id, np.int32) if opts.has_object_labels
                    else np.full((n,), -1, np.int32)),
      "object_conf": np.asarray(record.object_conf, np.float32),
      "captions": list(captions),
      "caption_tokens": (np.concatenate(tokens).astype(np.int32) if len(tokens)
                         else np.zeros((0,), np.int32)),
      "caption_lengths": np.asarray([len(t) for t in tokens], np.int32),
  }
  if opts.has_attributes:
    ex["attr_id"] = (np.asarray(record.attr_id, np.int32) if record.attr_id is not None
                     else np.full((n,), -1, np.int32))
  if opts.class_probs_dim:
    if record.class_probs is None:
      raise ValueError(f"image {record.image_id}: no class distribution, but the dataset "
                       "stores them")
    ex["class_probs"] = np.asarray(record.class_probs, np.float16)
  return ex


def read_info(data_dir: str) -> dict:
  """The dataset's summary (options, vocabulary, counts), written when a build is finalised."""
  path = paths.join(data_dir, INFO_FILE)
  if not paths.isfile(path):
    raise FileNotFoundError(f"{data_dir}: not an ImageBERT dataset (no {INFO_FILE}); build it "
                            "with imagebert_jax.data.build first")
  return paths.read_json(path)


VOCAB_FILE = "vocab.txt"  # the vocabulary a dataset was tokenized with, kept in its folder


def vocab_path(data_dir: str, info: dict | None = None) -> str:
  """The vocabulary file of a dataset: its summary's `vocab_file`, relative to the dataset's
  folder (so the folder can be moved or copied to a bucket); datasets built before the
  vocabulary was kept with them name an absolute path, used as it is."""
  info = read_info(data_dir) if info is None else info
  name = info.get("vocab_file", VOCAB_FILE)
  if paths.is_url(name) or os.path.isabs(name):
    return name
  return paths.join(data_dir, name)
